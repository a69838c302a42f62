"""The CUDA-only fast paths against their PyTorch references. They run on a GPU machine (the device tool's
`bench/gpu_check.sh`); on a machine without CUDA there is nothing of theirs to run, and they are skipped."""

from __future__ import annotations

import pytest
import torch

from moekit.runtime.compute.gated_activation import can_fuse, fused_silu_mul, gated_activation_reference
from moekit.runtime.compute.chosen_experts_kernel import can_run_kernel, chosen_experts_matvec
from moekit.runtime.compute.experts import chosen_experts_linear, dispatch, mix_slots, slot_inputs
from moekit.runtime.compute.fused_combine import can_fuse_combine, fused_combine
from moekit.runtime.routed.routing import float32_logits

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,top_k,experts,width_in,width_out", [(1, 2, 4, 2048, 8192), (2, 2, 8, 8192, 2048),
                                                                      (3, 1, 4, 130, 33), (1, 4, 16, 257, 70)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows_per", ["token", "slot"])
@pytest.mark.parametrize("mixed", [False, True])
def test_chosen_experts_kernel_matches_the_float64_reference(dtype, tokens, top_k, experts, width_in, width_out, bias,
                                                             rows_per, mixed):
    torch.manual_seed(tokens * 100 + experts)
    weight = (0.02 * torch.randn(experts, width_out, width_in, device="cuda")).to(dtype)
    biases = (0.1 * torch.randn(experts, width_out, device="cuda")).to(dtype) if bias else None
    chosen = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])
    inputs = torch.randn(tokens * top_k if rows_per == "slot" else tokens, width_in, device="cuda").to(dtype)
    mix = torch.softmax(torch.randn(tokens, top_k, device="cuda"), dim=-1) if mixed else None
    assert can_run_kernel(inputs)
    got = chosen_experts_matvec(inputs, weight, biases, chosen, mix)
    rows = inputs if rows_per == "slot" else slot_inputs(inputs, top_k)
    exact = chosen_experts_linear(rows.double(), weight.double(), None if biases is None else biases.double(),
                                  chosen.reshape(-1))
    if mixed:
        exact = mix_slots(exact, mix.double())
    assert got.shape == exact.shape and got.dtype == dtype
    # float32 accumulation; in bf16 a slot's output and its bias sum are rounded as the reference rounds them
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(got.double(), exact, **tolerance)


def test_chosen_experts_kernel_runs_inside_compiled_code():
    torch.manual_seed(0)
    weight = (0.02 * torch.randn(4, 512, 256, device="cuda")).bfloat16()
    chosen = torch.tensor([[3, 1]], device="cuda")
    inputs = torch.randn(1, 256, device="cuda").bfloat16()
    mix = torch.tensor([[0.7, 0.3]], device="cuda")
    eager = chosen_experts_matvec(inputs, weight, None, chosen, mix)
    compiled = torch.compile(lambda x: chosen_experts_matvec(x, weight, None, chosen, mix), fullgraph=True)
    torch.testing.assert_close(compiled(inputs), eager, atol=0, rtol=0)


def test_fused_silu_mul_and_combine_run_inside_compiled_code_with_their_gradients():
    """Compiled code calls the same kernels as operators (forward and backward): results equal eager's bit for bit."""
    torch.manual_seed(0)
    tokens, top_k, width, half = 64, 2, 384, 256
    indices = torch.randn(tokens, 4, device="cuda").topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, device="cuda"), dim=-1)
    plan = dispatch(indices, weights, 4)
    hidden = torch.randn(tokens * top_k, 2 * half, device="cuda").bfloat16()
    projection = (0.05 * torch.randn(half, width, device="cuda")).bfloat16()

    def step(hidden, weights):
        rows = fused_silu_mul(hidden) @ projection
        return fused_combine(rows, plan.position, plan.order, weights)

    results = []
    for run in (step, torch.compile(step, fullgraph=True)):
        inputs = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        output = run(*inputs)
        output.float().square().sum().backward()
        results.append((output, inputs[0].grad, inputs[1].grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


def test_a_routed_training_step_and_its_balance_terms_never_wait_for_the_gpu():
    """Forward, balance sums and backward of a routed Linear launch work and return: no host-device synchronisation
    (CUDA's sync debug mode raises on one), so the host can queue the next kernels while the GPU runs."""
    from moekit.runtime.routed.routed_linear import RoutedLinear
    from moekit.runtime.routed.balance import balance_from_sums, router_sums
    from moekit.runtime.routed.routing import RouterLogitsRecorder

    torch.manual_seed(0)
    recorder = RouterLogitsRecorder()
    layer = RoutedLinear(torch.nn.Linear(256, 512), num_experts=4, top_k=2, recorder=recorder).cuda().bfloat16()
    tokens = torch.randn(1024, 256, device="cuda").bfloat16().requires_grad_(True)

    def step():
        with recorder.recording() as logits:
            output = layer(tokens)
        sums = router_sums(logits[0], 2)
        balance = balance_from_sums(sums.probability_sum, sums.slots, sums.tokens, 2)
        (output.float().square().mean() + 0.01 * balance).backward()

    step()  # first call: kernels compiled and cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert layer.router.weight.grad is not None and torch.isfinite(layer.router.weight.grad.float()).all()
