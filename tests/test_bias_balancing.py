"""Loss-free balancing (`balance: bias`, DeepSeek-V3): a per-expert bias that changes the choice, never the weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import MixtureKitConfig, MixtureKitForCausalLM, RecipeError, load_recipe
from moekit.runtime import route
from moekit.runtime.routed.balance import router_sums
from moekit.training import BiasBalanceCallback, bias_update
from tiny_models import VOCAB, tiny_config

E = 4


def _model(method: str = "traditional", balance: str = "bias", seed: int = 0, **fields) -> MixtureKitForCausalLM:
    config = MixtureKitConfig(text_config=tiny_config("llama"), method=method, expert_names=list("abcd"),
                              num_experts_per_tok=2, balance=balance, **fields)
    torch.manual_seed(seed)
    return MixtureKitForCausalLM(config).eval()


def _tokens(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_route_with_bias_chooses_by_biased_logits_and_weighs_by_unbiased_ones():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 2.5, 1.0]])
    bias = torch.tensor([-5.0, 0.0, 0.0, 2.5])
    weights, indices = route(logits, 2, bias)
    # Biased scores: row 0 [-3, 1, .5, 1.5] -> experts 3, 1; row 1 [-5, 3, 2.5, 3.5] -> experts 3, 1.
    assert indices.tolist() == [[3, 1], [3, 1]]
    # Weights: the softmax of the chosen experts' own logits, by hand: e^a / (e^a + e^b).
    expected = torch.tensor([[math.exp(-1.0) / (math.exp(-1.0) + math.exp(1.0)),
                              math.exp(1.0) / (math.exp(-1.0) + math.exp(1.0))],
                             [math.exp(1.0) / (math.exp(1.0) + math.exp(3.0)),
                              math.exp(3.0) / (math.exp(1.0) + math.exp(3.0))]])
    torch.testing.assert_close(weights, expected)
    # Without bias: the plain top 2 of the logits.
    assert route(logits, 2)[1].tolist() == [[0, 1], [1, 2]]


def test_zero_bias_routes_bit_for_bit_as_no_bias():
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    plain_weights, plain_indices = route(logits, 2)
    weights, indices = route(logits, 2, torch.zeros(E))
    assert torch.equal(indices, plain_indices) and torch.equal(weights, plain_weights)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_zero_bias_model_gives_the_logits_and_loss_of_balance_loss_bit_for_bit(method):
    ids = _tokens()
    with torch.no_grad():
        plain = _model(method, balance="loss")(input_ids=ids, labels=ids)
        biased = _model(method, balance="bias")(input_ids=ids, labels=ids)
    assert torch.equal(plain.logits, biased.logits)
    assert torch.equal(plain.loss, biased.loss) and torch.equal(plain.aux_loss, biased.aux_loss)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_model_routes_every_router_through_its_bias(method):
    ids = _tokens(seed=3)
    model = _model(method)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for _, router in model.routers():
            router.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 100.0]))  # every token: experts 2 and 3
        after = model(input_ids=ids, output_router_logits=True)
    assert not torch.equal(before, after.logits)
    # Every router chose experts 2 and 3, weighted by the softmax of their own (unbiased) logits.
    for logits in after.router_logits:
        weights, indices = route(logits, 2, torch.tensor([0.0, 0.0, 100.0, 100.0]))
        assert set(indices.flatten().tolist()) == {2, 3}
        expected = torch.softmax(logits.float()[:, 2:4], dim=-1)
        order = indices[:, 0] == 3  # rows where expert 3 came first
        expected[order] = expected[order].flip(-1)
        torch.testing.assert_close(weights, expected)


def test_biased_choice_matches_a_hand_built_moe_layer():
    """The block's output with a bias equals the mix, by the unbiased softmax of the chosen pair, of the experts' own
    FFN outputs, computed by hand from the stacked weights."""
    model = _model("traditional")
    block = model.model.layers[0].mlp
    bias = torch.tensor([3.0, -3.0, 0.0, 0.5])
    block.gate.expert_bias.copy_(bias)
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = block(hidden)
        logits = hidden @ block.gate.weight.T
        chosen = torch.topk(logits + bias, 2, dim=-1).indices
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2f, d], [E, d, f]
        expected = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            mix = torch.softmax(logits[t, chosen[t]], dim=-1)
            for weight, e in zip(mix, chosen[t].tolist()):
                gate_value, up_value = (gate_up[e] @ hidden[t]).chunk(2)
                expected[t] += weight * (down[e] @ (torch.nn.functional.silu(gate_value) * up_value))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_balance_loss_counts_the_biased_choice():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 6)
    bias = torch.tensor([-10.0, 0.0, 0.0, 10.0])
    sums = router_sums(logits, 2, expert_bias=bias)
    assert sums.slots.tolist() == [0.0, 6.0, 0.0, 6.0]  # the experts `route` runs: 3 and 1
    torch.testing.assert_close(sums.probability_sum, torch.softmax(logits, -1).sum(0))  # unbiased probabilities


def test_bias_update_is_deepseek_v3_sign_rule():
    slots = torch.tensor([[10.0, 2.0, 5.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[-0.01, 0.01, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(bias_update(slots, 0.01), expected)


def _skewed(model: MixtureKitForCausalLM, ids: torch.Tensor) -> None:
    """Every router strongly prefers experts 0 and 1: their rows point along the mean of the router's inputs, the
    rows of experts 2 and 3 against it."""
    inputs = {}
    hooks = [router.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0]))
             for name, router in model.routers()]
    with torch.no_grad():
        model(input_ids=ids)
        for hook in hooks:
            hook.remove()
        for name, router in model.routers():
            mean = inputs[name].reshape(-1, router.hidden_size).float().mean(0)
            direction = 4.0 * mean / mean.norm() ** 2  # logit 4 for the mean input
            router.weight.copy_(torch.stack([direction, 0.9 * direction, -direction, -0.9 * direction]))


def _loads(model: MixtureKitForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids=ids, output_router_logits=True)
    biases = list(model.routing_biases().values())
    rows = [router_sums(logits, 2, expert_bias=bias).slots for logits, bias in zip(output.router_logits, biases)]
    counts = torch.stack(rows)
    return counts / counts.sum(-1, keepdim=True)


def _train(model: MixtureKitForCausalLM, ids: torch.Tensor, steps: int, accumulation: int = 1) -> None:
    """Plain loop, routers frozen (so only the bias can balance): forwards, then the callback's step."""
    callback = BiasBalanceCallback()
    model.train()
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # something to differentiate
    callback.attach(model)
    for _ in range(steps):
        for micro in ids.chunk(accumulation):
            model(input_ids=micro, labels=micro).loss.backward()
        callback.step()
    callback.detach()
    model.eval()


def test_bias_update_moves_a_skewed_router_toward_uniform_load():
    ids = _tokens(seed=5, batch=4, length=16)
    model = _model("traditional", balance_bias_rate=0.3)
    _skewed(model, ids)
    before = _loads(model, ids)
    assert before[:, 2:].max() < 0.1  # experts 2 and 3 get (almost) nothing
    _train(model, ids, steps=12)
    after = _loads(model, ids)

    def entropy(load):
        return -(load * load.clamp(min=1e-12).log()).sum(-1) / math.log(E)

    assert (entropy(after) > entropy(before) + 0.15).all()
    assert after.max() < before.max() - 0.1 and after.min() > 0.15
    # The same steps under balance: loss with alpha 0 change nothing (no callback acts, routers frozen).
    control = _model("traditional", balance="loss", alpha=0.0)
    _skewed(control, ids)
    _train(control, ids, steps=12)
    assert torch.equal(_loads(control, ids), before)


def test_gradient_accumulation_counts_every_micro_batch_of_a_step():
    ids = _tokens(seed=6, batch=4, length=16)
    whole, split = _model("traditional", balance_bias_rate=0.5), _model("traditional", balance_bias_rate=0.5)
    _skewed(whole, ids)
    _skewed(split, ids)
    _train(whole, ids, steps=3)
    _train(split, ids, steps=3, accumulation=2)
    for (_, a), (_, b) in zip(whole.routers(), split.routers()):
        assert torch.equal(a.expert_bias, b.expert_bias)
        assert a.expert_bias.abs().sum() > 0


def test_trainer_moves_the_bias_and_save_load_keeps_it_exactly(tmp_path):
    from moekit.training import train_routers

    model = _model("traditional", balance_bias_rate=0.05)
    blocks = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
    _skewed(model, blocks)
    train_routers(model, blocks, tmp_path / "run", max_steps=4, batch_size=4, progress=False)
    biases = {name: router.expert_bias.clone() for name, router in model.routers()}
    assert all(bias.abs().max() > 0 for bias in biases.values())
    model.save_pretrained(tmp_path / "saved")
    loaded = MixtureKitForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert loaded.config.balance == "bias" and loaded.config.balance_bias_rate == 0.05
    for name, router in loaded.routers():
        assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, biases[name])
    ids = _tokens(seed=8)
    reloaded = MixtureKitForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_checkpoint_without_the_bias_loads_as_zeros(tmp_path):
    """Under `balance: loss` the bias is not saved (nothing but the weights); a `balance: bias` checkpoint written
    without it (as before loss-free balancing) loads with zeros."""
    model = _model("btx", balance="loss")
    model.save_pretrained(tmp_path / "loss")
    (weights,) = (tmp_path / "loss").glob("*.safetensors")
    assert not any(k.endswith("expert_bias") for k in load_file(weights))
    loaded = MixtureKitForCausalLM.from_pretrained(tmp_path / "loss").eval()
    assert loaded.config.balance == "loss"
    assert all(torch.equal(router.expert_bias, torch.zeros(E)) for _, router in loaded.routers())
    ids = _tokens(seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    biased = _model("btx", balance="bias")
    biased.save_pretrained(tmp_path / "bias")
    (weights,) = (tmp_path / "bias").glob("*.safetensors")
    tensors = {k: v for k, v in load_file(weights).items() if not k.endswith("expert_bias")}
    assert len(tensors) < len(load_file(weights))  # saved while it routes
    save_file(tensors, weights, metadata={"format": "pt"})
    loaded = MixtureKitForCausalLM.from_pretrained(tmp_path / "bias").eval()
    assert loaded.config.balance == "bias"
    assert all(torch.equal(router.expert_bias, torch.zeros(E)) for _, router in loaded.routers())


def _recipe(**fields) -> dict:
    return {"method": "traditional", "experts": [{"name": "a", "source": "x"}, {"name": "b", "source": "y"}], **fields}


@pytest.mark.parametrize("fields, message", [
    ({"balance": "bais"}, "did you mean 'bias'"),
    ({"balance": "aux"}, "'loss' or 'bias'"),
    ({"balance": "bias", "balance_bias_rate": 0}, "balance_bias_rate"),
    ({"balance": "bias", "balance_bias_rate": True}, "expected a number"),
    ({"balance_bias_rate": 0.01}, "applies to balance: bias only"),
    ({"method": "bts", "balance": "bias"}, "bts has no routers"),
])
def test_bad_balance_settings_are_refused_naming_what_is_valid(fields, message):
    with pytest.raises(RecipeError, match="balance") as error:
        load_recipe(_recipe(**fields))
    assert message in str(error.value)


def test_recipe_round_trips_and_a_bad_config_value_is_refused():
    recipe = load_recipe(_recipe(balance="bias", balance_bias_rate=0.002, alpha=0.0))
    assert load_recipe(recipe.to_dict()) == recipe
    assert load_recipe(_recipe()).balance == "loss"
    with pytest.raises(RecipeError, match="balance must be one of loss, bias, got 'bais' .did you mean 'bias'"):
        _model(balance="bais")


def test_compose_inspect_and_export_know_the_balance_mode(tmp_path):
    from moekit import compose
    from moekit.export import ExportError, export
    from moekit.inspection import checkpoint_summary
    from tiny_models import make_model, save_model

    config = tiny_config("llama")
    sources = [save_model(make_model(config, seed), tmp_path / f"e{seed}") for seed in range(2)]
    recipe = {"method": "traditional", "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)],
              "balance": "bias", "balance_bias_rate": 0.002, "alpha": 0.0}
    folder = compose(recipe, tmp_path / "composed", progress=False)
    (weights,) = folder.glob("*.safetensors")
    stored = load_file(weights)
    biases = sorted(name for name in stored if name.endswith(".expert_bias"))
    assert biases == ["model.layers.0.mlp.gate.expert_bias", "model.layers.1.mlp.gate.expert_bias"]
    assert all(stored[name].dtype == torch.float32 and not stored[name].any() for name in biases)
    summary = checkpoint_summary(folder)
    assert ("balance: bias (loss-free: per-expert selection bias, rate 0.002 a step; no Switch loss beside it)"
            in summary)
    # A zero bias is left out of a native export; a trained one is refused, naming why.
    exported = export(folder, "mixtral", tmp_path / "mixtral")
    assert not any("expert_bias" in name for path in exported.glob("*.safetensors") for name in load_file(path))
    stored[biases[1]] = torch.tensor([0.0, 0.01])
    save_file(stored, weights, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="router bias 'model.layers.1.mlp.gate.expert_bias' is not zero"):
        export(folder, "mixtral", tmp_path / "mixtral-trained")
    assert not (tmp_path / "mixtral-trained").exists()
