"""A self-contained HTML routing report: one file with its data, styles and script inline, so it opens offline,
can be mailed or committed, and never runs the model itself (it only renders a `RoutingTrace` and its reductions).

The page is the Jinja2 template `templates/report.html.j2` (its SVG charts are the macros of `charts.html.j2`), with its
CSS and script as package data beside it; this module computes what the templates show (`report_context`)."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined

from ..analysis.capture import RoutingTrace
from ..analysis.ordering import gate_strength_in_stream_order, routers_in_order, routing_by_label_in_text_order
from ..analysis.reductions import (
    dead_experts, dominant_expert_per_token, layer_agreement, mean_token_entropy, utilisation,
)
from ..runtime.routed.routing_stats import dead_threshold
from .style import SEQUENTIAL, expert_colours, tint


def _json_for_script(data: object) -> str:
    """JSON that cannot end its `<script>` element early, whatever the token texts contain."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if value is not None and math.isfinite(value) else None


def _text_width(labels: list[str], per_char: float = 6.6, minimum: float = 40) -> float:
    """Pixels a chart leaves for the longest of `labels` (11.5px text)."""
    return max([minimum] + [len(label) * per_char + 12 for label in labels])


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def _percent(value: float, digits: int = 0) -> str:
    return f"{value:.{digits}%}"


def _bin_counts(values: list[float], bins: int = 20) -> list[int]:
    """How many of `values` (in [0, 1]) fall in each of `bins` equal bins."""
    counts = [0] * bins
    for value in values:
        counts[min(int(value * bins), bins - 1)] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------------------
# Templates


def _inline(name: str) -> str:
    """A static file of the templates folder (CSS, script), for the template to write into the page as is."""
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The views' Jinja2 environment: templates from package data, HTML-escaped by default."""
    env = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.globals.update(inline=_inline, text_width=_text_width, tint=tint, clamp=_clamp, sequential=SEQUENTIAL,
                       zip=zip)
    env.filters["percent"] = _percent
    return env


def render_template(name: str, **context: object) -> str:
    """Render one of the views' templates (`report.html.j2`, the app's pages) with `context`."""
    return environment().get_template(name).render(**context)


# ----------------------------------------------------------------------------------------------------------------------
# Data for the page's script: per text and router, the routed experts, weights and probabilities; BTS gates


def _token_table(trace: RoutingTrace) -> pd.DataFrame:
    """One row per analysed (text, token), from whichever table the model filled (routes, or gates for BTS)."""
    source = trace.routes if len(trace.routes) else trace.gates
    if source.empty:
        return pd.DataFrame(columns=["text_index", "position", "token", "image"])
    table = source.drop_duplicates(["text_index", "position"]).sort_values(["text_index", "position"])
    image = table["image"].astype(bool) if "image" in table else False  # traces captured before image labels
    return table[["text_index", "position", "token"]].assign(image=image)


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


def _texts(trace: RoutingTrace, tokens: pd.DataFrame) -> list[dict]:
    """Every text with its (position, token, is image) triples, for the template's token spans (routing, or gates for
    BTS); image positions get their own style."""
    by_text = {text: group for text, group in tokens.groupby("text_index")}
    texts = []
    for i, (text, label) in enumerate(zip(trace.texts, trace.labels)):
        group = by_text.get(i, tokens.iloc[0:0])
        texts.append({"index": i, "label": label, "chars": len(text),
                      "truncated": bool(i < len(trace.truncated) and trace.truncated[i]),
                      "tokens": [(int(pos), token, bool(image)) for pos, token, image in
                                 zip(group["position"], group["token"], group["image"])]})
    return texts


def _routing_context(trace: RoutingTrace, routers: list[dict]) -> dict:
    layers = [(layer, list(members)) for layer, members in
              pd.Series(range(len(routers)), index=[r["layer"] for r in routers]).groupby(level=0)]
    shares = utilisation(trace)
    entropy = mean_token_entropy(trace)
    dead = dead_experts(trace)
    context = {
        "layers": layers,
        "labels": [router["label"] for router in routers],
        "utilisation": shares.loc[[r["name"] for r in routers]].values.tolist(),
        "mean_token_entropy": [float(entropy[r["name"]]) for r in routers],
        "top1_counts": _bin_counts([weights[0] for weights in trace.routes["weights"]]),
        "dead": [(r["label"], dead[r["name"]]) for r in routers if dead.get(r["name"])],
        "dead_threshold": dead_threshold(len(trace.expert_names)),
        "by_label": None,
    }
    if any(label is not None for label in trace.labels):
        by_label = routing_by_label_in_text_order(trace)
        context["by_label"] = {"labels": [str(x) for x in by_label.index], "shares": by_label.values.tolist()}
    return context


def _gate_context(trace: RoutingTrace, keys: list[dict]) -> dict:
    strength = gate_strength_in_stream_order(trace)
    return {"stitch_streams": keys, "rows": [f"stitch {s} · block {b} · {d}" for s, b, d in strength.index],
            "streams": [str(c) for c in strength.columns],
            "strength": [[_finite(v) for v in row] for row in strength.values.tolist()]}


def report_context(trace: RoutingTrace, title: str = "MixtureKit routing report") -> dict:
    """Everything `report.html.j2` shows: the trace's reductions, charts and the script's data."""
    names = trace.expert_names
    routers = routers_in_order(trace)
    tokens = _token_table(trace)
    data = _page_data(trace, routers, tokens)
    agreement = layer_agreement(trace) if len(trace.routes) else float("nan")
    return {
        "title": title, "method": trace.method, "experts": names,
        "expert_history": list(getattr(trace, "expert_history", None) or []),
        "expert_colours": list(zip(names, expert_colours(len(names)))), "routers": routers,
        "texts": _texts(trace, tokens), "token_count": len(tokens), "max_tokens": trace.max_tokens,
        "stitch_count": len({k["stitch"] for k in data["gateKeys"]}),
        "agreement": agreement if math.isfinite(agreement) else None, "truncated_count": sum(trace.truncated),
        "routing": _routing_context(trace, routers) if routers else None,
        "gates": _gate_context(trace, data["gateKeys"]) if data["gateKeys"] else None,
        "data_json": (_json_for_script(data)),
    }


def render_report(trace: RoutingTrace, title: str = "MixtureKit routing report") -> str:
    """The whole report as one HTML string: data, styles and script inline, no network access when opened."""
    return render_template("report.html.j2", **report_context(trace, title))


def write_report(trace: RoutingTrace, path: str | Path, title: str = "MixtureKit routing report") -> Path:
    """Write `render_report` to `path` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(trace, title=title), encoding="utf-8")
    return path
