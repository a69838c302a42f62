"""Reductions of a `RoutingTrace`: what the report, the plots and the app show. Pure functions of the table."""

from __future__ import annotations

import math

import pandas as pd

from ..runtime.routed.routing_stats import dead_threshold
from .capture import RoutingTrace


def utilisation(trace: RoutingTrace) -> pd.DataFrame:
    """Router x expert: the share of that router's routed slots (token x k) that went to each expert."""
    names = trace.expert_names
    rows = {}
    for router, group in trace.routes.groupby("router", sort=False):
        counts = [0] * len(names)
        for experts in group["experts"]:
            for expert in experts:
                counts[expert] += 1
        total = max(sum(counts), 1)
        rows[router] = [c / total for c in counts]
    return pd.DataFrame.from_dict(rows, orient="index", columns=names)


def mean_token_entropy(trace: RoutingTrace) -> pd.Series:
    """Per router, the mean over tokens of the entropy of each token's router probabilities, normalised to [0, 1]:
    how undecided the router is per token (0 = always certain, 1 = uniform).

    Not the *load entropy* (`runtime.routed.routing_stats.RouterStats.entropy`, `load_entropy` in `evaluate`), the
    entropy of the share of slots each expert gets (1 = balanced): a router can be certain on every token and balanced."""
    size = len(trace.expert_names)

    def entropy(probs: list[float]) -> float:
        return -sum(p * math.log(p) for p in probs if p > 0) / math.log(size) if size > 1 else 0.0

    return trace.routes.groupby("router", sort=False)["probs"].apply(lambda col: sum(map(entropy, col)) / len(col))


def dominant_expert_per_token(trace: RoutingTrace) -> pd.DataFrame:
    """Per (text, token): the expert with the highest mean probability over all routers, and that probability."""
    rows = []
    for (text, position), group in trace.routes.groupby(["text_index", "position"], sort=True):
        mean = [sum(values) / len(group) for values in zip(*group["probs"])]
        best = max(range(len(mean)), key=mean.__getitem__)
        first = group.iloc[0]
        rows.append({"text_index": text, "position": position, "token": first["token"], "label": first["label"],
                     "dominant": trace.expert_names[best], "probability": mean[best]})
    return pd.DataFrame(rows)


def layer_agreement(trace: RoutingTrace) -> float:
    """Share of (token, consecutive router pair) where both routers' top expert is the same."""
    agree = total = 0
    for _, group in trace.routes.groupby(["text_index", "position"], sort=False):
        tops = list(group["dominant"])
        agree += sum(a == b for a, b in zip(tops, tops[1:]))
        total += max(len(tops) - 1, 0)
    return agree / total if total else float("nan")


def routing_by_label(trace: RoutingTrace) -> pd.DataFrame:
    """Label (domain) x expert: the share of that label's (token, router) pairs whose top expert is each expert."""
    routes = trace.routes[trace.routes["label"].notna()]
    table = pd.crosstab(routes["label"], routes["dominant"], normalize="index")
    return table.reindex(columns=trace.expert_names, fill_value=0.0)


def dead_experts(trace: RoutingTrace, threshold: float | None = None) -> dict[str, list[str]]:
    """Per router, the experts whose share of slots is under `threshold` (default 0.1 / E)."""
    threshold = threshold if threshold is not None else dead_threshold(len(trace.expert_names))
    shares = utilisation(trace)
    return {router: [e for e in shares.columns if row[e] < threshold] for router, row in shares.iterrows()}


def gate_strength(trace: RoutingTrace) -> pd.DataFrame:
    """BTS: stitch x stream, the mean gate value (how much each stream contributes or receives)."""
    if trace.gates.empty:
        return pd.DataFrame()
    return trace.gates.pivot_table(index=["stitch", "hub_block", "direction"], columns="stream", values="gate_mean",
                                   aggfunc="mean")
