"""Routing statistics kept while a model runs: per router, how the routed slots spread over the experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RouterStats:
    """One router over a window of steps: the share of routed slots per expert and what follows from it."""

    name: str
    load: list[float]  # fraction of slots per expert, sums to 1
    tokens: int

    @property
    def entropy(self) -> float:
        """Entropy of the load, normalised to [0, 1] (1 = perfectly balanced)."""
        h = -sum(p * math.log(p) for p in self.load if p > 0)
        return h / math.log(len(self.load)) if len(self.load) > 1 else 1.0

    @property
    def max_load(self) -> float:
        return max(self.load)

    def dead_experts(self, threshold: float) -> list[int]:
        return [i for i, p in enumerate(self.load) if p < threshold]


class RoutingStatistics:
    """Accumulates slot counts per router (no gradient, one `bincount` per router and step)."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Count this step's choices of one router; return its per-expert load for this step."""
        with torch.no_grad():
            logits = router_logits.reshape(-1, router_logits.shape[-1])
            if mask is not None:
                logits = logits[mask.reshape(-1).bool()]
            chosen = torch.topk(logits, top_k, dim=-1).indices.reshape(-1)
            counts = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        self.add_counts(name, counts)
        return (counts / counts.sum().clamp(min=1)).cpu()

    def add_counts(self, name: str, counts: torch.Tensor) -> None:
        """Add slot counts per expert already taken (by the training forward, summed over ranks). They stay on
        their device until `summary`, so counting costs no synchronisation."""
        counts = counts.detach().float()
        previous = self.counts.get(name)
        self.counts[name] = counts.clone() if previous is None else previous + counts.to(previous.device)

    def reset(self) -> None:
        self.counts = {}

    def summary(self) -> list[RouterStats]:
        out = []
        for name, counts in self.counts.items():
            counts = counts.cpu()
            total = counts.sum().item()
            out.append(RouterStats(name, (counts / max(total, 1)).tolist(), int(total)))
        return out
