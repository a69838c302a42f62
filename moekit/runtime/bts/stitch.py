"""BTS stitch layers: exchange hidden states between the hub and the expert streams after a hub block.

The paper's forms are `h_hub = g_0 h_hub + sum_i g_i P_i(h_i)` with `g = softmax(W h_hub)` over [hub, experts]
(experts into hub, "merge") and `h_i = (1 - g_i) h_i + g_i P_i(h_hub)` with `g_i = sigmoid(W_i h_hub)` (hub into
experts, "broadcast"). We write each as the stream's own state plus a gated delta with a learnable per-dimension
`scale` initialised to 0:

    merge:      h_hub + scale * (g_0 h_hub + sum_i g_i P_i(h_i) - h_hub)
    broadcast:  h_i   + scale_i * g_i * (P_i(h_hub) - h_i)

With `scale = 1` these are exactly the paper's forms; with `scale = 0` (initialisation) every stitch is the identity,
so the composed model starts with exactly the hub's logits and training can only move away from it by gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MERGE, BROADCAST = "merge", "broadcast"


def stitch_points(num_hub_blocks: int, stitch_freq: int | None, explicit: list[int] | None) -> list[int]:
    """Hub blocks after which a stitch sits: the explicit list, or every `stitch_freq` blocks and the last block."""
    if explicit:
        return sorted(explicit)
    freq = stitch_freq or 4
    points = list(range(freq - 1, num_hub_blocks, freq))
    if not points or points[-1] != num_hub_blocks - 1:
        points.append(num_hub_blocks - 1)
    return points


def stitch_directions(count: int) -> list[str]:
    """Alternate, counting back from the last stitch, which always merges the experts into the hub."""
    return [MERGE if (count - 1 - k) % 2 == 0 else BROADCAST for k in range(count)]


def matching_depths(points: list[int], num_hub_blocks: int, num_expert_blocks: int) -> list[int]:
    """For each hub stitch point, how many of the expert's blocks have run: the same relative depth."""
    return [round((point + 1) * num_expert_blocks / num_hub_blocks) for point in points]


class Stitch(nn.Module):
    """One stitch: `merge` (experts into hub, softmax gates) or `broadcast` (hub into experts, sigmoid gates)."""

    def __init__(self, direction: str, hub_size: int, expert_sizes: list[int], dropout: float = 0.0):
        super().__init__()
        self.direction, self.hub_size, self.dropout = direction, hub_size, dropout
        self.num_experts = len(expert_sizes)
        if direction == MERGE:
            self.gate = nn.Linear(hub_size, (self.num_experts + 1) * hub_size)
            self.projections = nn.ModuleList(nn.Linear(size, hub_size, bias=False) for size in expert_sizes)
            self.scale = nn.Parameter(torch.zeros(hub_size))
        elif direction == BROADCAST:
            self.gates = nn.ModuleList(nn.Linear(hub_size, size) for size in expert_sizes)
            self.projections = nn.ModuleList(nn.Linear(hub_size, size, bias=False) for size in expert_sizes)
            self.scales = nn.ParameterList(nn.Parameter(torch.zeros(size)) for size in expert_sizes)
        else:
            raise ValueError(f"stitch direction must be {MERGE} or {BROADCAST}, got {direction}")
        self.reset_parameters()
        self.last_gates: list[torch.Tensor] | None = None  # kept for analysis when `record_gates` is set
        self.record_gates = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The identity stitch: zero gates and scales; projections identity between equal widths, else scaled
        random (streams branched from one seed share a representation; other widths need a learned map)."""
        gates = [self.gate] if self.direction == MERGE else list(self.gates)
        scales = [self.scale] if self.direction == MERGE else list(self.scales)
        for gate in gates:
            gate.weight.zero_()
            gate.bias.zero_()
        for scale in scales:
            scale.zero_()
        for projection in self.projections:
            out_features, in_features = projection.weight.shape
            if in_features == out_features:
                projection.weight.copy_(torch.eye(out_features))
            else:
                projection.weight.normal_(0.0, in_features ** -0.5)

    def _delta(self, delta: torch.Tensor) -> torch.Tensor:
        return F.dropout(delta, self.dropout, self.training) if self.dropout else delta

    def merge(self, hub: torch.Tensor, experts: list[torch.Tensor], active: list[int] | None = None) -> torch.Tensor:
        """`active`: the indices of the streams in `experts` (None: all, in order); the softmax runs over the hub and
        those alone, so a stream left out gives what a stitch without its gate rows and projection gives."""
        active = list(range(self.num_experts)) if active is None else list(active)
        logits = self.gate(hub).float().unflatten(-1, (self.num_experts + 1, self.hub_size))
        if len(active) != self.num_experts:
            logits = logits[..., [0] + [i + 1 for i in active], :]
        gates = torch.softmax(logits, dim=-2)  # per dimension, over [hub, expert_1..N]
        candidates = [hub] + [self.projections[i](h) for i, h in zip(active, experts)]
        mixed = sum(gates[..., i, :] * c.float() for i, c in enumerate(candidates))
        if self.record_gates:
            self.last_gates = [gates[..., i, :].detach() for i in range(len(active) + 1)]
        return hub + self.scale * self._delta(mixed.to(hub.dtype) - hub)

    def broadcast(self, hub: torch.Tensor, experts: list[torch.Tensor], active: list[int] | None = None
                  ) -> list[torch.Tensor]:
        """`active`: the indices of the streams in `experts` (None: all, in order)."""
        active = list(range(self.num_experts)) if active is None else list(active)
        updated, recorded = [], []
        for i, h in zip(active, experts):
            gate, projection, scale = self.gates[i], self.projections[i], self.scales[i]
            g = torch.sigmoid(gate(hub).float()).to(h.dtype)
            recorded.append(g.detach())
            updated.append(h + scale * self._delta(g * (projection(hub).to(h.dtype) - h)))
        if self.record_gates:
            self.last_gates = recorded
        return updated

    def extra_repr(self) -> str:
        return f"direction={self.direction}, hub_size={self.hub_size}, num_experts={self.num_experts}"


def check_directions(directions: list[str], count: int) -> list[str]:
    """Explicit directions (one per stitch point, the last a merge), or a ValueError saying what would be valid."""
    directions = list(directions)
    if len(directions) != count or any(d not in (MERGE, BROADCAST) for d in directions) or directions[-1] != MERGE:
        raise ValueError(f"stitch_directions must give {MERGE} or {BROADCAST} for each of the {count} stitch points, "
                         f"the last {MERGE} (it joins the experts into the hub before the LM head), got {directions}")
    return directions


def build_stitches(points: list[int], hub_size: int, expert_sizes: list[int], dropout: float = 0.0,
                   directions: list[str] | None = None) -> nn.ModuleList:
    """The stitches of a BTS model, one per stitch point: directions alternating back from the final merge, or
    `directions` as given (checkpoints converted from the original MixtureKit alternate forward from a broadcast)."""
    directions = check_directions(directions, len(points)) if directions else stitch_directions(len(points))
    return nn.ModuleList(Stitch(d, hub_size, expert_sizes, dropout) for d in directions)
