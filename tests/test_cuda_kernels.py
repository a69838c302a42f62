"""The CUDA-only fast paths against their PyTorch references. They run on a GPU machine (the device tool's
`bench/gpu_check.sh`); on a machine without CUDA there is nothing of theirs to run, and they are skipped."""

from __future__ import annotations

import pytest
import torch

from mixturekit.runtime.gated_activation import can_fuse, fused_silu_mul, gated_activation_reference
from mixturekit.runtime.experts import dispatch, mix_slots
from mixturekit.runtime.fused_combine import can_fuse_combine, fused_combine
from mixturekit.runtime.routing import float32_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,half", [(1, 16), (37, 1000), (4096, 8192)])
def test_fused_silu_mul_matches_the_float64_reference(dtype, rows, half):
    torch.manual_seed(rows)
    hidden = (torch.randn(rows, 2 * half, device="cuda") * 3).to(dtype).requires_grad_(True)
    upstream = torch.randn(rows, half, device="cuda").to(dtype)
    assert can_fuse(hidden, torch.nn.SiLU())
    fused = fused_silu_mul(hidden)
    (fused_gradient,) = torch.autograd.grad(fused, hidden, upstream)
    exact_input = hidden.detach().double().requires_grad_(True)
    exact = gated_activation_reference(exact_input, torch.nn.SiLU())
    (exact_gradient,) = torch.autograd.grad(exact, exact_input, upstream.double())
    # One rounding to `dtype` at the end (the reference in `dtype` rounds twice).
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(fused.double(), exact, **tolerance)
    torch.testing.assert_close(fused_gradient.double(), exact_gradient, **tolerance)


@pytest.mark.parametrize("rows,width", [(1, 64), (8192, 8192)])
def test_float32_router_logits_from_bf16_match_the_float64_product(rows, width):
    torch.manual_seed(rows)
    hidden = torch.randn(rows, width, device="cuda").bfloat16().requires_grad_(True)
    weight = (0.02 * torch.randn(4, width, device="cuda")).bfloat16().requires_grad_(True)
    logits = float32_logits(hidden, weight)
    assert logits.dtype == torch.float32
    upstream = torch.randn_like(logits)
    hidden_gradient, weight_gradient = torch.autograd.grad(logits, (hidden, weight), upstream)
    exact_hidden, exact_weight = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    exact = exact_hidden @ exact_weight.t()
    exact_hidden_gradient, exact_weight_gradient = torch.autograd.grad(exact, (exact_hidden, exact_weight), upstream.double())
    torch.testing.assert_close(logits.double(), exact, atol=1e-4, rtol=1e-4)  # float32 accumulation, no 16-bit rounding
    torch.testing.assert_close(hidden_gradient.double(), exact_hidden_gradient, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(weight_gradient.double(), exact_weight_gradient, atol=1e-2 * rows ** 0.5, rtol=2e-2)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens,width", [(1, 64), (37, 1000), (8192, 8192)])
def test_fused_combine_matches_the_float64_reference(top_k, tokens, width):
    torch.manual_seed(tokens + top_k)
    indices = torch.randn(tokens, 8, device="cuda").topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, device="cuda"), dim=-1).requires_grad_(True)
    plan = dispatch(indices, weights, 8)
    rows = torch.randn(tokens * top_k, width, device="cuda").bfloat16().requires_grad_(True)
    assert can_fuse_combine(rows)
    mixed = fused_combine(rows, plan.position, plan.order, weights)
    upstream = torch.randn_like(mixed)
    rows_gradient, weights_gradient = torch.autograd.grad(mixed, (rows, weights), upstream)
    exact_rows, exact_weights = rows.detach().double().requires_grad_(True), weights.detach().double().requires_grad_(True)
    exact = mix_slots(exact_rows[plan.position], exact_weights)
    exact_rows_gradient, exact_weights_gradient = torch.autograd.grad(exact, (exact_rows, exact_weights), upstream.double())
    torch.testing.assert_close(mixed.double(), exact, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(rows_gradient.double(), exact_rows_gradient, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(weights_gradient.double(), exact_weights_gradient, atol=1e-3 * width ** 0.5, rtol=1e-3)
