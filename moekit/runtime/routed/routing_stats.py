"""Routing statistics kept while a model runs: per router, how the routed slots spread over the experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .balance import routed_tokens, slot_counts


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


DEAD_SHARE = 0.1  # an expert is dead under a tenth of the uniform share of a router's slots


def dead_threshold(num_experts: int) -> float:
    """The share of a router's slots under which an expert counts as dead, everywhere the library reports it."""
    return DEAD_SHARE / num_experts


class RoutingStatistics:
    """Accumulates slot counts per router (no gradient, no synchronisation until `summary`)."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        # the weighted balance loss of the training forwards since reset: a running sum, so a loop that never resets
        # keeps one number, and it stays on its device (no synchronisation until read)
        self.aux_loss_sum: torch.Tensor | None = None
        self.aux_loss_count = 0

    def add_aux_loss(self, aux_loss: torch.Tensor) -> None:
        value = aux_loss.detach().float()
        self.aux_loss_sum = value if self.aux_loss_sum is None else self.aux_loss_sum + value.to(self.aux_loss_sum.device)
        self.aux_loss_count += 1

    def mean_aux_loss(self) -> float | None:
        return None if self.aux_loss_sum is None else self.aux_loss_sum.item() / self.aux_loss_count

    def add(self, name: str, router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None,
            expert_bias: torch.Tensor | None = None) -> None:
        """Count this step's choices of one router (the tokens where `mask` is true), with its selection bias."""
        self.add_counts(name, slot_counts(routed_tokens(router_logits, mask), top_k, expert_bias))

    def add_counts(self, name: str, counts: torch.Tensor) -> None:
        """Add slot counts per expert already taken (by the training forward, summed over ranks). They stay on
        their device until `summary`, so counting costs no synchronisation."""
        counts = counts.detach().float()
        previous = self.counts.get(name)
        self.counts[name] = counts.clone() if previous is None else previous + counts.to(previous.device)

    def reset(self) -> None:
        self.counts = {}
        self.aux_loss_sum, self.aux_loss_count = None, 0

    def summary(self) -> list[RouterStats]:
        out = []
        for name, counts in self.counts.items():
            counts = counts.cpu()
            total = counts.sum().item()
            out.append(RouterStats(name, (counts / max(total, 1)).tolist(), int(total)))
        return out
