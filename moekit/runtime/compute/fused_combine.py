"""`combine` as one Triton kernel each way on CUDA: unsort the expert outputs and mix each token's k rows.

The reference (`experts.combine`) permutes the sorted expert outputs back into slot order (a copy of `[N*k, out]`),
multiplies them by the routing weights (another) and sums over k (a third read); autograd then keeps the permuted
copy for backward and runs three more passes. Here the forward reads each expert row once where it lies (by the
inverse permutation) and accumulates the weighted sum in float32; the backward writes each expert row's gradient
(its token's output gradient times its weight) and that slot's weight gradient (the dot product of the two rows) in
one pass. Rows are read and written whole, never added into by two programs: no atomics, deterministic.

Eager code launches the kernels from an autograd Function; compiled code calls them as the `moekit::combine`
operator (a `torch.library.triton_op` with its backward registered, registered at import), so `torch.compile`
keeps them instead of running the reference.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

_BLOCK = 1024


@functools.cache
def _triton_kernels():
    """The Triton kernels, compiled on first use; None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def combine_forward(rows, position, weights, out, width, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        for start in range(0, width, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            inside = columns < width
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for choice in tl.static_range(TOP_K):
                row = tl.load(position + token * TOP_K + choice).to(tl.int64)
                weight = tl.load(weights + token * TOP_K + choice)
                total += weight * tl.load(rows + row * width + columns, mask=inside, other=0.0).to(tl.float32)
            tl.store(out + token * width + columns, total.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def combine_backward(rows, order, weights, gradient, rows_gradient, weights_gradient, width,
                         TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(order + row).to(tl.int64)
        token = slot // TOP_K
        weight = tl.load(weights + slot)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            inside = columns < width
            upstream = tl.load(gradient + token * width + columns, mask=inside, other=0.0).to(tl.float32)
            expert_row = tl.load(rows + row * width + columns, mask=inside, other=0.0).to(tl.float32)
            tl.store(rows_gradient + row * width + columns, (weight * upstream).to(rows_gradient.dtype.element_ty),
                     mask=inside)
            dot += upstream * expert_row
        tl.store(weights_gradient + slot, tl.sum(dot, axis=0))

    return combine_forward, combine_backward


def _no_wrap(kernel):
    return kernel


def _launch_forward(rows: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, wrap=_no_wrap) -> torch.Tensor:
    """The forward kernel over contiguous inputs; `wrap` is `wrap_triton` inside the operator, nothing in eager code."""
    forward_kernel, _ = _triton_kernels()
    num_tokens, top_k = weights.shape
    out = rows.new_empty(num_tokens, rows.shape[1])
    if num_tokens:
        wrap(forward_kernel)[(num_tokens,)](rows, position, weights, out, rows.shape[1], TOP_K=top_k, BLOCK=_BLOCK)
    return out


def _launch_backward(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, gradient: torch.Tensor,
                     wrap=_no_wrap) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel: each expert row's gradient and each slot's routing-weight gradient."""
    _, backward_kernel = _triton_kernels()
    rows_gradient = torch.empty_like(rows)
    weights_gradient = torch.empty_like(weights)
    if rows.shape[0]:
        wrap(backward_kernel)[(rows.shape[0],)](rows, order, weights, gradient, rows_gradient, weights_gradient,
                                                rows.shape[1], TOP_K=weights.shape[1], BLOCK=_BLOCK)
    return rows_gradient, weights_gradient


class _FusedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, position: torch.Tensor, order: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, order, weights)
        return _launch_forward(rows, position, weights)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        rows, order, weights = ctx.saved_tensors
        rows_gradient, weights_gradient = _launch_backward(rows, order, weights, gradient.contiguous())
        return rows_gradient, None, None, weights_gradient


def _register_operator():
    """The kernels as the `moekit::combine` operator and its backward, for compiled code."""
    from torch.library import triton_op, wrap_triton

    _triton_kernels()  # compiled here, at import: Dynamo cannot trace Triton's import

    @triton_op("moekit::combine", mutates_args=())
    def combine(rows: torch.Tensor, position: torch.Tensor, order: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return _launch_forward(rows, position, weights, wrap_triton)

    @triton_op("moekit::combine_backward", mutates_args=())
    def combine_backward(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                         gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_backward(rows, order, weights, gradient, wrap_triton)

    def setup_context(ctx, inputs, output):
        rows, _, order, weights = inputs
        ctx.save_for_backward(rows, order, weights)

    def backward(ctx, gradient):
        rows, order, weights = ctx.saved_tensors
        rows_gradient, weights_gradient = combine_backward(rows, order, weights, gradient.contiguous())
        return rows_gradient, None, None, weights_gradient

    combine.register_autograd(backward, setup_context=setup_context)
    return combine


_OPERATOR = _register_operator() if torch.cuda.is_available() and importlib.util.find_spec("triton") else None


def can_fuse_combine(rows: torch.Tensor) -> bool:
    return rows.is_cuda and _OPERATOR is not None


def fused_combine(rows: torch.Tensor, position: torch.Tensor, order: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """`out[t] = sum_j weights[t, j] * rows[position[t*k + j]]` (CUDA, Triton; `weights` float32 `[N, k]`)."""
    if torch.compiler.is_compiling():
        return _OPERATOR(rows.contiguous(), position, order, weights.float().contiguous())
    return _FusedCombine.apply(rows.contiguous(), position, order, weights.float().contiguous())
