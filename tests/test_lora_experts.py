"""Experts given as PEFT LoRA adapters of the base compose exactly like the experts merged from them."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moekit import RecipeError, SourceError, compose
from moekit.training.upstream_warnings import upstream_checkpointing_renames_silenced
from tiny_models import make_model, save_model, tiny_config

MLP = ["gate_proj", "up_proj", "down_proj"]


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    """A tiny Llama base, and per name an adapter folder (random LoRA, so the updates are not zero) and the full
    checkpoint PEFT merges from it."""
    root = tmp_path_factory.mktemp("lora")
    base = save_model(make_model(tiny_config("llama"), 0), root / "base")

    def adapter(name, targets, seed, **extra):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with upstream_checkpointing_renames_silenced():  # PEFT 0.21 calls a renamed transformers API
            peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                    init_lora_weights=False, **extra))
            peft.save_pretrained(root / name)
            peft.merge_and_unload().save_pretrained(root / f"{name}-merged")
        return root / name, root / f"{name}-merged"

    folders = {"code": adapter("code", MLP, 1), "math": adapter("math", MLP, 2, use_rslora=True),
               "attention": adapter("attention", ["q_proj", "v_proj"], 3)}
    return base, folders


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_adapters_compose_bit_for_bit_like_their_merged_experts(base_and_adapters, tmp_path, method):
    base, folders = base_and_adapters
    for kind, index in (("adapters", 0), ("merged", 1)):
        compose({"method": method, "base": {"name": "base", "source": str(base)}, "base_as_expert": True,
                 "dtype": "float32", "experts": [{"name": n, "source": str(folders[n][index])} for n in ("code", "math")]},
                tmp_path / kind, progress=False)
    from_adapters, from_merged = _tensors(tmp_path / "adapters"), _tensors(tmp_path / "merged")
    assert set(from_adapters) == set(from_merged)
    for name, tensor in from_merged.items():
        assert torch.equal(from_adapters[name], tensor), name
    recorded = (tmp_path / "adapters" / "mixturekit_recipe.yaml").read_text()
    assert str(folders["code"][0]) in recorded  # the output records the adapters it was composed from


def test_bts_streams_keep_an_adapter_of_any_module(base_and_adapters, tmp_path):
    base, folders = base_and_adapters
    for kind, index in (("adapters", 0), ("merged", 1)):
        compose({"method": "bts", "base": {"name": "hub", "source": str(base)}, "dtype": "float32",
                 "experts": [{"name": n, "source": str(folders[n][index])} for n in ("code", "attention")]},
                tmp_path / kind, progress=False)
    from_adapters, from_merged = _tensors(tmp_path / "adapters"), _tensors(tmp_path / "merged")
    assert all(torch.equal(from_adapters[name], tensor) for name, tensor in from_merged.items())


def test_an_adapter_of_a_module_the_method_does_not_route_is_refused(base_and_adapters, tmp_path):
    base, folders = base_and_adapters
    with pytest.raises(RecipeError, match=r"self_attn.*does not route but averages.*method: bts"):
        compose({"method": "traditional", "base": {"name": "base", "source": str(base)}, "base_as_expert": True,
                 "experts": [{"name": "attention", "source": str(folders["attention"][0])}]},
                tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_adapter_needs_the_recipe_base_to_be_its_base(base_and_adapters, tmp_path):
    base, folders = base_and_adapters
    other = save_model(make_model(tiny_config("llama"), 9), tmp_path / "other")
    with pytest.raises(RecipeError, match="not the recipe's base"):
        compose({"method": "traditional", "base": {"name": "other", "source": str(other)}, "base_as_expert": True,
                 "experts": [{"name": "code", "source": str(folders["code"][0])}]}, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change,reason", [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "trains biases"),
                                           ({"peft_type": "IA3"}, "not LoRA")])
def test_other_peft_variants_are_refused_with_the_reason(base_and_adapters, tmp_path, change, reason):
    import shutil

    base, folders = base_and_adapters
    adapter = tmp_path / "adapter"
    shutil.copytree(folders["code"][0], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SourceError, match=reason):
        compose({"method": "traditional", "base": {"name": "base", "source": str(base)}, "base_as_expert": True,
                 "experts": [{"name": "code", "source": str(adapter)}]}, tmp_path / "out", progress=False)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_adapters_with_a_shared_expert_compose_like_their_merged_experts(base_and_adapters, tmp_path, method):
    """The shared expert copies the base's FFN, which the adapters change: that is by design, not a lost update."""
    base, folders = base_and_adapters
    for kind, index in (("adapters", 0), ("merged", 1)):
        compose({"method": method, "base": {"name": "base", "source": str(base)}, "shared_expert": "base",
                 "dtype": "float32", "experts": [{"name": n, "source": str(folders[n][index])} for n in ("code", "math")]},
                tmp_path / kind, progress=False)
    from_adapters, from_merged, dense = _tensors(tmp_path / "adapters"), _tensors(tmp_path / "merged"), _tensors(base)
    assert set(from_adapters) == set(from_merged)
    for name, tensor in from_merged.items():
        assert torch.equal(from_adapters[name], tensor), name
    shared = [n for n in from_merged if ".shared_expert." in n]
    assert shared and all(torch.equal(from_merged[n], dense[n.replace(".shared_expert.", ".", 1)]) for n in shared)


def test_inspect_names_each_adapter_its_rank_and_the_base_it_adapts(base_and_adapters):
    from moekit import build_plan, plan_summary

    base, folders = base_and_adapters
    plan = build_plan({"method": "traditional", "base": {"name": "base", "source": str(base)}, "base_as_expert": True,
                       "experts": [{"name": "code", "source": str(folders["code"][0])},
                                   {"name": "math", "source": str(folders["math"][1])}]})
    summary = plan_summary(plan)
    assert f"code <- LoRA adapter {folders['code'][0].absolute()} (r=4, alpha=8) over {base}" in summary
    assert f"math <- local:{folders['math'][1]}" in summary  # a full checkpoint is named as before
