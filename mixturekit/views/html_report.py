"""A self-contained HTML routing report: one file with its data, styles and script inline, so it opens offline,
can be mailed or committed, and never runs the model itself (it only renders a `RoutingTrace` and its reductions)."""

from __future__ import annotations

import colorsys
import html
import json
import math
from pathlib import Path

import pandas as pd

from ..analysis.capture import RoutingTrace
from ..analysis.reductions import (
    dead_experts, dominant_expert_per_token, gate_strength, layer_agreement, routing_by_label, routing_entropy,
    utilisation,
)
from ..runtime.routing_stats import dead_threshold

# Tableau 10: distinguishable for most colour-vision deficiencies and printable; shared with the PNG plots.
_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
            "#bab0ac"]
_SEQUENTIAL = "#2166ac"  # one hue from white for shares, entropies and gate values


def expert_colours(count: int) -> list[str]:
    """One colour per expert: the fixed palette first, then evenly spaced hues, so every view agrees on colours."""
    colours = _PALETTE[:count]
    for index in range(len(colours), count):
        red, green, blue = colorsys.hls_to_rgb((index * 0.618034) % 1.0, 0.5, 0.55)
        colours.append(f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}")
    return colours


def router_label(name: str, layer: int, module: str) -> str:
    """A short name for a router: its block and module (`L3 · mlp.up_proj`), or its full name when it has no block."""
    return f"L{layer} · {module}" if layer >= 0 else name


def _tint(colour: str, strength: float) -> str:
    """`colour` mixed with white: 0 is white, 1 the full colour (the scale every heatmap cell uses)."""
    strength = min(max(strength, 0.0), 1.0)
    channels = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 + (c - 255) * strength):02x}" for c in channels)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _json_for_script(data: object) -> str:
    """JSON that cannot end its `<script>` element early, whatever the token texts contain."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if value is not None and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------------------
# Inline SVG charts (static: they show whole-trace reductions, so they need no script)


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_esc(label)}">' + "".join(body) + "</svg>")


def _text_width(labels: list[str], per_char: float = 6.6, minimum: float = 40) -> float:
    return max([minimum] + [len(label) * per_char + 12 for label in labels])


def _heatmap_svg(rows: list[str], columns: list[str], values: list[list[float | None]], label: str,
                 row_attrs: list[str] | None = None, maximum: float = 1.0, percent: bool = True) -> str:
    """Rows x columns cells shaded from white (0) to dark (`maximum`), each with its value written in."""
    left, top, cell_h = _text_width(rows), 28, 22
    cell_w = _text_width(columns, minimum=74)
    body = []
    for j, column in enumerate(columns):
        body.append(f'<text x="{left + j * cell_w + cell_w / 2:.1f}" y="18" text-anchor="middle" '
                    f'class="axis">{_esc(column)}</text>')
    for i, row in enumerate(rows):
        y = top + i * cell_h
        attrs = row_attrs[i] if row_attrs else ""
        body.append(f'<g class="row"{attrs}><text x="{left - 6:.1f}" y="{y + 15}" text-anchor="end" '
                    f'class="axis">{_esc(row)}</text>')
        for j, value in enumerate(values[i]):
            x = left + j * cell_w
            if value is None:
                body.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="#f3f3f3"/>'
                            f'<text x="{x + cell_w / 2 - 1:.1f}" y="{y + 15}" text-anchor="middle" '
                            'class="cell">–</text>')
                continue
            strength = value / maximum if maximum else 0.0
            ink = "#fff" if strength > 0.55 else "#222"
            shown = f"{value:.0%}" if percent else f"{value:.2f}"
            body.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" '
                        f'fill="{_tint(_SEQUENTIAL, 0.9 * strength)}"><title>{_esc(row)} / {_esc(column)}: '
                        f'{_esc(shown)}</title></rect><text x="{x + cell_w / 2 - 1:.1f}" y="{y + 15}" '
                        f'text-anchor="middle" class="cell" fill="{ink}">{_esc(shown)}</text>')
        body.append("</g>")
    return _svg(left + len(columns) * cell_w + 4, top + len(rows) * cell_h + 4, body, label)


def _bars_svg(labels: list[str], values: list[float], label: str, row_attrs: list[str] | None = None) -> str:
    """Horizontal bars on a fixed 0..1 axis, so bars of different reports compare by eye."""
    left, width, bar_h = _text_width(labels), 260, 20
    body = []
    for i, (name, value) in enumerate(zip(labels, values)):
        y = 4 + i * bar_h
        attrs = row_attrs[i] if row_attrs else ""
        body.append(f'<g class="row"{attrs}><text x="{left - 6:.1f}" y="{y + 14}" text-anchor="end" '
                    f'class="axis">{_esc(name)}</text><rect x="{left}" y="{y + 2}" width="{width}" '
                    f'height="{bar_h - 6}" fill="#f0f0f0"/><rect x="{left}" y="{y + 2}" '
                    f'width="{width * min(max(value, 0.0), 1.0):.1f}" height="{bar_h - 6}" fill="{_SEQUENTIAL}"/>'
                    f'<text x="{left + width + 6}" y="{y + 14}" class="axis">{value:.2f}</text></g>')
    return _svg(left + width + 46, 8 + len(labels) * bar_h, body, label)


def _stacked_svg(labels: list[str], shares: list[list[float]], names: list[str], colours: list[str],
                 label: str) -> str:
    """One bar per label split into the experts' shares, so a domain's preferred expert stands out."""
    left, width, bar_h = _text_width(labels), 420, 26
    body = []
    for i, (name, row) in enumerate(zip(labels, shares)):
        y = 4 + i * bar_h
        body.append(f'<text x="{left - 6:.1f}" y="{y + 17}" text-anchor="end" class="axis">{_esc(name)}</text>')
        x = float(left)
        for expert, colour, share in zip(names, colours, row):
            segment = width * share
            body.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{segment:.1f}" height="{bar_h - 6}" fill="{colour}">'
                        f'<title>{_esc(name)} → {_esc(expert)}: {share:.0%}</title></rect>')
            if segment > 34:
                body.append(f'<text x="{x + segment / 2:.1f}" y="{y + 17}" text-anchor="middle" '
                            f'class="cell">{share:.0%}</text>')
            x += segment
    return _svg(left + width + 8, 8 + len(labels) * bar_h, body, label)


def _histogram_svg(values: list[float], label: str, bins: int = 20) -> str:
    """Counts of `values` in equal bins over [0, 1], with the axis drawn so the spread reads at a glance."""
    counts = [0] * bins
    for value in values:
        counts[min(int(value * bins), bins - 1)] += 1
    left, bottom, width, height = 44, 150, 400, 130
    peak = max(counts) or 1
    body = [f'<line x1="{left}" y1="{bottom}" x2="{left + width}" y2="{bottom}" stroke="#888"/>']
    for i, count in enumerate(counts):
        bar = height * count / peak
        x = left + i * width / bins
        body.append(f'<rect x="{x + 1:.1f}" y="{bottom - bar:.1f}" width="{width / bins - 2:.1f}" height="{bar:.1f}" '
                    f'fill="{_SEQUENTIAL}"><title>{i / bins:.2f}–{(i + 1) / bins:.2f}: {count}</title></rect>')
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        body.append(f'<text x="{left + tick * width:.1f}" y="{bottom + 16}" text-anchor="middle" '
                    f'class="axis">{tick:g}</text>')
    body.append(f'<text x="{left - 6}" y="{bottom - height + 10}" text-anchor="end" class="axis">{peak}</text>'
                f'<text x="{left - 6}" y="{bottom}" text-anchor="end" class="axis">0</text>'
                f'<text x="{left + width / 2}" y="{bottom + 32}" text-anchor="middle" class="axis">'
                'top-1 weight (renormalised over the chosen experts)</text>')
    return _svg(left + width + 12, bottom + 40, body, label)


# ----------------------------------------------------------------------------------------------------------------------
# Data for the page's script: per text and router, the routed experts, weights and probabilities; BTS gates


def _token_table(trace: RoutingTrace) -> pd.DataFrame:
    """One row per analysed (text, token), from whichever table the model filled (routes, or gates for BTS)."""
    source = trace.routes if len(trace.routes) else trace.gates
    if source.empty:
        return pd.DataFrame(columns=["text_index", "position", "token"])
    return source.drop_duplicates(["text_index", "position"]).sort_values(["text_index", "position"])[
        ["text_index", "position", "token"]]


def _page_data(trace: RoutingTrace, routers: list[dict], tokens: pd.DataFrame) -> dict:
    names = trace.expert_names
    counts = tokens.groupby("text_index").size().to_dict()
    texts = [{"label": label, "truncated": bool(trace.truncated[i]) if i < len(trace.truncated) else False,
              "tokens": int(counts.get(i, 0))} for i, label in enumerate(trace.labels)]
    routes: list[list[dict]] = [[{"e": [], "w": [], "p": []} for _ in routers] for _ in trace.texts]
    dominant: list[list] = [[] for _ in trace.texts]
    if len(trace.routes):
        index = {router["name"]: i for i, router in enumerate(routers)}
        for (text, router), group in trace.routes.groupby(["text_index", "router"], sort=False):
            group = group.sort_values("position")
            routes[text][index[router]] = {
                "e": [list(map(int, e)) for e in group["experts"]],
                "w": [[_finite(w, 3) for w in weights] for weights in group["weights"]],
                "p": [[_finite(p, 3) for p in probs] for probs in group["probs"]],
            }
        for row in dominant_expert_per_token(trace).itertuples():
            dominant[row.text_index].append([names.index(row.dominant), _finite(row.probability, 3)])
    keys, gates = [], [[] for _ in trace.texts]
    if not trace.gates.empty:
        columns = ["stitch", "hub_block", "direction", "stream"]
        order = list(dict.fromkeys(map(tuple, trace.gates[columns].itertuples(index=False))))
        keys = [{"stitch": int(s), "hub_block": int(b), "direction": d, "stream": st} for s, b, d, st in order]
        position = {key: k for k, key in enumerate(order)}
        for text in range(len(trace.texts)):
            gates[text] = [[] for _ in order]
        for (text, *key), group in trace.gates.groupby(["text_index", *columns], sort=False):
            group = group.sort_values("position")
            gates[text][position[tuple(key)]] = [[_finite(m, 3), _finite(s, 3)]
                                                 for m, s in zip(group["gate_mean"], group["gate_std"])]
    return {"experts": names, "colours": expert_colours(len(names)), "routers": routers, "texts": texts,
            "routes": routes, "dominant": dominant, "gateKeys": keys, "gates": gates}


# ----------------------------------------------------------------------------------------------------------------------
# The page


def _tokens_html(trace: RoutingTrace, tokens: pd.DataFrame, css_class: str) -> str:
    """Every text as a run of escaped token spans; the script colours them (routing, or gates for BTS)."""
    parts = []
    by_text = {text: group for text, group in tokens.groupby("text_index")}
    for i, (text, label) in enumerate(zip(trace.texts, trace.labels)):
        group = by_text.get(i, tokens.iloc[0:0])
        caption = f"text {i + 1}" + (f" · {label}" if label is not None else "") + f" · {len(group)} tokens"
        note = ""
        if i < len(trace.truncated) and trace.truncated[i]:
            note = (f'<p class="truncated-note">Truncated: only the first {trace.max_tokens} tokens of this text '
                    f'({len(text)} characters) were analysed.</p>')
        spans = "".join(f'<span class="{css_class}" data-text="{i}" data-pos="{int(pos)}">{_esc(token)}</span>'
                        for pos, token in zip(group["position"], group["token"]))
        parts.append(f'<div class="text-block"><div class="caption">{_esc(caption)}</div>{note}'
                     f'<div class="tokens">{spans}</div></div>')
    return "".join(parts)


def routing_by_label_in_text_order(trace: RoutingTrace) -> pd.DataFrame:
    """`routing_by_label` with the labels in the order the texts gave them, not sorted."""
    table = routing_by_label(trace)
    return table.reindex([label for label in dict.fromkeys(trace.labels) if label in table.index])


def gate_strength_in_stream_order(trace: RoutingTrace) -> pd.DataFrame:
    """`gate_strength` with its columns as the model orders streams (hub, then the experts), not sorted."""
    table = gate_strength(trace)
    return table[[s for s in ["hub", *trace.expert_names] if s in table.columns]] if not table.empty else table


def _legend(names: list[str], colours: list[str]) -> str:
    return "".join(f'<span class="chip"><span class="swatch" style="background:{c}"></span>{_esc(n)}</span>'
                   for n, c in zip(names, colours))


def _routing_sections(trace: RoutingTrace, routers: list[dict], tokens: pd.DataFrame) -> str:
    names, colours = trace.expert_names, expert_colours(len(trace.expert_names))
    labels = [router["label"] for router in routers]
    attrs = [f' data-router="{i}"' for i in range(len(routers))]
    options = ['<option value="all">all routers (mean probability)</option>']
    for layer, members in pd.Series(range(len(routers)), index=[r["layer"] for r in routers]).groupby(level=0):
        options.append(f'<optgroup label="layer {layer}">' + "".join(
            f'<option value="{i}">{_esc(labels[i])}</option>' for i in members) + "</optgroup>")
    shares = utilisation(trace)
    entropy = routing_entropy(trace)
    top1 = [weights[0] for weights in trace.routes["weights"]]
    dead = dead_experts(trace)
    dead_items = "".join(f"<li><b>{_esc(labels[i])}</b>: {_esc(', '.join(dead[r['name']]))}</li>"
                         for i, r in enumerate(routers) if dead.get(r["name"]))
    threshold = dead_threshold(len(names))
    dead_html = (f'<ul id="dead-list">{dead_items}</ul>' if dead_items else
                 '<p id="dead-list">No dead expert: every expert gets at least '
                 f'{threshold:.1%} of every router\'s slots.</p>')
    sections = [
        f'''<section id="tokens-section"><h2>Tokens by routed expert</h2>
<div class="controls"><label>Router <select id="router-select">{"".join(options)}</select></label>
<span class="legend">{_legend(names, colours)}</span></div>
<p class="hint">Colour: the selected router's top expert (all routers: the expert with the highest mean probability);
stronger colour means a higher probability. Hover a token for every router's top experts and weights.</p>
{_tokens_html(trace, tokens, "tok")}</section>''',
        f'''<div class="grid"><section id="utilisation-section"><h2>Utilisation: router × expert</h2>
<p class="hint">Share of each router's routed slots (tokens × top-k) that went to each expert; click a row to colour
the tokens by that router.</p>
{_heatmap_svg(labels, names, shares.loc[[r["name"] for r in routers]].values.tolist(), "utilisation heatmap",
              attrs)}</section>
<section id="entropy-section"><h2>Routing entropy per router</h2>
<p class="hint">Mean entropy of the router's probabilities, normalised: 0 = always certain, 1 = uniform.</p>
{_bars_svg(labels, [float(entropy[r["name"]]) for r in routers], "entropy per router", attrs)}</section>
<section id="top1-section"><h2>Top-1 weights</h2>
<p class="hint">How decisively each token is routed, over all {len(routers)} routers.</p>
{_histogram_svg(top1, "distribution of top-1 weights")}</section>
<section id="dead-section"><h2>Dead experts</h2>
<p class="hint">Experts under {threshold:.1%} of a router's slots (0.1 / number of experts).</p>
{dead_html}</section>''',
    ]
    if any(label is not None for label in trace.labels):
        by_label = routing_by_label_in_text_order(trace)
        sections.append(f'''<section id="labels-section"><h2>Routing by label</h2>
<p class="hint">Per label (domain), the share of (token, router) pairs whose top expert is each expert.</p>
<div class="legend">{_legend(names, colours)}</div>
{_stacked_svg([str(x) for x in by_label.index], by_label.values.tolist(), names, colours, "routing by label")}
</section>''')
    sections.append("</div>")
    return "\n".join(sections)


def _gate_sections(trace: RoutingTrace, keys: list[dict], tokens: pd.DataFrame) -> str:
    strength = gate_strength_in_stream_order(trace)
    rows = [f"stitch {s} · block {b} · {d}" for s, b, d in strength.index]
    values = [[_finite(v) for v in row] for row in strength.values.tolist()]
    options = "".join(f'<option value="{k}">stitch {key["stitch"]} (block {key["hub_block"]}, {_esc(key["direction"])})'
                      f' · {_esc(key["stream"])}</option>' for k, key in enumerate(keys))
    return f'''<section id="gates-section"><h2>BTS stitch gates</h2>
<p class="hint">Mean gate per stitch and stream. Broadcast stitches: how much of the hub each expert stream takes in
(sigmoid). Merge stitches: how much of each stream the hub keeps (softmax over hub and experts, sums to 1).</p>
{_heatmap_svg(rows, [str(c) for c in strength.columns], values, "gate strength per stitch", percent=False)}
<h3>Gate per token</h3>
<div class="controls"><label>Stitch / stream <select id="gate-select">{options}</select></label>
<span class="legend"><span class="ramp"></span> 0 → 1</span></div>
{_tokens_html(trace, tokens, "gtok")}</section>'''


def render_report(trace: RoutingTrace, title: str = "MixtureKit routing report") -> str:
    """The whole report as one HTML string: data, styles and script inline, no network access when opened."""
    names = trace.expert_names
    routers = []
    if len(trace.routes):
        parts = trace.routes.drop_duplicates("router")[["router", "layer", "module"]]
        routers = [{"name": r, "layer": int(l), "module": m, "label": router_label(r, int(l), m)}
                   for r, l, m in parts.itertuples(index=False)]
    tokens = _token_table(trace)
    data = _page_data(trace, routers, tokens)
    agreement = layer_agreement(trace) if len(trace.routes) else float("nan")
    facts = [f"method <b>{_esc(trace.method)}</b>", f"{len(names)} experts", f"{len(trace.texts)} texts",
             f"{len(tokens)} tokens", f"{len(routers)} routers"]
    if data["gateKeys"]:
        facts.append(f"{len({k['stitch'] for k in data['gateKeys']})} stitches")
    if math.isfinite(agreement):
        facts.append(f"consecutive routers agree on the top expert for {agreement:.0%} of token pairs")
    if any(trace.truncated):
        facts.append(f'<span class="truncated-note">{sum(trace.truncated)} text(s) truncated to '
                     f'{trace.max_tokens} tokens</span>')
    body = [f'<header><h1>{_esc(title)}</h1><p class="facts">{" · ".join(facts)}</p>'
            '<noscript><p class="js-note">Enable JavaScript to colour the tokens.</p></noscript></header>']
    if routers:
        body.append(_routing_sections(trace, routers, tokens))
    else:
        body.append('<section><h2>Routing</h2><p class="hint">This model has no routers (BTS mixes whole expert '
                    'streams through stitch gates, shown below).</p></section>')
    if data["gateKeys"]:
        body.append(_gate_sections(trace, data["gateKeys"], tokens))
    return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>{"".join(body)}
<div id="tooltip" role="tooltip" hidden></div>
<script id="report-data" type="application/json">{_json_for_script(data)}</script>
<script>{_SCRIPT}</script></body></html>
'''


def write_report(trace: RoutingTrace, path: str | Path, title: str = "MixtureKit routing report") -> Path:
    """Write `render_report` to `path` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(trace, title=title), encoding="utf-8")
    return path


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0 auto;
       max-width: 1200px; padding: 12px 20px 40px; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 16px; margin: 0 0 4px; } h3 { font-size: 14px; }
section { border: 1px solid #e3e3e3; border-radius: 6px; padding: 10px 14px; margin: 10px 0; background: #fff; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 0 12px; }
.grid section { margin: 6px 0; overflow-x: auto; }
.facts { color: #555; margin: 0; } .hint { color: #666; font-size: 12.5px; margin: 2px 0 8px; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 14px; margin: 4px 0; }
select { font: inherit; padding: 2px 4px; }
.legend { display: inline-flex; flex-wrap: wrap; gap: 10px; }
.chip { display: inline-flex; align-items: center; gap: 4px; }
.swatch { width: 12px; height: 12px; border-radius: 2px; display: inline-block; }
.ramp { width: 90px; height: 12px; display: inline-block; background: linear-gradient(90deg, #fff, #2166ac);
        border: 1px solid #ccc; }
.text-block { margin: 8px 0; } .caption { font-size: 12px; color: #666; }
.tokens { font: 13px/1.9 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; white-space: pre-wrap;
          word-break: break-all; border-left: 3px solid #eee; padding-left: 8px; }
.tok, .gtok { border-radius: 2px; padding: 1px 0; box-shadow: inset -1px 0 rgba(0,0,0,.12); cursor: default; }
.tok:empty::before, .gtok:empty::before { content: "\\2205"; color: #999; }
.tok:hover, .gtok:hover { outline: 2px solid #222; }
.truncated-note, .js-note { color: #9a3412; background: #fff7ed; border: 1px solid #fdba74; border-radius: 4px;
                  padding: 2px 6px; display: inline-block; margin: 2px 0; }
svg text.axis { font-size: 11.5px; fill: #333; } svg text.cell { font-size: 11px; }
svg g.row { cursor: pointer; } svg g.row.selected text.axis { font-weight: 700; fill: #000; }
svg g.row.selected rect { stroke: #222; stroke-width: 1; }
#dead-list { margin: 0; }
#tooltip { position: fixed; z-index: 10; background: #fff; border: 1px solid #bbb; border-radius: 4px;
           box-shadow: 0 2px 8px rgba(0,0,0,.18); padding: 6px 8px; font-size: 12px; max-width: 460px;
           pointer-events: none; max-height: 90vh; overflow: hidden; }
#tooltip table { border-collapse: collapse; } #tooltip td { padding: 0 6px 0 0; white-space: nowrap; }
#tooltip tr.selected td { font-weight: 700; } #tooltip .head { font-weight: 600; margin-bottom: 3px; }
"""

# The page's only behaviour: colour token spans from the embedded data, follow the selectors, and show hover details.
# Token text is never inserted as HTML (textContent only), so a token such as "<script>" stays text.
_SCRIPT = """
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const GATE_COLOUR = "#2166ac";

function mix(hex, strength) {
  // hex mixed with white; returns [css colour, whether dark text still reads on it]
  const s = Math.min(Math.max(strength, 0), 1);
  const rgb = [1, 3, 5].map(i => Math.round(255 + (parseInt(hex.slice(i, i + 2), 16) - 255) * s));
  const light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140;
  return ["rgb(" + rgb.join(", ") + ")", light];
}

function paint(span, hex, strength) {
  const [colour, light] = mix(hex, strength);
  span.style.backgroundColor = colour;
  span.style.color = light ? "#111" : "#fff";
}

function topOf(text, pos, router) {
  // [expert index, probability] of the selected router, or the all-router dominant expert from the analysis
  if (router === "all") return DATA.dominant[text][pos];
  const r = DATA.routes[text][router];
  const expert = r.e[pos][0];
  return [expert, r.p[pos][expert]];
}

function colourTokens() {
  const select = document.getElementById("router-select");
  const router = select.value === "all" ? "all" : Number(select.value);
  for (const span of document.querySelectorAll("span.tok")) {
    const [expert, probability] = topOf(Number(span.dataset.text), Number(span.dataset.pos), router);
    paint(span, DATA.colours[expert], 0.15 + 0.75 * probability);
  }
  for (const row of document.querySelectorAll("g.row[data-router]")) {
    row.classList.toggle("selected", String(router) === row.dataset.router);
  }
}

function colourGates() {
  const key = Number(document.getElementById("gate-select").value);
  for (const span of document.querySelectorAll("span.gtok")) {
    const [mean] = DATA.gates[Number(span.dataset.text)][key][Number(span.dataset.pos)];
    paint(span, GATE_COLOUR, 0.05 + 0.85 * (mean ?? 0));
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function routingDetails(tip, text, pos) {
  const selected = document.getElementById("router-select").value;
  const [dominant, probability] = DATA.dominant[text][pos];
  const table = document.createElement("table");
  DATA.routers.forEach((router, i) => {
    const r = DATA.routes[text][i];
    const row = table.insertRow();
    if (String(i) === selected) row.className = "selected";
    cell(row, router.label);
    cell(row, r.e[pos].map((e, k) => DATA.experts[e] + " " + r.w[pos][k].toFixed(2)).join("  ·  "));
  });
  const summary = document.createElement("div");
  summary.textContent = "all routers: " + DATA.experts[dominant] + " (mean p " + probability.toFixed(2) + ")";
  tip.append(table, summary);
}

function gateDetails(tip, text, pos) {
  const chosen = DATA.gateKeys[Number(document.getElementById("gate-select").value)];
  const table = document.createElement("table");
  DATA.gateKeys.forEach((key, k) => {
    if (key.stitch !== chosen.stitch) return;
    const [mean, std] = DATA.gates[text][k][pos];
    const row = table.insertRow();
    if (key === chosen) row.className = "selected";
    cell(row, "stitch " + key.stitch + " · " + key.stream);
    cell(row, mean === null ? "–" : mean.toFixed(3) + " ± " + (std ?? 0).toFixed(3));
  });
  tip.append(table);
}

function showTip(event) {
  const span = event.target.closest("span.tok, span.gtok");
  const tip = document.getElementById("tooltip");
  if (!span) { tip.hidden = true; return; }
  const text = Number(span.dataset.text), pos = Number(span.dataset.pos);
  const head = document.createElement("div");
  head.className = "head";
  const label = DATA.texts[text].label;
  head.textContent = JSON.stringify(span.textContent) + " · position " + pos + (label === null ? "" : " · " + label);
  tip.replaceChildren(head);
  (span.classList.contains("tok") ? routingDetails : gateDetails)(tip, text, pos);
  tip.hidden = false;
  const box = tip.getBoundingClientRect();
  tip.style.left = Math.max(4, Math.min(event.clientX + 12, window.innerWidth - box.width - 8)) + "px";
  tip.style.top = (event.clientY + 16 + box.height > window.innerHeight ? event.clientY - box.height - 10
                                                                       : event.clientY + 16) + "px";
}

const routerSelect = document.getElementById("router-select");
if (routerSelect) {
  routerSelect.addEventListener("change", colourTokens);
  for (const row of document.querySelectorAll("g.row[data-router]")) {
    row.addEventListener("click", () => { routerSelect.value = row.dataset.router; colourTokens(); });
  }
  colourTokens();
}
const gateSelect = document.getElementById("gate-select");
if (gateSelect) {
  gateSelect.addEventListener("change", colourGates);
  colourGates();
}
document.addEventListener("mouseover", showTip);
"""
