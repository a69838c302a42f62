"""Router training on transformers' Trainer, router z-loss, automatic alpha, and the dead-expert warning."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import MixtureKitConfig, MixtureKitForCausalLM, TrainingError, compose
from moekit.training import AutoAlphaCallback, RoutingStatsCallback, train_routers
from moekit.training.router_init import initialize_routers, router_inputs
from balance_reference import router_z_loss
from tiny_models import VOCAB, tiny_config
from toy_domains import domain_blocks, dominant_share, make_experts


@pytest.fixture(scope="module")
def toy_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return root, make_experts(root)


@pytest.fixture(scope="module")
def toy(toy_folders):
    root, folders = toy_folders
    out = compose({"method": "traditional", "alpha": 0.0, "experts": [
        {"name": "a", "source": str(folders["a"])}, {"name": "b", "source": str(folders["b"])}]},
        root / "composed", progress=False)
    return root, out


HELD_OUT = {"a": domain_blocks("a", 32, 16, 20), "b": domain_blocks("b", 32, 16, 21)}


def _shares(model):
    return {d: dominant_share(model, blocks, i) for i, (d, blocks) in enumerate(HELD_OUT.items())}


def test_data_init_then_router_training_sends_each_domain_to_its_expert(toy):
    """The acceptance toy: >= 90% of each domain's (token, router) pairs go to its expert after training, and router
    training changes the routers only."""
    root, out = toy
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(0.25 < share < 0.75 for share in _shares(model).values())  # random routers: chance
    initialize_routers(model, None, "data", {"a": domain_blocks("a", 16, 16, 30), "b": domain_blocks("b", 16, 16, 31)})
    initialised = _shares(model)
    assert sum(initialised.values()) / 2 > 0.75, initialised
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    mixed = torch.cat([domain_blocks("a", 128, 16, 10), domain_blocks("b", 128, 16, 11)])
    summary = train_routers(model, mixed, root / "run", max_steps=100, learning_rate=2e-2, progress=False)
    after = _shares(model)
    assert all(share >= 0.9 for share in after.values()), after
    assert summary.trainable == sum(r.weight.numel() for _, r in model.routers())
    routers = {f"{name}.weight" for name, _ in model.routers()}
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]) != (name in routers), name


def test_router_training_from_random_routers_moves_towards_the_domains(toy):
    root, out = toy
    model = AutoModelForCausalLM.from_pretrained(out)
    before = _shares(model)
    mixed = torch.cat([domain_blocks("a", 128, 16, 10), domain_blocks("b", 128, 16, 11)])
    train_routers(model, mixed, root / "run-random", max_steps=150, learning_rate=0.3, progress=False)
    after = _shares(model)
    assert all(after[d] > before[d] + 0.1 for d in after), (before, after)


def test_hidden_init_points_rows_from_negative_to_positive_prompts(toy_folders):
    """Composed from two copies of one expert, the model under uniform routing is that dense model, so each router's
    input is the dense block's FFN input: the expected rows are unit vectors between the dense model's mean FFN
    inputs over the two prompt sets, captured from plain transformers (not with `router_inputs`)."""
    root, folders = toy_folders
    out = compose({"method": "traditional", "experts": [
        {"name": "a", "source": str(folders["a"])}, {"name": "b", "source": str(folders["a"])}]},
        root / "copies", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    positive = {"a": domain_blocks("a", 8, 16, 30), "b": domain_blocks("b", 8, 16, 31)}
    negative = {"a": positive["b"], "b": positive["a"]}
    initialize_routers(model, None, "hidden", positive, negative)
    dense = AutoModelForCausalLM.from_pretrained(folders["a"]).eval()
    means = {domain: _dense_ffn_input_means(dense, blocks) for domain, blocks in positive.items()}
    assert [name for name, _ in model.routers()] == [f"model.layers.{i}.mlp.gate" for i in range(len(means["a"]))]
    for layer, (name, router) in enumerate(model.routers()):
        direction = means["a"][layer] - means["b"][layer]
        expected = direction / direction.norm()
        torch.testing.assert_close(router.weight[0].double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(router.weight[1].double(), -expected, atol=1e-5, rtol=0)


def _dense_ffn_input_means(dense, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Per block of the dense model, the float64 mean over every token of `blocks` of its FFN's input."""
    sums: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda module, args, i=i: sums.__setitem__(i, sums.get(i, 0) + args[0].double().reshape(-1, args[0].shape[-1])
                                                   .sum(0)))
        for i, layer in enumerate(dense.model.layers)]
    try:
        with torch.no_grad():
            for block in blocks:  # one sequence at a time, as the prompts are
                dense(input_ids=block[None])
    finally:
        for hook in hooks:
            hook.remove()
    return [sums[i] / blocks.numel() for i in sorted(sums)]


def test_router_inputs_do_not_depend_on_the_routers(toy):
    """Hidden states for initialisation come from uniform mixing of different experts: the same whatever the
    routers held before (random, or forced onto one expert)."""
    root, out = toy
    model = AutoModelForCausalLM.from_pretrained(out)
    blocks = domain_blocks("a", 4, 16, 30)
    before = router_inputs(model, None, blocks)
    for _, router in model.routers():
        router.weight.data[0] += 100.0 * router.weight.data[0].sign()  # every token to expert a
    forced = router_inputs(model, None, blocks)
    assert before.keys() == forced.keys() and len(before) == 2
    for name in before:
        torch.testing.assert_close(forced[name], before[name], atol=1e-5, rtol=0)
    # and the forced routing does change the second block's input outside the initialisation
    second = model.routers()[1][1]
    seen = []
    handle = second.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=blocks[:1])
    handle.remove()
    assert (seen[0] - before[model.routers()[1][0]][:16]).abs().max() > 1e-3


def test_router_init_refuses_missing_or_unknown_experts(toy):
    root, out = toy
    model = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(TrainingError, match=r"none for \['b'\]"):
        initialize_routers(model, None, "data", {"a": domain_blocks("a", 2, 8, 1)})
    with pytest.raises(TrainingError, match="unknown experts"):
        initialize_routers(model, None, "data", {"a": domain_blocks("a", 2, 8, 1), "b": domain_blocks("b", 2, 8, 1),
                                                 "c": domain_blocks("a", 2, 8, 1)})
    with pytest.raises(TrainingError, match="hidden or data"):
        initialize_routers(model, None, "mean", {})


def test_train_routers_refuses_bad_data(toy, tmp_path):
    root, out = toy
    model = AutoModelForCausalLM.from_pretrained(out)
    from datasets import Dataset

    with pytest.raises(TrainingError, match="empty"):
        train_routers(model, Dataset.from_dict({"input_ids": []}), tmp_path, max_steps=1, progress=False)
    with pytest.raises(TrainingError, match="needs an `input_ids` column"):
        train_routers(model, Dataset.from_dict({"text": ["x"]}), tmp_path, max_steps=1, progress=False)
    with pytest.raises(TrainingError, match=r"\[n, length\]"):
        train_routers(model, torch.zeros(5, dtype=torch.long), tmp_path, max_steps=1, progress=False)


def _single_router_model(**config):
    model = MixtureKitForCausalLM(MixtureKitConfig(
        text_config=tiny_config("llama"), method="traditional", expert_names=list("abcd"), num_experts_per_tok=1,
        router_layers_index=[0], **config))
    (_, router), = model.routers()
    return model, router


def _collapse(router, expert=0):
    """Every token to `expert`; the router is frozen (its forced logits carry no gradient)."""
    router.weight.requires_grad_(False)

    def forced(self, hidden):
        logits = torch.full((hidden.shape[0], 4), -20.0)
        logits[:, expert] = 20.0
        self.recorder.record(self.qualified_name, logits)
        return logits
    router.forward = types.MethodType(forced, router)


def test_z_loss_matches_a_float64_reference():
    logits = torch.randn(12, 4) * 3
    expected = torch.logsumexp(logits.double(), -1).pow(2).mean()
    assert router_z_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    model, router = _single_router_model(alpha=0.0, router_z_loss_coef=0.5)
    tokens = torch.randint(3, VOCAB, (2, 6))
    output = model(input_ids=tokens, labels=tokens, output_router_logits=True)
    (recorded,) = output.router_logits
    assert output.aux_loss.item() == pytest.approx(0.5 * router_z_loss(recorded).item(), rel=1e-6)


def test_auto_alpha_grows_under_collapse_and_decays_back():
    model, router = _single_router_model(alpha=0.01, alpha_mode="auto", alpha_max=0.5)
    model.train()
    tokens = torch.randint(3, VOCAB, (2, 6))
    _collapse(router)
    controller = AutoAlphaCallback()
    controller.attach(model)
    for _ in range(20):
        model(input_ids=tokens, labels=tokens)
        controller.step()
    assert model.current_alpha == controller.alpha == pytest.approx(0.5)  # capped at alpha_max
    router.forward = types.MethodType(type(router).forward, router)
    torch.nn.init.zeros_(router.weight)  # uniform probabilities: top-1 ties are spread by index, so all ...
    model.config.load_floor = 0.0  # ... loads pass a zero floor and alpha decays towards the configured one
    for _ in range(200):
        model(input_ids=tokens, labels=tokens)
        controller.step()
    assert model.current_alpha == pytest.approx(0.01)


def test_the_forward_changes_no_alpha_and_keeps_no_statistics():
    """The balance loss is a function of the router outputs: training forwards under collapse, with alpha_mode auto,
    leave alpha and the loss as they were; without a hook attached the model counts nothing."""
    model, router = _single_router_model(alpha=0.01, alpha_mode="auto", alpha_max=0.5)
    model.train()
    _collapse(router)
    tokens = torch.randint(3, VOCAB, (2, 6))
    losses = [model(input_ids=tokens, labels=tokens).aux_loss.item() for _ in range(5)]
    assert model.current_alpha == 0.01 and losses == [pytest.approx(0.01 * 4, rel=1e-6)] * 5
    assert not hasattr(model, "routing_statistics")
    seen = []
    handle = model.register_routing_hook(seen.append)
    model(input_ids=tokens, labels=tokens)
    with torch.no_grad():
        model(input_ids=tokens, labels=tokens)  # not a training forward: no hook
    handle.remove()
    model(input_ids=tokens, labels=tokens)
    (routing,) = seen
    assert routing.names == [model.routers()[0][0]] and routing.slots.tolist() == [[12.0, 0.0, 0.0, 0.0]]
    assert routing.aux_loss.item() == pytest.approx(0.04, rel=1e-6) and not routing.aux_loss.requires_grad


def test_auto_alpha_survives_resume(toy, tmp_path):
    """The controller's alpha is saved in each checkpoint's trainer state: a run resumed from the middle ends with the
    alpha of the uninterrupted run, which differs from the one a fresh controller would reach."""
    import json

    root, out = toy
    blocks = domain_blocks("a", 64, 16, 5)

    def run(folder, max_steps, resume=False):
        model = AutoModelForCausalLM.from_pretrained(out)
        model.config.update({"alpha": 0.01, "alpha_mode": "auto", "load_floor": 1.0, "alpha_max": 1.0})  # grows
        train_routers(model, blocks, folder, max_steps=max_steps, batch_size=4, save_steps=2, resume=resume,
                      progress=False)
        return model.current_alpha

    whole = run(tmp_path / "whole", 4)
    assert whole == pytest.approx(0.01 * 1.5 ** 4)  # every step under a floor of 1: x1.5 per optimizer step
    saved = json.loads((tmp_path / "whole" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["AutoAlphaCallback"]["attributes"]["alpha"] == pytest.approx(0.01 * 1.5 ** 2)
    run(tmp_path / "cut", 2)
    assert run(tmp_path / "cut", 4, resume=True) == pytest.approx(whole)
    # A checkpoint without the controller's entry (an older release wrote it) resumes from the configured alpha.
    run(tmp_path / "old", 2)
    state_file = tmp_path / "old" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["AutoAlphaCallback"]
    state_file.write_text(json.dumps(state))
    assert run(tmp_path / "old", 4, resume=True) == pytest.approx(0.01 * 1.5 ** 2)


def test_dead_expert_warning_once_after_the_window():
    model, router = _single_router_model()
    model.train()
    _collapse(router, expert=2)
    callback = RoutingStatsCallback(window=5)
    callback.attach(model)
    tokens = torch.randint(3, VOCAB, (2, 6))
    caught = []
    for step in range(12):
        model(input_ids=tokens, labels=tokens)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            callback.on_step_end(None, None, None, model=model)
        caught += [str(w.message) for w in seen]
    dead = {0, 1, 3}
    assert len(caught) == len(dead)  # once per dead expert, not every step
    assert all("is dead" in message for message in caught)
    assert {int(m.split("expert ")[1].split(" ")[0]) for m in caught} == dead
    logs = {}
    callback.on_log(None, None, None, logs=logs, model=model)
    assert logs["routing/dead_experts"] == 3 and logs["routing/max_load_max"] == pytest.approx(1.0)


def test_auto_alpha_keeps_an_expert_alive_where_alpha_zero_lets_it_die(toy_folders):
    """Train on domain a only, with two a-experts and one b-expert, top-2: with alpha = 0 the first router drops
    the b-expert (it gets under 1% of the slots); `alpha_mode: auto` keeps every expert above the floor."""
    from tiny_models import save_model
    from toy_domains import train_dense

    root, folders = toy_folders
    second_a = AutoModelForCausalLM.from_pretrained(folders["seed"])
    train_dense(second_a, domain_blocks("a", 256, 16, 7), 150, seed=7)
    save_model(second_a, root / "a2")
    data, held_out = domain_blocks("a", 256, 16, 10), domain_blocks("a", 64, 16, 20)
    lowest = {}
    for mode in ("fixed", "auto"):
        out = compose({"method": "traditional", "num_experts_per_tok": 2, "alpha": 0.0, "experts": [
            {"name": "a", "source": str(folders["a"])}, {"name": "a2", "source": str(root / "a2")},
            {"name": "b", "source": str(folders["b"])}]}, root / f"collapse-{mode}", progress=False)
        model = AutoModelForCausalLM.from_pretrained(out)
        model.config.alpha_mode = mode
        train_routers(model, data, root / f"run-{mode}", max_steps=200, learning_rate=0.1, progress=False)
        with torch.no_grad():
            logits = model(input_ids=held_out, output_router_logits=True).router_logits
        loads = [torch.bincount(torch.topk(l, 2).indices.reshape(-1), minlength=3).float() / (2 * l.shape[0])
                 for l in logits]
        lowest[mode] = min(load.min().item() for load in loads)
    assert lowest["fixed"] < 0.02, lowest  # collapsed: one expert dead
    assert lowest["auto"] > 0.5 / 3 * 0.9, lowest  # alive: near or above the floor of half the uniform share


def test_a_plain_trainer_logs_the_balance_loss_beside_the_loss(toy, tmp_path):
    """transformers' `Trainer` (here through `train_routers`) with `RoutingStatsCallback`: the balance loss inside the
    optimised loss is logged on its own (`routing/aux_loss`), equal to the model's on that batch before the step."""
    import json

    root, out = toy
    model = AutoModelForCausalLM.from_pretrained(out)
    model.config.alpha = model.current_alpha = 0.1
    block = domain_blocks("a", 1, 16, 5)
    batch = block.repeat(4, 1)  # every batch the same: the first logged value is computable beforehand
    model.train()
    expected = model(input_ids=batch, labels=batch).aux_loss.item()
    train_routers(model, block.repeat(32, 1), tmp_path / "run", max_steps=1, batch_size=4, learning_rate=0.0,
                  progress=False, save_to=tmp_path / "out")
    logged = [e for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert expected > 0 and logged[0]["routing/aux_loss"] == pytest.approx(expected, rel=1e-4)
    assert logged[0]["routing/aux_loss"] < logged[0]["loss"]
