"""Group token slots by expert and multiply each group by its expert's slice of stacked `[E, out, in]` weights.

Two backends behind `grouped_linear`: `loop`, the reference (tokens sorted by expert once, one matmul per expert
over a contiguous chunk, the stacked weight split with a single `unbind` so backward builds one gradient tensor for
it instead of a full-size one per slice), and `grouped_mm` (`torch.nn.functional.grouped_mm`, one call for all
experts, with group offsets). `auto` picks grouped_mm where it applies (float32 on CPU, bf16 on CUDA, 16-byte
aligned rows), else the loop.

Dispatch keeps the per-expert counts on the device, and the grouped_mm path never reads them back: no host
synchronisation per layer, so decoding steps can be captured in a CUDA graph and `torch.compile` sees no
data-dependent Python. Only the loop, which must split by count, copies them to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Dispatch:
    """Token slots sorted by expert: where each sorted row comes from, and the per-expert counts.

    A slot is one (token, choice) pair, numbered `token * k + choice`. `order[j]` is the slot in sorted row j and
    `position[slot]` its row, so sorting and unsorting are both plain gathers (no atomics, deterministic).
    """

    order: torch.Tensor  # [N*k] slot of each sorted row
    position: torch.Tensor  # [N*k] sorted row of each slot (the inverse permutation)
    token_index: torch.Tensor  # [N*k] token each sorted row reads
    weights: torch.Tensor  # [N, k] float32 routing weights, in slot order
    counts: torch.Tensor  # [E] int64 rows per expert, in expert order, on the tokens' device
    num_tokens: int


def dispatch(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable counting sort of the slots by expert: a slot's row is its expert's start plus how many earlier slots
    chose the same expert (a running count along each expert's row of an `[E, N*k]` indicator, a contiguous scan)."""
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)
    experts = torch.arange(num_experts, device=flat_experts.device, dtype=flat_experts.dtype)
    chosen = (flat_experts.unsqueeze(0) == experts.unsqueeze(1)).to(torch.int32)  # [E, N*k]
    counts = chosen.sum(dim=1, dtype=torch.long)
    rank = chosen.cumsum(dim=1, dtype=torch.int32).gather(0, flat_experts.unsqueeze(0)).squeeze(0) - 1
    position = (counts.cumsum(dim=0) - counts)[flat_experts] + rank
    order = torch.empty_like(position).scatter_(0, position, torch.arange(position.numel(), device=position.device))
    return Dispatch(order, position, order // top_k, top_k_weights, counts, top_k_index.shape[0])


class _Permute(torch.autograd.Function):
    """`rows[index]` for a permutation `index`; its gradient is the gather by the inverse permutation."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return gradient.index_select(0, inverse), None, None


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
    sorted_inputs: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor | list[int],
    bias: torch.Tensor | None = None, backend: str = "loop",
) -> torch.Tensor:
    """`y[rows of e] = x[rows of e] @ weight[e].T + bias[e]` for contiguous row groups of sizes `counts`."""
    rows = sorted_inputs.shape[0]
    if resolve_backend(backend, sorted_inputs, weight) == "grouped_mm" and rows > 0:
        counts = torch.as_tensor(counts, device=sorted_inputs.device)
        offsets = counts.cumsum(0).to(torch.int32)
        output = F.grouped_mm(sorted_inputs, weight.transpose(-2, -1), offs=offsets)
        if output.requires_grad and not torch.compiler.is_compiling():  # its backward needs a dense gradient
            output.register_hook(_contiguous_gradient)
        if bias is not None:
            experts = torch.repeat_interleave(torch.arange(len(counts), device=bias.device), counts.to(bias.device),
                                              output_size=rows)
            output = output + bias[experts]
        return output
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    weights = weight.unbind(0)
    biases = bias.unbind(0) if bias is not None else [None] * len(weights)
    chunks = sorted_inputs.split(counts, dim=0)
    outputs = [F.linear(chunk, weights[e], biases[e]) for e, chunk in enumerate(chunks) if counts[e] > 0]
    if not outputs:
        return sorted_inputs.new_zeros(0, weight.shape[1])
    return torch.cat(outputs, dim=0)


def combine(expert_outputs: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Each token's output: its k slots' outputs, back in slot order, mixed by its routing weights (one batched
    matmul; the gradient reaches the routing weights through it)."""
    top_k = plan.weights.shape[-1]
    slots = _Permute.apply(expert_outputs, plan.position, plan.order)
    mixed = torch.bmm(plan.weights.to(expert_outputs.dtype).unsqueeze(1),
                      slots.view(plan.num_tokens, top_k, expert_outputs.shape[-1]))
    return mixed.squeeze(1)
