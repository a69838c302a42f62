"""No code runs from checkpoints; routing stays finite in bf16 and refuses NaNs when debug checks are on."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import SourceError, compose
from moekit.errors import RoutingNumericsError
from moekit.runtime import Router, route, set_debug_checks
from tiny_models import VOCAB, make_model, save_model, tiny_config


def _pickle_folder(model, folder, state=None):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(state if state is not None else model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickle_sources_need_the_flag_and_are_read_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTUREKIT_CACHE", str(tmp_path / "cache"))
    models = [make_model(tiny_config("llama"), seed) for seed in range(2)]
    folders = [_pickle_folder(m, tmp_path / f"p{i}") for i, m in enumerate(models)]
    recipe = {"method": "traditional", "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]}
    with pytest.raises(SourceError, match="allow_pickle: true"):
        compose(recipe, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    out = compose({**recipe, "allow_pickle": True}, tmp_path / "out", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert composed(input_ids=torch.randint(3, VOCAB, (1, 5))).logits.isfinite().all()


class _Exploit:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_a_pickle_that_runs_code_is_refused_even_with_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTUREKIT_CACHE", str(tmp_path / "cache"))
    good = save_model(make_model(tiny_config("llama"), 0), tmp_path / "good")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((good / "config.json").read_text())
    with open(evil / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Exploit()}, handle, protocol=2)  # as torch.save writes
    recipe = {"method": "btx", "allow_pickle": True,
              "experts": [{"name": "good", "source": str(good)}, {"name": "evil", "source": str(evil)}]}
    with pytest.raises(SourceError, match="weights_only=True"):
        compose(recipe, tmp_path / "out", progress=False)


def test_models_that_need_custom_code_are_refused(tmp_path):
    good = save_model(make_model(tiny_config("llama"), 0), tmp_path / "good")
    custom = save_model(make_model(tiny_config("llama"), 1), tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="trust_remote_code"):
        compose({"method": "btx", "experts": [{"name": "a", "source": str(good)}, {"name": "b", "source": str(custom)}]},
                tmp_path / "out", progress=False)


def test_bf16_hidden_states_of_large_magnitude_route_finitely():
    router = Router(64, 4)
    hidden = (torch.randn(32, 64) * 3e4).to(torch.bfloat16)
    weights, indices = route(router(hidden), 2)
    assert weights.isfinite().all() and torch.allclose(weights.sum(-1), torch.ones(32))
    assert ((0 <= indices) & (indices < 4)).all()


def test_nan_hidden_states_raise_with_debug_checks_and_name_the_router():
    from moekit import MixtureKitConfig, MixtureKitForCausalLM

    composed = MixtureKitForCausalLM(MixtureKitConfig(text_config=tiny_config("llama"), method="btx",
                                                      expert_names=["a", "b"]))
    (name, router), *_ = composed.routers()
    hidden = torch.randn(4, 32)
    hidden[2, 5] = float("nan")
    set_debug_checks(True)
    try:
        with pytest.raises(RoutingNumericsError, match=rf"{name}.*rows \[2\]"):
            router(hidden)
    finally:
        set_debug_checks(False)
    assert router(hidden).shape == (4, 2)  # off by default: no check, no synchronisation
