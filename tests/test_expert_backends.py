"""Every expert backend against the `loop` reference: outputs and gradients, odd routings, whole models."""

from __future__ import annotations

import pytest
import torch

from moekit import MixtureKitConfig, MixtureKitForCausalLM
from moekit.runtime.compute.experts import combine, dispatch, gather_slots, grouped_linear, resolve_backend
from moekit.runtime.compute import experts as experts_module
from moekit.runtime.routed import moe_block, routed_linear
from moekit.runtime.compute.gated_activation import gated_activation
from tiny_models import VOCAB, tiny_config

ROUTINGS = {
    "random": lambda m, e: torch.randint(0, e, (m,)),
    "skewed": lambda m, e: torch.zeros(m, dtype=torch.long),  # every slot to expert 0, the others empty
    "some-empty": lambda m, e: torch.randint(0, 2, (m,)) * (e - 1),  # only the first and last experts
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_mm_matches_the_loop(routing, rows, with_bias):
    experts, d_in, d_out = 4, 32, 48
    generator = torch.Generator().manual_seed(rows)
    assignment = ROUTINGS[routing](rows, experts).sort().values
    counts = torch.bincount(assignment, minlength=experts)  # a device tensor, as dispatch gives it
    inputs = torch.randn(rows, d_in, generator=generator, requires_grad=True)
    weight = torch.randn(experts, d_out, d_in, generator=generator, requires_grad=True)
    bias = torch.randn(experts, d_out, generator=generator, requires_grad=True) if with_bias else None
    upstream = torch.randn(rows, d_out, generator=generator)
    results = {}
    for backend in ("loop", "grouped_mm"):
        output = grouped_linear(inputs, weight, counts, bias, backend)
        (output * upstream).sum().backward()
        results[backend] = (output.detach(), inputs.grad.clone(), weight.grad.clone(),
                            bias.grad.clone() if bias is not None else None)
        for tensor in (inputs, weight, bias):
            if tensor is not None:
                tensor.grad = None
    for reference, candidate in zip(results["loop"], results["grouped_mm"]):
        if reference is not None:
            torch.testing.assert_close(candidate, reference, atol=1e-5, rtol=1e-5)


def test_a_summed_loss_works_through_grouped_mm():
    weight = torch.randn(2, 16, 16, requires_grad=True)
    grouped_linear(torch.randn(5, 16), weight, [2, 3], backend="grouped_mm").sum().backward()  # expanded gradient
    assert weight.grad.abs().sum() > 0


def test_auto_picks_grouped_mm_only_where_it_applies():
    weight = torch.randn(2, 48, 32)
    assert resolve_backend("auto", torch.randn(3, 32), weight) == "grouped_mm"
    assert resolve_backend("auto", torch.randn(3, 32).bfloat16(), weight.bfloat16()) == "loop"  # CPU bf16
    assert resolve_backend("auto", torch.randn(3, 30), torch.randn(2, 45, 30)) == "loop"  # rows not 16-byte aligned
    with pytest.raises(ValueError, match="experts backend must be one of"):
        resolve_backend("triton", torch.randn(3, 32), weight)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_whole_models_agree_across_backends(method):
    config = MixtureKitConfig(text_config=tiny_config("llama"), method=method, expert_names=list("abcd"),
                              num_experts_per_tok=2)
    model = MixtureKitForCausalLM(config)
    tokens = torch.randint(3, VOCAB, (2, 9))
    outputs = {}
    for backend in ("loop", "grouped_mm"):
        model.set_experts_backend(backend)
        model.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        outputs[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs["grouped_mm"][0], outputs["loop"][0], atol=1e-5, rtol=0)
    for name, gradient in outputs["loop"][1].items():
        torch.testing.assert_close(outputs["grouped_mm"][1][name], gradient, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 2), (23, 2), (40, 3)])
def test_dispatch_is_a_stable_sort_and_combine_a_weighted_sum(tokens, top_k):
    """Counting-sort dispatch equals a stable argsort; combine equals the per-slot weighted sum, gradients too."""
    experts, width = 5, 8
    generator = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, experts, generator=generator)
    logits[:, 0] += 5 * (tokens > 20)  # skewed: most slots to one expert, some experts empty for small inputs
    weights, indices = torch.softmax(logits, -1).topk(top_k, dim=-1)
    weights.requires_grad_(True)
    plan = dispatch(indices, weights, experts)
    expected_order = torch.argsort(indices.reshape(-1), stable=True)
    assert torch.equal(plan.order, expected_order)
    assert torch.equal(plan.order[plan.position], torch.arange(tokens * top_k))
    assert plan.counts.tolist() == torch.bincount(indices.reshape(-1), minlength=experts).tolist()
    outputs = torch.randn(tokens * top_k, width, generator=generator, requires_grad=True)
    mixed = combine(outputs, plan)
    reference = torch.zeros(tokens, width).index_add(
        0, plan.token_index, outputs * weights.reshape(-1)[plan.order].unsqueeze(-1))
    torch.testing.assert_close(mixed, reference, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(tokens, width, generator=generator)
    got = torch.autograd.grad((mixed * upstream).sum(), (outputs, weights))
    want = torch.autograd.grad((reference * upstream).sum(), (outputs, weights))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 2), (23, 2), (40, 3)])
def test_gathered_slots_have_the_gradient_of_plain_indexing(tokens, top_k):
    """`gather_slots` (summed, atomic-free backward) equals `tokens[token_index]` and its scatter-add gradient."""
    generator = torch.Generator().manual_seed(tokens)
    indices = torch.randn(tokens, 6, generator=generator).topk(top_k, dim=-1).indices
    plan = dispatch(indices, torch.ones(tokens, top_k), 6)
    hidden = torch.randn(tokens, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(tokens * top_k, 16, dtype=torch.float64, generator=generator)
    gathered = gather_slots(hidden, plan)
    assert torch.equal(gathered, hidden[plan.token_index])
    got = torch.autograd.grad((gathered * upstream).sum(), hidden)[0]
    want = torch.autograd.grad((hidden[plan.token_index] * upstream).sum(), hidden)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")])
def test_gated_activation_on_cpu_is_the_reference(activation):
    hidden = torch.randn(5, 12)
    gate, up = hidden[:, :6], hidden[:, 6:]
    torch.testing.assert_close(gated_activation(hidden, activation), activation(gate) * up, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["traditional", "btx"])
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])  # gated without biases; ungated with biases
def test_few_token_inference_skips_the_sort_and_gives_the_sorted_result(method, model_type, monkeypatch):
    config = MixtureKitConfig(text_config=tiny_config(model_type), method=method, expert_names=list("abcd"),
                              num_experts_per_tok=2)
    model = MixtureKitForCausalLM(config).eval()
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # biases and experts non-zero and different
    tokens = torch.randint(3, VOCAB, (1, 1))
    with torch.no_grad():
        few = model(input_ids=tokens).logits
    sorted_calls = []
    for module in (moe_block, routed_linear):
        monkeypatch.setattr(module, "few_tokens_at_inference", lambda *a: sorted_calls.append(1) and False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, few, atol=1e-5, rtol=1e-5)
    assert sorted_calls, "the sorted path did not run"


def test_few_token_path_is_for_inference_only():
    few_tokens = experts_module.few_tokens_at_inference
    weight = torch.randn(4, 8, 8, requires_grad=True)
    assert not few_tokens(1, 2, 4, weight)  # a gradient is wanted
    assert few_tokens(1, 2, 4, weight.detach())
    with torch.no_grad():
        assert few_tokens(2, 2, 4, weight)
        assert not few_tokens(3, 2, 4, weight)  # more slots than experts: the sort is cheaper than the copies


@pytest.mark.parametrize("rows,out_features,in_features", [
    (2, 8192, 2048), (1, 2048, 8192), (2, 16384, 2048), (1, 4096, 14336), (1, 64, 16), (1, 2048, 100), (64, 2048, 8192),
])
def test_the_decoding_kernels_tiling_keeps_programs_and_bytes_in_flight(rows, out_features, in_features):
    """The CUDA decoding kernel's tiling (a pure function, checked here on CPU): enough programs where the shape has
    them, a power-of-two inner step no longer than the row needs, and the same bytes per step for narrow blocks."""
    from moekit.runtime.compute.chosen_experts_kernel import _MIN_INNER, _PROGRAMS_WANTED, _TILE_ELEMENTS, _tile

    block_n, block_k = _tile(rows, out_features, in_features)
    programs = rows * -(-out_features // block_n)
    assert block_n in (8, 16, 32, 64)
    assert programs >= _PROGRAMS_WANTED or block_n == 8
    assert block_k & (block_k - 1) == 0 and 16 <= block_k
    assert block_k <= max(16, 1 << (in_features - 1).bit_length())
    if block_k < in_features:  # the row is long enough: every step loads a full tile, as large for 8 columns as 64
        assert block_n * block_k == max(_TILE_ELEMENTS, block_n * _MIN_INNER)


@pytest.mark.parametrize("tokens,top_k,with_bias", [(1, 1, False), (1, 2, True), (2, 2, False), (3, 1, True)])
def test_the_decoding_path_for_token_rows_equals_a_loop_over_slots(tokens, top_k, with_bias):
    """`chosen_experts_output` with one row per token (shared by its k slots, no copy) against a float64 loop over
    slots: each slot's row through its chosen expert, then each token's k outputs mixed by its routing weights."""
    experts, d_in, d_out = 4, 16, 24
    generator = torch.Generator().manual_seed(tokens * 10 + top_k)
    rows = torch.randn(tokens, d_in, generator=generator)
    weight = torch.randn(experts, d_out, d_in, generator=generator)
    bias = torch.randn(experts, d_out, generator=generator) if with_bias else None
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    mix = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    per_slot = [[weight[e].double() @ rows[t].double() + (bias[e].double() if with_bias else 0) for e in chosen[t]]
                for t in range(tokens)]
    want_slots = torch.stack([out for token in per_slot for out in token])
    want_mixed = torch.stack([sum(mix[t, j].double() * per_slot[t][j] for j in range(top_k)) for t in range(tokens)])
    got_slots = experts_module.chosen_experts_token_linear(rows, weight, bias, chosen)
    torch.testing.assert_close(got_slots.double(), want_slots, atol=1e-5, rtol=1e-5)
    got_mixed = experts_module.chosen_experts_output(rows, weight, bias, chosen, mix)
    assert got_mixed.dtype == torch.float32 and got_mixed.shape == (tokens, d_out)
    torch.testing.assert_close(got_mixed.double(), want_mixed, atol=1e-5, rtol=1e-5)
    # one row per slot (the down projection's input) takes the gathered-weights reference; the same numbers
    slot_rows = rows.repeat_interleave(top_k, dim=0)
    torch.testing.assert_close(experts_module.chosen_experts_output(slot_rows, weight, bias, chosen, mix), got_mixed,
                               atol=1e-6, rtol=1e-6)


def test_mixing_16_bit_slots_rounds_once_from_float32():
    generator = torch.Generator().manual_seed(0)
    slots = torch.randn(6, 10, generator=generator).bfloat16()
    weights = torch.softmax(torch.randn(3, 2, generator=generator), dim=-1)
    want = (slots.double().view(3, 2, 10) * weights.double().unsqueeze(-1)).sum(1)
    got = experts_module.mix_slots(slots, weights)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2 ** -8)  # one bf16 rounding of the exact sum
    torch.testing.assert_close(experts_module.mix_slots(slots.float(), weights).double(), want, atol=1e-6, rtol=0)


def test_the_copy_limit_counts_one_expert_of_every_parameter(monkeypatch):
    weight, bias = torch.randn(4, 8, 6), torch.randn(4, 8)
    one_expert = (8 * 6 + 8) * 4  # bytes
    with torch.no_grad():
        monkeypatch.setattr(experts_module, "FEW_TOKEN_COPY_LIMIT_BYTES", 2 * one_expert)
        assert experts_module.few_tokens_at_inference(1, 2, 4, weight, bias, None)
        monkeypatch.setattr(experts_module, "FEW_TOKEN_COPY_LIMIT_BYTES", 2 * one_expert - 1)
        assert not experts_module.few_tokens_at_inference(1, 2, 4, weight, bias, None)
