"""DESIGN.md invariants for `traditional` and `btx`, on tiny random models of every supported family."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moekit import compose
from moekit.runtime import Router
from tiny_models import ARCHITECTURES, VOCAB, force_routing, make_model, padded_prompts, save_model, tiny_config

METHODS = ["traditional", "btx"]
NUM_EXPERTS = 3


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def family(request, tmp_path_factory):
    """Three different dense models of one family, saved, plus the models themselves."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    config = tiny_config(model_type)
    models = [make_model(config, seed) for seed in range(NUM_EXPERTS)]
    folders = [save_model(m, root / f"expert{i}") for i, m in enumerate(models)]
    return model_type, root, models, folders


def _recipe(method, folders, **extra):
    return {"method": method, "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)],
            "num_experts_per_tok": 2, **extra}


def _tokens(batch=2, length=11, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_identical_copies_give_the_dense_logits(family, method):
    model_type, root, models, folders = family
    out = compose(_recipe(method, [folders[0]] * NUM_EXPERTS, seed=7), root / f"copies-{method}", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # random, not zero, routers: any routing must give the dense output
        assert all(router.weight.abs().sum() > 0 for _, router in composed.routers())
        tokens = _tokens()
        torch.testing.assert_close(composed(input_ids=tokens).logits, models[0](input_ids=tokens).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_restores_routers(family, method, tmp_path, no_loading_warnings):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders), root / f"mixed-{method}", progress=False, overwrite=True)
    composed, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    names = {name for name, _ in composed.routers()}
    assert names, "no router was built"
    files = sorted(out.glob("*.safetensors"))
    stored = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            stored.update({k: handle.get_tensor(k) for k in handle.keys() if k.removesuffix(".weight") in names})
    for name, router in composed.routers():
        torch.testing.assert_close(router.weight.data, stored[f"{name}.weight"], atol=0, rtol=0)
    tokens = _tokens()
    composed.eval()
    with torch.no_grad():
        before = composed(input_ids=tokens).logits
    composed.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_generation_with_cache_equals_without(family, method):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders), root / f"gen-{method}", progress=False, overwrite=True)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = _tokens(batch=1, length=5, seed=3)
    settings = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    with_cache = composed.generate(prompt, use_cache=True, **settings)
    without_cache = composed.generate(prompt, use_cache=False, **settings)
    assert with_cache.shape[1] == prompt.shape[1] + 12
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 7), (3, 16)])
def test_padded_batch_generation_with_cache_equals_without(family, method, batch, length):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders), root / f"gen-{method}", progress=False, overwrite=True)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt, mask = padded_prompts(batch, length, seed=length)
    settings = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = composed.generate(prompt, use_cache=True, **settings)
    assert with_cache.shape == (batch, length + 8)
    assert torch.equal(with_cache, composed.generate(prompt, use_cache=False, **settings))


def _tensor_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method", METHODS)
def test_same_recipe_gives_identical_bytes(family, method):
    model_type, root, models, folders = family
    first = compose(_recipe(method, folders), root / f"twice-a-{method}", progress=False, overwrite=True)
    second = compose(_recipe(method, folders), root / f"twice-b-{method}", progress=False, overwrite=True)
    assert _tensor_digests(first) == _tensor_digests(second) != {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("expert", [0, 2])
def test_forced_routing_reproduces_that_experts_ffn(family, method, expert):
    model_type, root, models, folders = family
    out = compose(_recipe(method, folders), root / f"forced-{method}", progress=False, overwrite=True)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    block = 1
    composed_mlp = composed.dense_model.get_submodule(_mlp_path(composed, block))
    dense_mlp = models[expert].get_submodule(_mlp_path(models[expert], block))
    for module in composed_mlp.modules():
        if isinstance(module, Router):
            force_routing(module, expert)
    hidden = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(composed_mlp(hidden), dense_mlp(hidden), atol=1e-5, rtol=0)


def _mlp_path(model, block):
    from moekit.runtime.base_model.architecture import decoder_layers

    name, _ = decoder_layers(model, model.config.get_text_config())
    return f"{name}.{block}.mlp"
