"""PNG figures of a `RoutingTrace` for papers and slides, drawn from the same reductions as the HTML report.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so plotting neither needs a
display nor changes the backend of the caller's session (a notebook keeps its own)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..analysis.capture import AnalysisError, RoutingTrace
from ..analysis.ordering import gate_strength_in_stream_order, routers_in_order, routing_by_label_in_text_order
from ..analysis.reductions import dominant_expert_per_token, utilisation
from .style import expert_colours

_DPI = 200


def _save(figure: Figure, path: str | Path, title: str | None = None) -> Path:
    """Write the figure; `title` also goes into the PNG's metadata (Title), where viewers and tests read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=_DPI, bbox_inches="tight", metadata={"Title": title} if title else None)
    return path


def _need_routes(trace: RoutingTrace, what: str) -> None:
    if trace.routes.empty:
        raise AnalysisError(f"{what} needs routers, and this {trace.method} trace has none "
                            "(for bts, plot the stitch gates with plot_gate_strength)")


def _router_labels(trace: RoutingTrace) -> list[str]:
    return [router["label"] for router in routers_in_order(trace)]


def _annotated_heatmap(figure: Figure, values, rows: list[str], columns: list[str], title: str, colour_label: str,
                       vmax: float = 1.0, fmt: str = "{:.0%}") -> None:
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto")
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks(range(len(rows)), rows)
    axes.tick_params(length=0)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # NaN (a stream a stitch does not gate) stays blank
                axes.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                          color="white" if value > 0.55 * vmax else "#222")
    axes.set_title(title, fontsize=11)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03, label=colour_label)


def plot_utilisation_heatmap(trace: RoutingTrace, path: str | Path) -> Path:
    """Router x expert share of routed slots: collapsed or dead experts show as empty columns."""
    _need_routes(trace, "a utilisation heatmap")
    shares = utilisation(trace)
    rows = _router_labels(trace)
    figure = Figure(figsize=(1.2 + 0.9 * len(shares.columns), 1.0 + 0.28 * len(rows)))
    _annotated_heatmap(figure, shares.values, rows, list(shares.columns), f"Expert utilisation ({trace.method})",
                       "share of routed slots")
    return _save(figure, path)


def plot_routing_by_label(trace: RoutingTrace, path: str | Path, title: str = "Routing by label") -> Path:
    """Per label (domain), stacked shares of top experts: whether each domain found its own expert. `title` should
    name the model and what was analysed, since the figure travels without its context."""
    _need_routes(trace, "routing by label")
    table = routing_by_label_in_text_order(trace)
    if table.empty:
        raise AnalysisError("routing by label needs labelled texts: give one label per text when capturing")
    colours = expert_colours(len(trace.expert_names))
    figure = Figure(figsize=(7.0, 0.9 + 0.45 * len(table)))
    axes = figure.add_subplot()
    left = [0.0] * len(table)
    labels = [str(label) for label in table.index]
    for expert, colour in zip(table.columns, colours):
        shares = table[expert].tolist()
        axes.barh(labels, shares, left=left, color=colour, label=expert, edgecolor="white", linewidth=0.5)
        for y, (start, share) in enumerate(zip(left, shares)):
            if share >= 0.08:
                axes.text(start + share / 2, y, f"{share:.0%}", ha="center", va="center", fontsize=8,
                          color="white" if sum(to_rgb(colour)) < 1.8 else "#222")
        left = [a + b for a, b in zip(left, shares)]
    axes.set_xlim(0, 1)
    axes.invert_yaxis()
    axes.set_xlabel("share of (token, router) pairs by top expert")
    axes.set_title(title, fontsize=10)
    axes.legend(ncols=min(len(colours), 5), loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False,
                fontsize=8)
    return _save(figure, path, title)


def _display(token: str) -> str:
    """Whitespace a reader must see (newlines, tabs) as visible marks; an empty token as a placeholder."""
    return token.replace("\n", "\u21b5").replace("\t", "\u2192") or "\u2205"


def plot_token_strip(trace: RoutingTrace, path: str | Path, text_index: int = 0, line_chars: int = 80) -> Path:
    """One text's tokens as boxes coloured by their dominant expert (highest mean probability over routers)."""
    _need_routes(trace, "a token strip")
    if not 0 <= text_index < len(trace.texts):
        raise AnalysisError(f"text_index {text_index} is out of range: the trace has {len(trace.texts)} texts")
    tokens = dominant_expert_per_token(trace)
    tokens = tokens[tokens["text_index"] == text_index].sort_values("position")
    names, colours = trace.expert_names, expert_colours(len(trace.expert_names))
    boxes, x, line = [], 0, 0  # (x, line, width, text, colour, strength) in character cells
    for token, expert, probability in zip(tokens["token"], tokens["dominant"], tokens["probability"]):
        shown = _display(token)
        if x and x + len(shown) > line_chars:
            x, line = 0, line + 1
        boxes.append((x, line, len(shown), shown, colours[names.index(expert)], probability))
        x += len(shown)
        if "\n" in token:
            x, line = 0, line + 1
    lines = line + 1
    cell_w, cell_h = 0.083, 0.24  # inches per character cell at 10 pt monospace
    figure = Figure(figsize=(line_chars * cell_w + 0.3, lines * cell_h + 0.6))
    axes = figure.add_axes((0.02, 0.02, 0.96, (lines * cell_h) / (lines * cell_h + 0.6)))
    axes.set_xlim(0, line_chars)
    axes.set_ylim(lines, 0)
    axes.axis("off")
    for x, line, width, shown, colour, strength in boxes:
        axes.add_patch(Rectangle((x, line + 0.08), width, 0.84, facecolor=colour, alpha=0.15 + 0.75 * strength,
                                 edgecolor="white", linewidth=0.6))
        axes.text(x + 0.05, line + 0.55, shown, fontsize=10, family="monospace", va="center", parse_math=False)
    label = trace.labels[text_index]
    title = f"text {text_index + 1}" + (f" ({label})" if label is not None else "")
    if text_index < len(trace.truncated) and trace.truncated[text_index]:
        title += f", truncated to {trace.max_tokens} tokens"
    figure.suptitle(title + ": dominant expert per token", fontsize=10, y=0.995, va="top")
    figure.legend(handles=[Patch(color=c, label=n) for n, c in zip(names, colours)], loc="upper center",
                  ncols=min(len(names), 6), bbox_to_anchor=(0.5, 1.0 - 0.22 / (lines * cell_h + 0.6)),
                  frameon=False, fontsize=8)
    return _save(figure, path)


def plot_gate_strength(trace: RoutingTrace, path: str | Path) -> Path:
    """BTS: stitch x stream mean gate, the figure that says which expert streams the hub actually uses."""
    table = gate_strength_in_stream_order(trace)
    if table.empty:
        raise AnalysisError(f"gate strength needs a bts trace with stitch gates; this {trace.method} trace has none")
    rows = [f"stitch {s} (block {b}, {d})" for s, b, d in table.index]
    figure = Figure(figsize=(1.6 + 0.9 * len(table.columns), 1.0 + 0.35 * len(rows)))
    _annotated_heatmap(figure, table.values, rows, [str(c) for c in table.columns], "BTS stitch gates",
                       "mean gate", fmt="{:.2f}")
    return _save(figure, path)
