"""How an FFN is read off the model (`runtime/base_model/ffn_layout.py`): derived from its children, confirmed on a
probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import UnsupportedArchitectureError
from moekit.runtime.base_model.ffn_layout import check_ffn_computes, mlp_layout


class Block(nn.Module):
    def __init__(self, ffn: nn.Module, child: str = "feed_forward"):
        super().__init__()
        self.self_attn = nn.Linear(8, 8)
        setattr(self, child, ffn)


class Ungated(nn.Module):
    """fc_in/fc_out (names no table lists), an activation module and an output dropout, as GPT-J has."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc_out, self.fc_in = nn.Linear(12, 8), nn.Linear(8, 12)  # declared down first: shapes decide
        self.act, self.dropout, self.scale = nn.GELU(), nn.Dropout(0.1), scale

    def forward(self, x):
        return self.dropout(self.fc_out(self.act(self.fc_in(x)))) * self.scale


class FunctionalGated(nn.Module):
    """LFM2's convention: w1 gate, w3 up, w2 down, and SiLU called as a function."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(8, 12, bias=False), nn.Linear(8, 12, bias=False), nn.Linear(12, 8)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class NormInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj, self.act_fn = nn.Linear(8, 12), nn.Linear(12, 8), nn.ReLU()
        self.sub_norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.down_proj(self.sub_norm(self.act_fn(self.up_proj(x))))


def test_an_ungated_ffn_under_another_name_is_derived_by_shape():
    block = Block(Ungated())
    layout = mlp_layout(block, "toy")
    assert (layout.kind, layout.up, layout.down, layout.activation, layout.dropout, layout.child) == \
        ("dense", ("fc_in",), "fc_out", "act", "dropout", "feed_forward")
    check_ffn_computes(block, layout, "toy")


def test_an_ffn_computing_something_else_is_refused_by_the_probe():
    block = Block(Ungated(scale=2.0))
    layout = mlp_layout(block, "toy")  # its children look like an FFN's ...
    with pytest.raises(UnsupportedArchitectureError, match="does not compute dense fc_in/fc_out"):
        check_ffn_computes(block, layout, "toy")  # ... but it doubles its output: refused, not composed wrongly


def test_a_functional_activation_is_found_also_when_building_on_meta():
    with torch.device("meta"):  # the planner and from_pretrained build the model there
        block = Block(FunctionalGated(), child="mlp")
        layout = mlp_layout(block, "toy")
    assert (layout.kind, layout.up, layout.down, layout.activation, layout.functional) == \
        ("gated", ("w1", "w3"), "w2", "silu", True)


def test_a_norm_inside_the_ffn_is_refused_with_the_reason():
    with pytest.raises(UnsupportedArchitectureError, match="normalises inside .*sub_norm.*`btx` routes its Linears"):
        mlp_layout(Block(NormInside()), "toy")


def test_linears_on_the_block_point_to_btx():
    block = nn.Module()
    block.fc1, block.fc2, block.activation_fn = nn.Linear(8, 12), nn.Linear(12, 8), nn.ReLU()
    with pytest.raises(UnsupportedArchitectureError, match=r"router_layers: \[fc1, fc2\]"):
        mlp_layout(block, "toy")


def test_an_activation_with_parameters_is_averaged_and_kept_under_its_dense_name(tmp_path):
    """Apertus' xIELU has weights of its own: the traditional MoE block keeps one, under the dense FFN's name, whose
    parameters are the experts' mean (as attention's are), and identical experts still give the dense logits."""
    from transformers import AutoModelForCausalLM

    from family_sweep import build_models
    from moekit import compose

    _, models = build_models("apertus", count=2)
    with torch.no_grad():
        for index, model in enumerate(models):
            for name, parameter in model.named_parameters():
                if ".act_fn." in name:
                    parameter.fill_(0.3 + 0.4 * index)  # the two experts' activations differ
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"expert{index}")
    recipe = {"method": "traditional", "num_experts_per_tok": 1,
              "experts": [{"name": f"e{i}", "source": str(tmp_path / f"expert{i}")} for i in range(2)]}
    composed = AutoModelForCausalLM.from_pretrained(compose(recipe, tmp_path / "composed", progress=False))
    activation_parameters = {n: p for n, p in composed.named_parameters() if ".act_fn." in n}
    assert activation_parameters and all(".mlp.act_fn." in n for n in activation_parameters)
    for name, parameter in activation_parameters.items():
        assert torch.allclose(parameter.float(), torch.full_like(parameter.float(), 0.5)), name
    recipe["experts"] = [{"name": f"e{i}", "source": str(tmp_path / "expert1")} for i in range(2)]
    same = AutoModelForCausalLM.from_pretrained(compose(recipe, tmp_path / "same", progress=False)).eval()
    tokens = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=tokens).logits, models[1].eval()(input_ids=tokens).logits,
                                   atol=1e-5, rtol=1e-5)


def test_with_a_shared_expert_the_base_keeps_its_own_activation_parameters(tmp_path):
    """The shared expert is the base's FFN, activation included; the routed experts share the experts' average."""
    from transformers import AutoModelForCausalLM

    from family_sweep import build_models
    from moekit import compose

    _, models = build_models("apertus", count=2)
    with torch.no_grad():
        for index, model in enumerate(models):
            for name, parameter in model.named_parameters():
                if ".act_fn." in name:
                    parameter.fill_(0.3 + 0.4 * index)
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"expert{index}")
    recipe = {"method": "traditional", "num_experts_per_tok": 1, "shared_expert": "base",
              "base": {"name": "b", "source": str(tmp_path / "expert0")},
              "experts": [{"name": f"e{i}", "source": str(tmp_path / f"expert{i}")} for i in range(2)]}
    composed = AutoModelForCausalLM.from_pretrained(compose(recipe, tmp_path / "composed", progress=False))
    activations = {n: p for n, p in composed.named_parameters() if ".act_fn." in n}
    assert any(".shared_expert.act_fn." in n for n in activations)
    for name, parameter in activations.items():
        wanted = 0.3 if ".shared_expert." in name else 0.5
        assert torch.allclose(parameter.float(), torch.full_like(parameter.float(), wanted)), name


def _granitemoehybrid(**overrides):
    from transformers import AutoModelForCausalLM

    from family_sweep import tiny_config

    config = tiny_config("granitemoehybrid")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _attention_block(model):
    return next(layer for layer in model.model.layers if getattr(layer, "self_attn", None) is not None)


def test_granitemoehybrid_dense_form_ffn_is_its_shared_mlp():
    """Without routed experts a GraniteMoeHybrid block's whole FFN is `shared_mlp`, whose `input_linear` writes gate
    then up rows (2 x its width) and `output_linear` reads them back: a gated FFN, confirmed on the probe."""
    model = _granitemoehybrid()
    assert model.config.num_local_experts == 0
    for block in model.model.layers:  # Mamba and attention blocks alike keep shared_mlp as their FFN
        layout = mlp_layout(block, "granitemoehybrid")
        assert (layout.child, layout.kind, layout.up, layout.down) == \
            ("shared_mlp", "gated", ("input_linear",), "output_linear")
        check_ffn_computes(block, layout, "granitemoehybrid")
    ffn = _attention_block(model).shared_mlp
    x = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    ffn = ffn.double()
    gate, up = F.linear(x, ffn.input_linear.weight).chunk(2, dim=-1)
    reference = F.linear(F.silu(gate) * up, ffn.output_linear.weight)
    assert model.config.hidden_act == "silu" and torch.allclose(ffn(x), reference, atol=1e-12)


def test_granitemoehybrid_moe_form_keeps_shared_mlp_beside_its_experts():
    """Beside routed experts `shared_mlp` is an always-on shared expert, not the block's FFN: not picked as one."""
    model = _granitemoehybrid(num_local_experts=2, num_experts_per_tok=1, intermediate_size=16)
    with pytest.raises(UnsupportedArchitectureError, match="has no FFN module"):
        mlp_layout(_attention_block(model), "granitemoehybrid")


def test_granitemoehybrid_dense_form_composes_like_the_dense_model(tmp_path):
    """traditional and btx over identical copies of the dense form: the dense model's logits (any router weights)."""
    from transformers import AutoModelForCausalLM

    from moekit import compose

    dense = _granitemoehybrid()
    dense.save_pretrained(tmp_path / "dense")
    tokens = torch.randint(3, dense.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense(input_ids=tokens).logits
    for method in ("traditional", "btx"):
        recipe = {"method": method, "num_experts_per_tok": 2, "router_init_std": 0.5,
                  "experts": [{"name": name, "source": str(tmp_path / "dense")} for name in "abc"]}
        folder = compose(recipe, tmp_path / method, progress=False)
        composed = AutoModelForCausalLM.from_pretrained(folder).eval()
        names = [name for name, _ in composed.named_parameters() if "shared_mlp" in name]
        assert any("experts" in name or "router" in name for name in names), (method, names)
        with torch.no_grad():
            torch.testing.assert_close(composed(input_ids=tokens).logits, expected, atol=1e-5, rtol=0)
