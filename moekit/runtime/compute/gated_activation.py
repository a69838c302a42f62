"""`act(gate) * up` over the concatenated `gate_up_proj` output `[rows, 2f]`, fused on CUDA for SiLU.

The two halves of the concatenated output are strided views, so PyTorch's elementwise kernels read them without
vectorised loads, in two passes (the activation, then the product), and autograd keeps a third tensor for backward.
On CUDA with Triton, a SiLU gate runs as one kernel each way that reads the halves where they lie, computes in
float32 and keeps only the input for backward. Eager code launches them from an autograd Function (a small step is
bound by host time, and an operator's dispatch adds to it); compiled code calls them as the `moekit::silu_mul`
operator, a `torch.library.triton_op` with its backward registered, so `torch.compile` keeps the kernels instead of
falling back to the reference (it is registered at import, as `chosen_experts_kernel` explains). Everything else
(other activations, CPU) runs the reference below, which is also what the fused kernels are tested against.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn
from transformers import activations

# transformers' "silu" is its own module class (hub kernels can replace its forward); "swish" is `nn.SiLU`.
SILU_TYPES = tuple(t for t in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if t is not None)


def gated_activation_reference(hidden: torch.Tensor, activation: nn.Module) -> torch.Tensor:
    gate, up = hidden.chunk(2, dim=-1)
    return activation(gate) * up


@functools.cache
def _triton_kernels():
    """The Triton kernels, compiled on first use; None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def silu_mul_forward(hidden, out, half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < half
        gate = tl.load(hidden + row * 2 * half + columns, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(hidden + row * 2 * half + half + columns, mask=inside, other=0.0).to(tl.float32)
        result = gate * tl.sigmoid(gate) * up
        tl.store(out + row * half + columns, result.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def silu_mul_backward(hidden, gradient, hidden_gradient, half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < half
        gate = tl.load(hidden + row * 2 * half + columns, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(hidden + row * 2 * half + half + columns, mask=inside, other=0.0).to(tl.float32)
        upstream = tl.load(gradient + row * half + columns, mask=inside, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        gate_gradient = upstream * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        up_gradient = upstream * gate * sigmoid
        element = hidden_gradient.dtype.element_ty
        tl.store(hidden_gradient + row * 2 * half + columns, gate_gradient.to(element), mask=inside)
        tl.store(hidden_gradient + row * 2 * half + half + columns, up_gradient.to(element), mask=inside)

    return silu_mul_forward, silu_mul_backward


_BLOCK = 1024


def _grid(rows: int, half: int) -> tuple[int, int]:
    return rows, (half + _BLOCK - 1) // _BLOCK


def _no_wrap(kernel):
    return kernel


def _launch_forward(hidden: torch.Tensor, wrap=_no_wrap) -> torch.Tensor:
    """The forward kernel over a contiguous `[rows, 2f]`; `wrap` is `wrap_triton` inside the operator."""
    forward_kernel, _ = _triton_kernels()
    rows, half = hidden.shape[0], hidden.shape[1] // 2
    out = hidden.new_empty(rows, half)
    if rows:
        wrap(forward_kernel)[_grid(rows, half)](hidden, out, half, BLOCK=_BLOCK)
    return out


def _launch_backward(hidden: torch.Tensor, gradient: torch.Tensor, wrap=_no_wrap) -> torch.Tensor:
    """The backward kernel: the gradient of both halves from the output's (contiguous) gradient."""
    _, backward_kernel = _triton_kernels()
    hidden_gradient = torch.empty_like(hidden)
    rows, half = hidden.shape[0], hidden.shape[1] // 2
    if rows:
        wrap(backward_kernel)[_grid(rows, half)](hidden, gradient, hidden_gradient, half, BLOCK=_BLOCK)
    return hidden_gradient


class _FusedSiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden)
        return _launch_forward(hidden)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        return _launch_backward(hidden, gradient.contiguous())


def _register_operator():
    """The kernels as the `moekit::silu_mul` operator and its backward, for compiled code."""
    from torch.library import triton_op, wrap_triton

    _triton_kernels()  # compiled here, at import: Dynamo cannot trace Triton's import

    @triton_op("moekit::silu_mul", mutates_args=())
    def silu_mul(hidden: torch.Tensor) -> torch.Tensor:
        return _launch_forward(hidden, wrap_triton)

    @triton_op("moekit::silu_mul_backward", mutates_args=())
    def silu_mul_backward(hidden: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return _launch_backward(hidden, gradient, wrap_triton)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, gradient):
        (hidden,) = ctx.saved_tensors
        return silu_mul_backward(hidden, gradient.contiguous())

    silu_mul.register_autograd(backward, setup_context=setup_context)
    return silu_mul


_OPERATOR = _register_operator() if torch.cuda.is_available() and importlib.util.find_spec("triton") else None


def fused_silu_mul(hidden: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for a contiguous CUDA `[rows, 2f]` tensor, by the Triton kernels (they must be available)."""
    if torch.compiler.is_compiling():
        return _OPERATOR(hidden.contiguous())
    if not (hidden.requires_grad and torch.is_grad_enabled()):  # decoding: the kernel without the Function's host time
        return _launch_forward(hidden.contiguous())
    return _FusedSiluMul.apply(hidden.contiguous())


def can_fuse(hidden: torch.Tensor, activation: nn.Module) -> bool:
    return hidden.is_cuda and hidden.dim() == 2 and isinstance(activation, SILU_TYPES) and _OPERATOR is not None


def gated_activation(hidden: torch.Tensor, activation: nn.Module) -> torch.Tensor:
    """`activation(gate) * up` for `hidden = [gate | up]` along the last dimension."""
    if can_fuse(hidden, activation):
        return fused_silu_mul(hidden)
    return gated_activation_reference(hidden, activation)
