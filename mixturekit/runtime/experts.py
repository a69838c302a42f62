"""Group token slots by expert and run one matmul per expert over stacked `[E, out, in]` weights.

This is the reference (`loop`) backend: tokens are sorted by expert once, each expert multiplies one contiguous
chunk, and the stacked weight is split with a single `unbind` so backward builds one gradient tensor for it (slicing
a 3D weight per expert would allocate a full-size gradient per slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Dispatch:
    """Token slots sorted by expert: which token each slot reads, its routing weight, and the per-expert counts."""

    token_index: torch.Tensor  # [N*k] index into the flattened tokens
    weights: torch.Tensor  # [N*k] float32 routing weight of each slot
    counts: list[int]  # slots per expert, in expert order
    num_tokens: int


def dispatch(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> Dispatch:
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    return Dispatch(order // top_k, top_k_weights.reshape(-1)[order], counts, top_k_index.shape[0])


def grouped_linear(
    sorted_inputs: torch.Tensor, weight: torch.Tensor, counts: list[int], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`y[rows of e] = x[rows of e] @ weight[e].T + bias[e]` for contiguous row groups of sizes `counts`."""
    weights = weight.unbind(0)
    biases = bias.unbind(0) if bias is not None else [None] * len(weights)
    chunks = sorted_inputs.split(counts, dim=0)
    outputs = [F.linear(chunk, weights[e], biases[e]) for e, chunk in enumerate(chunks) if counts[e] > 0]
    if not outputs:
        return sorted_inputs.new_zeros(0, weight.shape[1])
    return torch.cat(outputs, dim=0)


def combine(expert_outputs: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Weight each slot's output by its routing weight and sum the slots of each token."""
    weighted = expert_outputs * plan.weights.to(expert_outputs.dtype).unsqueeze(-1)
    output = expert_outputs.new_zeros(plan.num_tokens, expert_outputs.shape[-1])
    return output.index_add_(0, plan.token_index, weighted)
