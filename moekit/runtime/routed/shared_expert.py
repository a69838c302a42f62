"""A shared expert: the base model's FFN (`traditional`) or projection (`btx`), always on beside the routed experts,
as in Qwen2-MoE and DeepSeek-MoE.

The mix is ``y = ½ · Σ_k w_k E_k(x) + s(x) · S(x)``: the routed experts' renormalised top-k mix at half weight, plus
the shared expert `S` weighted by ``s(x) = sigmoid(g · x)`` with a gate `g [1, d]` that starts at zero (gated) or by
the constant ``s = ½`` (ungated). At composition ``s = ½`` either way, so the block is the average of the routed mix and
the base's FFN: with identical experts and base it is exactly the dense FFN. It is Qwen2-MoE's formula
``routed + sigmoid(gate(x)) · shared`` with the routed `down_proj` halved (exact: a power of two, and the FFN is linear
in `down_proj`), and an ungated shared expert is Qwen2-MoE's with a zero gate (``sigmoid(0) = ½`` exactly), which is
how `export` writes it. Stored tensors stay the sources' own (`shared_expert.*` is a plain copy of the base's FFN).
"""

from __future__ import annotations

import torch
from torch import nn

SHARED_EXPERT = "shared_expert"
SHARED_EXPERT_GATE = "shared_expert_gate"
ROUTED_SCALE = 0.5  # the routed mix's weight beside a shared expert
UNGATED_WEIGHT = 0.5  # the shared expert's weight without a gate: sigmoid(0), what a zero gate gives


class SharedExpertGate(nn.Linear):
    """`shared_expert_gate`: one logit per token, `sigmoid` of it weighs the shared expert; zero at start (weight ½)."""

    def __init__(self, in_features: int):
        super().__init__(in_features, 1, bias=False)
        nn.init.zeros_(self.weight)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Through a matrix kernel (the one row twice, then one column kept): a CPU matrix-vector kernel's sum depends
        # on where the weight lies in memory, so a loaded (unaligned) weight gave logits 1e-7 off the saved model's.
        return nn.functional.linear(inputs, self.weight.expand(2, -1))[..., :1]


def with_shared_expert(routed: torch.Tensor, inputs: torch.Tensor, shared: nn.Module,
                       gate: SharedExpertGate | None) -> torch.Tensor:
    """``½ · routed + s(inputs) · shared(inputs)`` (see the module docstring); `routed` has the output's shape."""
    weight = torch.sigmoid(gate(inputs)) if gate is not None else UNGATED_WEIGHT
    return ROUTED_SCALE * routed + weight * shared(inputs)


def is_shared_expert_tensor(name: str) -> bool:
    """Whether a composed tensor name belongs to a shared expert (its FFN copy or its gate)."""
    return f".{SHARED_EXPERT}." in name or f".{SHARED_EXPERT_GATE}." in name


def shared_expert_source(name: str) -> str:
    """The base model's tensor a shared-expert tensor copies: the name without its `shared_expert.` level
    (`…mlp.shared_expert.up_proj.weight` <- `…mlp.up_proj.weight`; btx `…up_proj.shared_expert.weight` <-
    `…up_proj.weight`)."""
    return name.replace(f".{SHARED_EXPERT}.", ".", 1)
