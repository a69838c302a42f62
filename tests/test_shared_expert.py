"""`shared_expert: base`: the base's FFN (btx: projection) always on beside the routed experts, as in Qwen2-MoE.

The block gives ``½ · routed + s(x) · shared`` with s = sigmoid(gate · x) (gate zero at composition) or s = ½; each
test compares with a reference computed from the dense models themselves, or with plain transformers' Qwen2-MoE.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moekit import RecipeError, compose
from moekit.export import ExportError, export
from moekit.runtime import Router
from moekit.runtime.base_model.architecture import decoder_layers
from moekit.runtime.routed.shared_expert import SharedExpertGate
from moekit.training.freeze import apply_freeze_policy, parameter_roles
from balance_reference import balance_loss_float64
from test_export import _run_plain
from tiny_models import VOCAB, force_routing, make_model, save_model, tiny_config

NUM_EXPERTS = 3


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def family(request, tmp_path_factory):
    """A base and three different experts of one family (gpt2: Conv1D weights and biases)."""
    root = tmp_path_factory.mktemp(request.param)
    config = tiny_config(request.param)
    models = [make_model(config, seed) for seed in range(NUM_EXPERTS + 1)]
    folders = [save_model(m, root / f"model{i}") for i, m in enumerate(models)]
    return request.param, root, models, folders


def _recipe(method, base, experts, gate=False, **extra):
    return {"method": method, "base": {"name": "base", "source": str(base)},
            "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(experts)],
            "num_experts_per_tok": 2, "shared_expert": "base", "shared_expert_gate": gate, **extra}


def _tokens(batch=2, length=11, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _blocks(model):
    return decoder_layers(model, model.config.get_text_config())[1]


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_identical_copies_with_a_shared_expert_give_the_dense_logits(family, method, gate):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders[0], [folders[0]] * NUM_EXPERTS, gate, seed=3),
                  root / f"copies-{method}-{gate}", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    shared = [m for m in composed.modules() if getattr(m, "shared_expert", None) is not None]
    assert len(shared) == (2 if method == "traditional" else 2 * len(composed.config.router_layers))
    assert all((m.shared_expert_gate is not None) == gate for m in shared)
    with torch.no_grad():
        assert all(router.weight.abs().sum() > 0 for _, router in composed.routers())
        tokens = _tokens()
        torch.testing.assert_close(composed(input_ids=tokens).logits, models[0](input_ids=tokens).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_block_is_half_the_routed_expert_plus_the_gated_base(family, method):
    """Different experts and base, routing forced to one expert, a non-zero gate: the block equals
    ½ · expert's FFN + sigmoid(g · x) · base's FFN, computed from the dense models."""
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders[3], folders[:3], gate=True), root / f"forced-{method}", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    expert, block = 2, 1
    composed_mlp = _blocks(composed.dense_model)[block].mlp
    expert_mlp, base_mlp = _blocks(models[expert])[block].mlp, _blocks(models[3])[block].mlp
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for module in composed_mlp.modules():
            if isinstance(module, Router):
                force_routing(module, expert)
        if method == "traditional":
            gate = composed_mlp.shared_expert_gate
            gate.weight.normal_(0, 1.0)
            expected = 0.5 * expert_mlp(hidden) + torch.sigmoid(gate(hidden)) * base_mlp(hidden)
        else:  # every routed projection of the FFN mixes ½ expert + s · base projection
            gates = [m for m in composed_mlp.modules() if isinstance(m, SharedExpertGate)]
            assert gates
            for gate in gates:
                gate.weight.normal_(0, 1.0)
            expected = _btx_reference(composed_mlp, expert_mlp, base_mlp, hidden)
        torch.testing.assert_close(composed_mlp(hidden), expected, atol=1e-5, rtol=0)


def _btx_reference(composed_mlp, expert_mlp, base_mlp, hidden):
    """Run the expert's dense FFN with each routed Linear replaced by ½ · expert Linear + s · base Linear."""
    import copy

    from moekit.runtime.routed.routed_linear import RoutedLinear

    reference = copy.deepcopy(expert_mlp)
    for name, routed in composed_mlp.named_modules():
        if isinstance(routed, RoutedLinear):
            mine, base, gate = expert_mlp.get_submodule(name), base_mlp.get_submodule(name), routed.shared_expert_gate

            class Mixed(torch.nn.Module):
                def forward(self, x, mine=mine, base=base, gate=gate):
                    return 0.5 * mine(x) + torch.sigmoid(gate(x)) * base(x)

            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, child, Mixed())
    return reference(hidden)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_generation_with_cache_equals_without(family, method):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders[3], folders[:3], gate=True), root / f"gen-{method}", progress=False,
                  overwrite=True)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        for module in composed.modules():
            if isinstance(module, SharedExpertGate):
                module.weight.normal_(0, 0.5)
    prompt = _tokens(batch=1, length=5, seed=3)
    settings = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(composed.generate(prompt, use_cache=True, **settings),
                       composed.generate(prompt, use_cache=False, **settings))


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_checkpoint_holds_the_base_ffn_and_save_load_is_exact(family, method, tmp_path, no_loading_warnings):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders[3], folders[:3], gate=True), root / f"saved-{method}", progress=False,
                  overwrite=True)
    stored = {}
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            stored.update({k: handle.get_tensor(k) for k in handle.keys()})
    base = models[3].state_dict()
    copies = [k for k in stored if ".shared_expert." in k]
    gates = [k for k in stored if ".shared_expert_gate." in k]
    assert copies and gates
    for name in copies:  # a plain copy of the base's own tensor, bit for bit
        assert torch.equal(stored[name], base[name.replace(".shared_expert.", ".", 1)]), name
    assert all(not stored[name].any() for name in gates)
    composed, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    composed.eval()
    with torch.no_grad():
        for module in composed.modules():
            if isinstance(module, SharedExpertGate):
                module.weight.normal_(0, 0.5)
        tokens = _tokens()
        before = composed(input_ids=tokens).logits
    composed.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, before, atol=0, rtol=0)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-export")
    folders = [save_model(make_model(tiny_config("qwen2"), seed), root / f"m{seed}") for seed in range(4)]
    return root, folders


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("layout", ["per-expert", "packed"])
def test_qwen2_exports_to_qwen2_moe_with_a_real_shared_expert(qwen2, tmp_path, gate, layout):
    root, folders = qwen2
    composed_folder = compose(_recipe("traditional", folders[3], folders[:3], gate, router_init_std=0.5,
                                      router_layers_index=[1]), tmp_path / "composed", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(composed_folder).eval()
    if gate:  # a trained-looking gate, so the export must carry it across
        with torch.no_grad():
            for module in composed.modules():
                if isinstance(module, SharedExpertGate):
                    module.weight.normal_(0, 0.5)
        composed.save_pretrained(tmp_path / "trained")
        composed_folder = tmp_path / "trained"
    exported = export(composed_folder, "auto", tmp_path / "exported", layout=layout)
    config = json.loads((exported / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == config["intermediate_size"] == 48
    assert config["mlp_only_layers"] == [0]
    tokens = _tokens(seed=2)
    result = _run_plain(exported, tokens, tmp_path)
    assert result["class"] == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        expected = composed(input_ids=tokens).logits
    torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=0)
    generated = composed.generate(tokens[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(result["generated"], generated)


def test_qwen2_identical_copies_export_gives_the_dense_logits(qwen2, tmp_path):
    """The exported Qwen2-MoE of identical copies with the shared expert is the dense Qwen2 (in plain transformers)."""
    root, folders = qwen2
    composed_folder = compose(_recipe("traditional", folders[0], [folders[0]] * 3, router_init_std=0.5),
                              tmp_path / "composed", progress=False)
    exported = export(composed_folder, "qwen2_moe", tmp_path / "exported")
    tokens = _tokens(seed=5)
    result = _run_plain(exported, tokens, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(folders[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], dense(input_ids=tokens).logits, atol=1e-5, rtol=0)


def test_freeze_policies_and_the_balance_loss(qwen2, tmp_path):
    root, folders = qwen2
    out = compose(_recipe("traditional", folders[3], folders[:3], gate=True), tmp_path / "c", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    roles = parameter_roles(model)
    assert {roles[n] for n in roles if ".shared_expert." in n} == {"shared_expert"}
    assert {roles[n] for n in roles if ".shared_expert_gate." in n} == {"shared_gate"}
    apply_freeze_policy(model, "routers")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {roles[n] for n in trainable} == {"router", "shared_gate"}
    apply_freeze_policy(model, "routers+attention")
    assert not any(p.requires_grad for n, p in model.named_parameters() if roles[n] in ("shared_expert", "stack"))
    apply_freeze_policy(model, "full")
    assert all(p.requires_grad for p in model.parameters())
    tokens = _tokens()
    model.train()
    output = model(input_ids=tokens, labels=tokens, output_router_logits=True, use_cache=False)
    assert len(output.router_logits) == len(model.routers()) == 2  # the gates are not routers
    # alpha times the sum over the two routers of their float64 balance losses: the gates add no term
    terms = [balance_loss_float64(logits, model.config.num_experts_per_tok) for logits in output.router_logits]
    assert model.current_alpha > 0 and abs(terms[0] - terms[1]) > 1e-4, (model.current_alpha, terms)
    assert output.aux_loss.item() == pytest.approx(model.current_alpha * sum(terms), rel=1e-5)
    output.loss.backward()
    gate = next(m for m in model.modules() if isinstance(m, SharedExpertGate))
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_inspect_shows_the_shared_expert(qwen2, tmp_path):
    from typer.testing import CliRunner

    from moekit.cli import app

    root, folders = qwen2
    recipe = _recipe("traditional", folders[3], folders[:3], gate=True)
    recipe_path = tmp_path / "recipe.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    planned = runner.invoke(app, ["inspect", str(recipe_path)])
    assert planned.exit_code == 0, planned.output
    assert "shared expert (the base's FFN <- base), always on" in planned.output
    assert "½ · routed + s · shared, s = sigmoid(shared_expert_gate · x)" in planned.output
    out = compose(recipe, tmp_path / "c", progress=False)
    inspected = runner.invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0, inspected.output
    assert "shared expert (the base's FFN), always on: " in inspected.output
    assert "serving export: qwen2_moe" in inspected.output
    btx = compose(_recipe("btx", folders[3], folders[:3]), tmp_path / "b", progress=False)
    assert "s = ½ (no gate)" in runner.invoke(app, ["inspect", str(btx)]).output


@pytest.mark.parametrize("change,message", [
    ({"method": "bts"}, "shared_expert applies to methods traditional and btx, not bts"),
    ({"shared_expert": "bsae"}, "shared_expert: Input should be 'base' (got 'bsae') (did you mean 'base'?)"),
    ({"base": None}, "shared_expert: base needs a `base` model"),
    ({"shared_expert": None, "shared_expert_gate": True}, "shared_expert_gate: true needs a shared expert"),
])
def test_bad_recipes_are_refused_with_nothing_written(qwen2, tmp_path, change, message):
    root, folders = qwen2
    recipe = _recipe("traditional", folders[3], folders[:3])
    recipe.update(change)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    with pytest.raises(RecipeError) as error:
        compose(recipe, tmp_path / "out", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_export_of_a_shared_expert_without_a_native_home_is_refused(tmp_path):
    folders = [save_model(make_model(tiny_config("llama"), seed), tmp_path / f"m{seed}") for seed in range(3)]
    out = compose(_recipe("traditional", folders[2], folders[:2]), tmp_path / "c", progress=False)
    with pytest.raises(ExportError, match="shared expert, which mixtral does not have .*compose over Qwen2"):
        export(out, "auto", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_lora_adapts_the_shared_expert_and_trains_its_gate_with_the_routers(qwen2, tmp_path, method):
    from moekit.training.lora import apply_lora

    root, folders = qwen2
    out = compose(_recipe(method, folders[3], folders[:3], gate=True), tmp_path / "c", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    peft_model = apply_lora(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".shared_expert." in n and "lora_A" in n for n in trainable), trainable
    gates = [n for n in trainable if "shared_expert_gate" in n]
    assert gates and all("lora_" not in n for n in gates)  # the gate trains in full, as the routers do
    assert any((".mlp.gate." in n or ".router." in n) and "lora_" not in n for n in trainable)  # the routers too
    with torch.no_grad():  # LoRA starts at zero: the same model
        torch.testing.assert_close(peft_model(input_ids=tokens).logits, before, atol=1e-6, rtol=0)
