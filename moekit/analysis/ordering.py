"""The order and names in which views show a trace's routers, labels and streams: the order the model and the texts
give them (layer by layer, labels as first met, hub before experts), never sorted by name, so every view agrees."""

from __future__ import annotations

import pandas as pd

from .capture import RoutingTrace
from .reductions import gate_strength, routing_by_label


def router_label(name: str, layer: int, module: str) -> str:
    """A short name for a router: its block and module (`L3 · mlp.up_proj`), or its full name when it has no block."""
    return f"L{layer} · {module}" if layer >= 0 else name


def routers_in_order(trace: RoutingTrace) -> list[dict]:
    """The trace's routers in the model's order, each as `{name, layer, module, label}`."""
    if trace.routes.empty:
        return []
    parts = trace.routes.drop_duplicates("router")[["router", "layer", "module"]]
    return [{"name": r, "layer": int(l), "module": m, "label": router_label(r, int(l), m)}
            for r, l, m in parts.itertuples(index=False)]


def routing_by_label_in_text_order(trace: RoutingTrace) -> pd.DataFrame:
    """`routing_by_label` with the labels in the order the texts gave them, not sorted."""
    table = routing_by_label(trace)
    return table.reindex([label for label in dict.fromkeys(trace.labels) if label in table.index])


def gate_strength_in_stream_order(trace: RoutingTrace) -> pd.DataFrame:
    """`gate_strength` with its columns as the model orders streams (hub, then the experts), not sorted."""
    table = gate_strength(trace)
    return table[[s for s in ["hub", *trace.expert_names] if s in table.columns]] if not table.empty else table
