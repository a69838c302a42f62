"""Group token slots by expert and multiply each group by its expert's slice of stacked `[E, out, in]` weights.

Two backends behind `grouped_linear`: `loop`, the reference (tokens sorted by expert once, one matmul per expert
over a contiguous chunk, the stacked weight split with a single `unbind` so backward builds one gradient tensor for
it instead of a full-size one per slice), and `grouped_mm` (`torch.nn.functional.grouped_mm`, one call for all
experts, with group offsets). `auto` picks grouped_mm where it applies (float32 on CPU, bf16 on CUDA, 16-byte
aligned rows), else the loop.
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


BACKENDS = ("auto", "loop", "grouped_mm")


def resolve_backend(backend: str, inputs: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend that runs: `auto` becomes grouped_mm where PyTorch has it for this device, dtype and alignment."""
    if backend not in BACKENDS:
        raise ValueError(f"experts backend must be one of {BACKENDS}, got '{backend}'")
    if backend != "auto":
        return backend
    usable_dtype = torch.float32 if inputs.device.type == "cpu" else torch.bfloat16
    aligned = all(size * inputs.element_size() % 16 == 0 for size in weight.shape[1:])
    if hasattr(F, "grouped_mm") and inputs.dtype == usable_dtype and weight.dtype == usable_dtype and aligned:
        return "grouped_mm"
    return "loop"


def _contiguous_gradient(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.contiguous()


def grouped_linear(
    sorted_inputs: torch.Tensor, weight: torch.Tensor, counts: list[int], bias: torch.Tensor | None = None,
    backend: str = "loop",
) -> torch.Tensor:
    """`y[rows of e] = x[rows of e] @ weight[e].T + bias[e]` for contiguous row groups of sizes `counts`."""
    if resolve_backend(backend, sorted_inputs, weight) == "grouped_mm" and sorted_inputs.shape[0] > 0:
        offsets = torch.tensor(counts, device=sorted_inputs.device).cumsum(0).to(torch.int32)
        output = F.grouped_mm(sorted_inputs, weight.transpose(-2, -1), offs=offsets)
        if output.requires_grad:  # grouped_mm's backward needs a dense gradient (not an expanded one)
            output.register_hook(_contiguous_gradient)
        if bias is not None:
            experts = torch.repeat_interleave(torch.arange(len(counts), device=bias.device),
                                              torch.tensor(counts, device=bias.device))
            output = output + bias[experts]
        return output
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
