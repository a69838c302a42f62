"""Experts that are already Mixtures-of-Experts (fine-tunes of Qwen3-MoE, Mixtral, OLMoE, Qwen3-Next, ...): `btx`
routes the Linears beside their MoE FFN (the attention projections), and averages the rest, their MoE FFNs (router
and experts) included. The DESIGN invariants hold: identical copies give the dense model's logits, greedy generation
with the cache equals it without (hybrids' recurrent state included), save -> load keeps the logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from family_sweep import build_models
from moekit import MixtureKitError, compose

ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
TOKENS = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3))


def _sources(model_type: str, tmp_path, count: int = 2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the families' own notes about missing fast kernels
        _, models = build_models(model_type, count=count)
    folders = []
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"dense{index}")
        folders.append(tmp_path / f"dense{index}")
    return models, folders


def _recipe(folders, router_layers=ATTENTION, **extra):
    return {"method": "btx", "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)],
            "num_experts_per_tok": 2, "router_layers": router_layers, "seed": 5, **extra}


def _greedy(model, use_cache: bool) -> torch.Tensor:
    return model.generate(TOKENS, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmoe", "qwen3_next"])
def test_btx_over_attention_of_moe_experts_keeps_the_invariants(model_type, tmp_path):
    models, folders = _sources(model_type, tmp_path)
    reference = compose(_recipe([folders[0]] * 3), tmp_path / "identical", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(reference).eval()
    with torch.no_grad():  # routed projections sum identical outputs times weights that sum to 1: float32 rounding
        torch.testing.assert_close(composed(input_ids=TOKENS).logits, models[0](input_ids=TOKENS).logits,
                                   atol=1e-5, rtol=1e-4)

    mixed = AutoModelForCausalLM.from_pretrained(compose(_recipe(folders), tmp_path / "mixed", progress=False)).eval()
    routed = {name for name, _ in mixed.named_modules() if name.endswith(".q_proj") and hasattr(_, "router")}
    assert routed, "no attention projection was routed"
    with torch.no_grad():
        assert torch.equal(_greedy(mixed, True), _greedy(mixed, False))
        before = mixed(input_ids=TOKENS).logits
    mixed.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    saved, loaded = mixed.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():  # the same tensors; transformers' expert conversion on load may leave other strides, so
        # its grouped kernel may round differently (seen on Mixtral: 5e-7)
        torch.testing.assert_close(reloaded(input_ids=TOKENS).logits, before, atol=2e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_the_experts_moe_ffns_are_averaged(model_type, tmp_path):
    """Every tensor of the sources' MoE FFNs (their routers and stacked experts) is the mean of the sources'."""
    models, folders = _sources(model_type, tmp_path)
    mixed = AutoModelForCausalLM.from_pretrained(compose(_recipe(folders), tmp_path / "mixed", progress=False))
    dense = [dict(m.named_parameters()) for m in models]
    checked = 0
    for name, parameter in mixed.named_parameters():
        if name not in dense[0] or ".mlp." not in name:
            continue
        mean = (dense[0][name].double() + dense[1][name].double()) / 2
        torch.testing.assert_close(parameter.double(), mean, atol=1e-6, rtol=0)
        checked += 1
    assert checked >= 2 * 2, checked  # each block's MoE router and experts


def test_a_hybrid_routes_attention_in_its_attention_blocks_only(tmp_path):
    """Qwen3-Next mixes Gated DeltaNet blocks with attention blocks: attention projections are routed where they are,
    and the recurrent blocks stay as they were (averaged)."""
    _, folders = _sources("qwen3_next", tmp_path)
    mixed = AutoModelForCausalLM.from_pretrained(compose(_recipe(folders), tmp_path / "mixed", progress=False))
    types = mixed.config.text_config.layer_types
    assert set(types) == {"linear_attention", "full_attention"}
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    assert mixed.config.router_layers_index == full
    routed = sorted({int(name.split(".layers.")[1].split(".")[0]) for name, module in mixed.named_modules()
                     if hasattr(module, "router") and ".layers." in name})
    assert routed == full


def test_linears_held_by_part_of_a_block_are_refused(tmp_path):
    _, folders = _sources("qwen3_next", tmp_path)
    with pytest.raises(MixtureKitError, match=r"block 0 of 'qwen3_next' holds only in part"):
        compose(_recipe(folders, ["self_attn.q_proj", "self_attn.o_proj", "linear_attn.out_proj"]),
                tmp_path / "x", progress=False)


def test_the_default_refusal_names_what_to_route(tmp_path):
    _, folders = _sources("qwen3_moe", tmp_path)
    with pytest.raises(MixtureKitError, match=r"already a Mixture-of-Experts .*self_attn\.q_proj"):
        compose(_recipe(folders, None), tmp_path / "x", progress=False)
    with pytest.raises(MixtureKitError, match=r"btx. over the Linears beside it .*self_attn\.q_proj"):
        compose({**_recipe(folders, None), "method": "traditional"}, tmp_path / "y", progress=False)
