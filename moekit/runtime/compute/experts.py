"""Group token slots by expert and multiply each group by its expert's slice of stacked `[E, out, in]` weights.

Two backends behind `grouped_linear`: `loop`, the reference (tokens sorted by expert once, one matmul per expert
over a contiguous chunk, the stacked weight split with a single `unbind` so backward builds one gradient tensor for
it instead of a full-size one per slice), and `grouped_mm` (`torch.nn.functional.grouped_mm`, one call for all
experts, with group offsets). `auto` picks grouped_mm where it applies (float32 on CPU, bf16 on CUDA, 16-byte
aligned rows), else the loop.

Dispatch keeps the groups' end offsets on the device, and the grouped_mm path never reads them back: no host
synchronisation per layer, so decoding steps can be captured in a CUDA graph and `torch.compile` sees no
data-dependent Python. Only the loop, which must split by size, copies them to the host.

A handful of tokens at inference (a decoding step) skips the sort and the dozen kernel launches of dispatch, which
are what a decoding step at batch 1 waits on: `chosen_experts_output` multiplies each slot's row by its chosen
expert's weight. On CUDA one Triton kernel reads those weights in place (`chosen_experts_kernel`, also inside
compiled code); elsewhere the reference gathers them (`chosen_experts_linear`) and runs one batched matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chosen_experts_kernel import can_run_kernel, chosen_experts_matvec
from .fused_combine import can_fuse_combine, fused_combine


class Groups:
    """Contiguous row groups, one per expert in expert order, held as their end rows (int32) on the device."""

    def __init__(self, ends: torch.Tensor):
        self.ends = ends
        self._sizes: list[int] | None = None

    @classmethod
    def from_counts(cls, counts: torch.Tensor | list[int], device: torch.device | None = None) -> Groups:
        return cls(torch.as_tensor(counts, device=device).cumsum(0).to(torch.int32))

    @property
    def counts(self) -> torch.Tensor:
        """Rows per expert, on the device."""
        return torch.diff(self.ends, prepend=self.ends.new_zeros(1))

    def sizes(self) -> list[int]:
        """Rows per expert on the host (one read-back, cached): what the loop splits by."""
        if self._sizes is None:
            self._sizes = self.counts.tolist()
        return self._sizes


@dataclass
class Dispatch:
    """Token slots sorted by expert: where each sorted row comes from, and each expert's group of rows.

    A slot is one (token, choice) pair, numbered `token * k + choice`. `order[j]` is the slot in sorted row j and
    `position[slot]` its row, so sorting and unsorting are both plain gathers (no atomics, deterministic).
    """

    order: torch.Tensor  # [N*k] slot of each sorted row
    position: torch.Tensor  # [N*k] sorted row of each slot (the inverse permutation)
    token_index: torch.Tensor  # [N*k] token each sorted row reads
    weights: torch.Tensor  # [N, k] float32 routing weights, in slot order
    groups: Groups  # each expert's rows, in expert order
    num_tokens: int

    @property
    def counts(self) -> torch.Tensor:
        return self.groups.counts


def dispatch(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable sort of the slots by expert; each expert's group ends where the sorted experts pass its index."""
    top_k = top_k_index.shape[-1]
    sorted_experts, order = torch.sort(top_k_index.reshape(-1), stable=True)
    boundaries = torch.arange(1, num_experts + 1, device=order.device, dtype=sorted_experts.dtype)
    ends = torch.searchsorted(sorted_experts, boundaries, out_int32=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Dispatch(order, position, order // top_k, top_k_weights, Groups(ends), top_k_index.shape[0])


# Above this many bytes of gathered expert weights per call, copying them costs the GPU more than the sort's launches
# save (about a dozen launches, ~0.1 ms of host time, against 2 extra passes over the copy at ~4 TB/s). The Triton
# kernel copies nothing and has no such limit.
FEW_TOKEN_COPY_LIMIT_BYTES = 256 * 2**20


def few_tokens_at_inference(num_tokens: int, top_k: int, num_experts: int, *parameters: torch.Tensor | None) -> bool:
    """Whether to skip the sort: at most E slots (beyond, the sorted path reads each expert once, this path once per
    slot) and no gradient wanted (the path has none). Where the reference must copy the chosen weights: only if
    they fit in `FEW_TOKEN_COPY_LIMIT_BYTES`, and not while compiling (a static-cache decode is CUDA-graphed, so
    launches are cheap and copies are not)."""
    slots = num_tokens * top_k
    if slots > num_experts:
        return False
    present = [p for p in parameters if p is not None]
    if torch.is_grad_enabled() and any(p.requires_grad for p in present):
        return False
    if can_run_kernel(present[0]):
        return True
    if torch.compiler.is_compiling():
        return False
    # one expert's bytes from the shape (indexing `p[0]` would dispatch an operator per parameter and step)
    return slots * sum(p.numel() // p.shape[0] * p.element_size() for p in present) <= FEW_TOKEN_COPY_LIMIT_BYTES


def chosen_experts_output(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          experts: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Each slot of `experts [N, k]` through its chosen expert, without a sort: `inputs` holds a row per token (shared
    by its k slots) or per slot; with routing weights `mix [N, k]` each token's k outputs are mixed (`[N, out]`),
    else returned per slot (`[N*k, out]`)."""
    if can_run_kernel(inputs):
        return chosen_experts_matvec(inputs, weight, bias, experts, mix)
    if inputs.shape[0] == experts.numel():
        output = chosen_experts_linear(inputs, weight, bias, experts.reshape(-1))
    else:
        output = chosen_experts_token_linear(inputs, weight, bias, experts)
    return output if mix is None else mix_slots(output, mix)


def chosen_experts_linear(
    slot_inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, experts: torch.Tensor
) -> torch.Tensor:
    """`y[s] = x[s] @ weight[experts[s]].T + bias[experts[s]]` for every slot s, by gathered weights: the reference
    of the Triton kernel."""
    chosen = weight.index_select(0, experts)
    output = torch.bmm(chosen, slot_inputs.unsqueeze(-1)).squeeze(-1)
    return output if bias is None else output + bias.index_select(0, experts)


def chosen_experts_token_linear(
    tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, experts: torch.Tensor
) -> torch.Tensor:
    """`chosen_experts_linear` where each token's row serves its k slots (`tokens [N, in]`, `experts [N, k]`): the k
    chosen weights of a token stacked as one `[k*out, in]` matrix times its row, so the row is not copied k times.
    Returns `[N*k, out]` in slot order."""
    num_tokens, top_k = experts.shape
    flat = experts.reshape(-1)
    chosen = weight.index_select(0, flat).view(num_tokens, top_k * weight.shape[1], weight.shape[2])
    output = torch.bmm(chosen, tokens.unsqueeze(-1)).view(num_tokens * top_k, weight.shape[1])
    return output if bias is None else output + bias.index_select(0, flat)


def mix_slots(slot_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's k slot outputs (`[N*k, out]` in slot order) mixed by its routing weights `[N, k]`.

    Products and their sum in float32, rounded once to the outputs' dtype: the arithmetic of `fused_combine`, so a
    decoding step (which mixes here) and a whole sequence (mixed there on CUDA) agree. Memory-bound elementwise work;
    as a batched `[1, k] @ [k, out]` matmul it ran on tensor-core tiles padded to 16 x 16 and took 40% of a btx
    training step on an H200.
    """
    num_tokens, top_k = weights.shape
    slots = slot_outputs.view(num_tokens, top_k, -1)
    if slots.dtype == torch.float32 and weights.dtype == torch.float32:  # no conversions to dispatch (decoding)
        return (slots * weights.unsqueeze(-1)).sum(dim=1)
    return (slots.float() * weights.float().unsqueeze(-1)).sum(dim=1).to(slot_outputs.dtype)


def slot_inputs(tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """Every token's row once per slot, in slot order (`[N*k, in]`)."""
    return tokens.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, tokens.shape[-1])


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


class _GatherSlots(torch.autograd.Function):
    """`tokens[token_index]`: every token's row once per slot, in sorted order. Its gradient is the sum of each token's
    k slot gradients, read by the inverse permutation and summed over k: no atomics (the default backward of
    indexing is a sorted scatter-add), deterministic."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, token_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(position)
        ctx.num_tokens = tokens.shape[0]
        return tokens.index_select(0, token_index)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        (position,) = ctx.saved_tensors
        by_slot = gradient.index_select(0, position)
        return by_slot.view(ctx.num_tokens, -1, gradient.shape[-1]).sum(dim=1), None, None


def gather_slots(tokens: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """The input row of every sorted slot (`tokens[plan.token_index]`), with a summed, atomic-free gradient."""
    return _GatherSlots.apply(tokens, plan.token_index, plan.position)


BACKENDS = ("auto", "loop", "grouped_mm")


def resolve_backend(backend: str, inputs: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend that runs: `auto` becomes grouped_mm where PyTorch has it for this device, dtype and alignment."""
    if backend not in BACKENDS:
        raise ValueError(f"experts backend must be one of {BACKENDS}, got '{backend}'")
    if backend != "auto":
        return backend
    if inputs.device.type not in ("cpu", "cuda"):
        return "loop"  # MPS and others: grouped_mm is a CPU and CUDA kernel; the loop is the portable path
    # float32 grouped_mm runs on CPU in eager code only: compiled code checks it against the CUDA rule (bf16)
    cpu_float32 = inputs.device.type == "cpu" and not torch.compiler.is_compiling()
    usable_dtype = torch.float32 if cpu_float32 else torch.bfloat16
    aligned = all(size * inputs.element_size() % 16 == 0 for size in weight.shape[1:])
    if hasattr(F, "grouped_mm") and inputs.dtype == usable_dtype and weight.dtype == usable_dtype and aligned:
        return "grouped_mm"
    return "loop"


def _contiguous_gradient(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.contiguous()


def as_groups(groups: Groups | torch.Tensor | list[int], device: torch.device) -> Groups:
    return groups if isinstance(groups, Groups) else Groups.from_counts(groups, device)


def grouped_linear(
    sorted_inputs: torch.Tensor, weight: torch.Tensor, groups: Groups | torch.Tensor | list[int],
    bias: torch.Tensor | None = None, backend: str = "loop",
) -> torch.Tensor:
    """`y[rows of e] = x[rows of e] @ weight[e].T + bias[e]` for contiguous row groups (a `Groups`, or the counts)."""
    rows = sorted_inputs.shape[0]
    groups = as_groups(groups, sorted_inputs.device)
    if resolve_backend(backend, sorted_inputs, weight) == "grouped_mm" and rows > 0:
        output = F.grouped_mm(sorted_inputs, weight.transpose(-2, -1), offs=groups.ends)
        if output.requires_grad and not torch.compiler.is_compiling():  # its backward needs a dense gradient
            output.register_hook(_contiguous_gradient)
        if bias is not None:
            experts = torch.repeat_interleave(torch.arange(weight.shape[0], device=bias.device),
                                              groups.counts.to(bias.device), output_size=rows)
            output = output + bias[experts]
        return output
    counts = groups.sizes()
    weights = weight.unbind(0)
    biases = bias.unbind(0) if bias is not None else [None] * len(weights)
    chunks = sorted_inputs.split(counts, dim=0)
    outputs = [F.linear(chunk, weights[e], biases[e]) for e, chunk in enumerate(chunks) if counts[e] > 0]
    if not outputs:
        return sorted_inputs.new_zeros(0, weight.shape[1])
    return torch.cat(outputs, dim=0)


def combine(expert_outputs: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Each token's output: its k slots' outputs, back in slot order, mixed by its routing weights (the gradient
    reaches the routing weights through the mix). On CUDA one Triton kernel each way
    (`fused_combine`); this is its reference."""
    if can_fuse_combine(expert_outputs):
        return fused_combine(expert_outputs, plan.position, plan.order, plan.weights)
    return mix_slots(_Permute.apply(expert_outputs, plan.position, plan.order), plan.weights)
