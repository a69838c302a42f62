"""The Switch/Mixtral load-balancing loss: its values at the extremes, masking, and its gradient."""

from __future__ import annotations

import pytest
import torch

from moekit import MixtureKitConfig, MixtureKitForCausalLM, TrainingError, load_balancing_loss
from moekit.runtime import route
from moekit.runtime.routed.balance import balance_from_sums, router_sums
from balance_reference import balance_loss_float64
from tiny_models import VOCAB, enable_activation_checkpointing, tiny_config

E = 4


@pytest.mark.parametrize("top_k", [1, 2])
def test_uniform_routing_gives_one(top_k):
    # Perfectly balanced: equal probabilities, and slots spread evenly over the experts.
    logits = torch.zeros(8 * E, E)
    assert load_balancing_loss(logits, top_k).item() == pytest.approx(1.0)
    # Balanced but confident: each token sure of one expert, tokens cycling over experts.
    confident = torch.full((8 * E, E), -30.0)
    confident[torch.arange(8 * E), torch.arange(8 * E) % E] = 30.0
    assert load_balancing_loss(confident, 1).item() == pytest.approx(1.0, abs=1e-6)


# Four tokens whose probabilities are exact binary fractions (logits are their logarithms), worked by hand below.
HAND_WORKED = [[1 / 2, 1 / 4, 1 / 8, 1 / 8],
               [1 / 2, 1 / 8, 1 / 4, 1 / 8],
               [1 / 8, 1 / 8, 1 / 4, 1 / 2],
               [1 / 4, 1 / 2, 1 / 8, 1 / 8]]
# P (mean probability per expert) = [11/32, 8/32, 6/32, 7/32] for both k.
# k = 1: chosen 0, 0, 3, 1 -> f = [2/4, 1/4, 0, 1/4]; 4 * (22 + 8 + 0 + 7) / 128 = 37/32.
# k = 2: chosen {0,1}, {0,2}, {3,2}, {1,0} -> slots [3, 2, 2, 1] of 8; 4 * (33 + 16 + 12 + 7) / 256 = 17/16.
HAND_WORKED_LOSS = {1: 37 / 32, 2: 17 / 16}


@pytest.mark.parametrize("top_k", [1, 2])
def test_non_uniform_logits_give_the_hand_worked_loss(top_k):
    """Unequal probabilities and unequal slot counts: the loss depends on both (zero logits give 1 whatever the
    counts are, so they cannot show a count or a probability taken wrongly)."""
    exact = torch.tensor(HAND_WORKED, dtype=torch.float64).log()
    assert load_balancing_loss(exact.float(), top_k).item() == pytest.approx(HAND_WORKED_LOSS[top_k], rel=1e-6)
    assert balance_loss_float64(exact, top_k) == pytest.approx(HAND_WORKED_LOSS[top_k], rel=1e-12)


def test_padding_does_not_count_in_the_hand_worked_loss():
    """Padding rows in a [batch, seq, E] tensor, collapsed on expert 2, change neither f nor P once masked."""
    padded = torch.tensor(HAND_WORKED + [[1 / 32, 1 / 16, 7 / 8, 1 / 32]] * 2, dtype=torch.float64).log().float()
    padded = padded[[0, 1, 4, 2, 3, 5]].reshape(2, 3, E)  # one padding token at the end of each sequence
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    for top_k in (1, 2):
        assert load_balancing_loss(padded, top_k, mask).item() == pytest.approx(HAND_WORKED_LOSS[top_k], rel=1e-6)
        unmasked = load_balancing_loss(padded, top_k).item()
        assert unmasked == pytest.approx(balance_loss_float64(padded, top_k), rel=1e-6)
        assert abs(unmasked - HAND_WORKED_LOSS[top_k]) > 0.03


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_random_logits_match_the_float64_reference(top_k):
    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randn(3, 9, 6, generator=generator) * 2
    logits[..., 1] += 1.0  # a preferred expert: unequal counts
    mask = torch.rand(3, 9, generator=generator) > 0.3
    assert load_balancing_loss(logits, top_k).item() == pytest.approx(balance_loss_float64(logits, top_k), rel=1e-5)
    assert load_balancing_loss(logits, top_k, mask).item() == pytest.approx(
        balance_loss_float64(logits, top_k, mask), rel=1e-5)


def test_collapse_gives_num_experts():
    logits = torch.full((32, E), -30.0)
    logits[:, 2] = 30.0
    assert load_balancing_loss(logits, 1).item() == pytest.approx(float(E), rel=1e-6)


def test_collapse_and_balance_differ_for_top2():
    collapsed = torch.full((32, E), -30.0)
    collapsed[:, 0] = 30.0
    collapsed[:, 1] = 29.0  # every token: experts 0 then 1
    assert load_balancing_loss(collapsed, 2).item() > load_balancing_loss(torch.zeros(32, E), 2).item() + 0.5


def test_padding_is_masked_out():
    logits = torch.zeros(10, E)
    logits[5:, 3] = 50.0  # the padded half is collapsed on expert 3
    mask = torch.tensor([True] * 5 + [False] * 5)
    assert load_balancing_loss(logits, 1, mask).item() == pytest.approx(1.0)
    # Unmasked: f = [.5, 0, 0, .5], P = [.125, .125, .125, .625] -> 4 * (.0625 + .3125) = 1.5
    assert load_balancing_loss(logits, 1).item() == pytest.approx(1.5)


def test_route_is_float32_and_renormalised():
    logits = torch.randn(6, E, dtype=torch.bfloat16)
    weights, indices = route(logits, 2)
    assert weights.dtype == torch.float32 and indices.shape == (6, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))


def _model(method: str, alpha: float = 0.5) -> MixtureKitForCausalLM:
    config = MixtureKitConfig(text_config=tiny_config("llama"), method=method, expert_names=list("abcd"),
                              num_experts_per_tok=2, alpha=alpha)
    return MixtureKitForCausalLM(config)


@pytest.mark.parametrize("method,routers", [("traditional", 2), ("btx", 6)])
def test_model_aux_loss_is_alpha_times_sum_over_routers(method, routers):
    model = _model(method).eval()
    for _, router in model.routers():
        torch.nn.init.zeros_(router.weight)  # uniform probabilities everywhere: each router contributes 1
    tokens = torch.randint(3, VOCAB, (2, 8))
    output = model(input_ids=tokens, labels=tokens)
    assert output.aux_loss.item() == pytest.approx(0.5 * routers)
    plain = model.dense_model(input_ids=tokens, labels=tokens).loss
    assert output.loss.item() == pytest.approx(plain.item() + 0.5 * routers, rel=1e-5)
    assert len(model(input_ids=tokens, output_router_logits=True).router_logits) == routers


@pytest.mark.parametrize("method,routers", [("traditional", 2), ("btx", 6)])
def test_model_aux_loss_with_real_routers_and_padding_is_the_float64_sum(method, routers):
    """Non-uniform routers and left padding: alpha times the sum over routers of each router's float64 balance
    loss over the non-padding tokens (each router's term differs, so a mean, a dropped router or counted padding
    shows)."""
    model = _model(method).eval()
    generator = torch.Generator().manual_seed(7)
    for _, router in model.routers():
        router.weight.data = torch.randn(router.weight.shape, generator=generator) * 3
    tokens = torch.randint(3, VOCAB, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding of the first sequence
    output = model(input_ids=tokens, attention_mask=mask, labels=tokens, output_router_logits=True)
    assert len(output.router_logits) == routers
    terms = [balance_loss_float64(logits, 2, mask) for logits in output.router_logits]
    assert max(terms) - min(terms) > 0.01, terms
    assert output.aux_loss.item() == pytest.approx(0.5 * sum(terms), rel=1e-5)
    unmasked = 0.5 * sum(balance_loss_float64(logits, 2) for logits in output.router_logits)
    assert abs(unmasked - output.aux_loss.item()) > 1e-3  # the padding would have changed it
    plain = model.dense_model(input_ids=tokens, attention_mask=mask, labels=tokens).loss
    assert output.loss.item() == pytest.approx(plain.item() + 0.5 * sum(terms), rel=1e-5)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_aux_loss_gradient_reaches_routers_under_checkpointing(method):
    model = _model(method)
    enable_activation_checkpointing(model)
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    tokens = torch.randint(3, VOCAB, (2, 8))
    model(input_ids=tokens, labels=tokens).aux_loss.backward()
    for name, router in model.routers():
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, name


def test_reentrant_checkpointing_is_refused_rather_than_silently_dropping_the_gradient():
    model = _model("traditional")
    enable_activation_checkpointing(model, use_reentrant=True)
    model.train()
    tokens = torch.randint(3, VOCAB, (2, 8))
    with pytest.raises(TrainingError, match="use_reentrant"):
        model(input_ids=tokens, labels=tokens)


def test_single_router_model_loss_is_alpha_uniform_and_alpha_e_collapsed():
    config = MixtureKitConfig(text_config=tiny_config("llama"), method="traditional", expert_names=list("abcd"),
                              num_experts_per_tok=1, alpha=0.25, router_layers_index=[0])
    model = MixtureKitForCausalLM(config).eval()
    (_, router), = model.routers()
    tokens = torch.randint(3, VOCAB, (2, 8))
    torch.nn.init.zeros_(router.weight)
    assert model(input_ids=tokens, labels=tokens).aux_loss.item() == pytest.approx(0.25)

    def collapsed(hidden):  # every token to expert 1 with probability ~1, recorded like the real router
        logits = torch.full((hidden.shape[0], E), -30.0)
        logits[:, 1] = 30.0
        router.recorder.record(router.qualified_name, logits)
        return logits

    router.forward = collapsed
    assert model(input_ids=tokens, labels=tokens).aux_loss.item() == pytest.approx(0.25 * E, rel=1e-6)


def test_balance_split_over_ranks_sums_to_the_global_batch_loss_and_gradient():
    """What each data-parallel rank computes (its own probabilities, the counts summed over ranks) adds up to the
    loss of the whole batch on one process, value and gradient; the rank-local loss does not."""
    logits = torch.randn(24, E) * 2
    logits[:12, 0] += 3  # the first rank's tokens prefer expert 0, so local and global balance differ
    whole = logits.clone().requires_grad_(True)
    load_balancing_loss(whole, 2).backward()
    parts = logits.clone().requires_grad_(True)
    sums = [router_sums(half, 2) for half in parts.split(12)]
    slots, tokens = sum(s.slots for s in sums), sum(s.tokens for s in sums)
    shares = [balance_from_sums(s.probability_sum, slots, tokens, 2) for s in sums]
    sum(shares).backward()
    assert sum(shares).item() == pytest.approx(load_balancing_loss(logits, 2).item(), rel=1e-6)
    torch.testing.assert_close(parts.grad, whole.grad)
    local = sum(load_balancing_loss(half, 2) for half in logits.split(12)) / 2
    assert abs(local.item() - load_balancing_loss(logits, 2).item()) > 0.05


def test_aux_loss_is_weighted_by_the_share_of_label_tokens_the_trainer_counts():
    """`transformers.Trainer` passes `num_items_in_batch` (label tokens over all accumulated micro-batches) and
    sums the losses instead of averaging them: a micro-batch holding half the items adds half its aux loss."""
    model = _model("btx").train()
    tokens = torch.randint(3, VOCAB, (2, 8))
    torch.manual_seed(1)
    alone = model(input_ids=tokens, labels=tokens)
    items = tokens[:, 1:].numel()
    torch.manual_seed(1)
    half = model(input_ids=tokens, labels=tokens, num_items_in_batch=torch.tensor(2 * items))
    assert half.aux_loss.item() == pytest.approx(alone.aux_loss.item(), rel=1e-6)
    assert half.loss.item() == pytest.approx(alone.loss.item() / 2, rel=1e-5)


@pytest.mark.parametrize("top_k,experts", [(1, 4), (2, 8), (4, 16)])
def test_slot_counts_are_the_bincount_of_the_choices_route_makes(top_k, experts):
    """Counted without `bincount` (which synchronises on CUDA): the same counts, biased choices included."""
    from moekit.runtime.routed.balance import slot_counts
    from moekit.runtime.routed.routing import route

    torch.manual_seed(top_k)
    logits = torch.randn(333, experts)
    bias = torch.randn(experts)
    for selection_bias in (None, bias):
        chosen = route(logits, top_k, selection_bias)[1].reshape(-1)
        expected = torch.bincount(chosen, minlength=experts).float()
        assert torch.equal(slot_counts(logits, top_k, selection_bias), expected)
