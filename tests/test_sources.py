"""Sources other than plain local folders: the Hugging Face cache (offline) and GGUF conversion caching."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import SourceError, compose
from tiny_models import VOCAB, make_model, save_model, tiny_config


def _fake_hub_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder` out the way huggingface_hub stores a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_ids_resolve_from_the_local_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    models = [make_model(tiny_config("mistral"), seed) for seed in range(2)]
    for i, model in enumerate(models):
        _fake_hub_cache(cache, f"acme/expert-{i}", save_model(model, tmp_path / f"m{i}"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = compose({"method": "traditional", "experts": [{"name": "a", "source": "acme/expert-0"},
                                                         {"name": "b", "source": "acme/expert-1"}]},
                  tmp_path / "out", progress=False)
    assert "hub:acme/expert-0" in (out / "README.md").read_text()
    composed = AutoModelForCausalLM.from_pretrained(out)
    assert composed(input_ids=torch.randint(3, VOCAB, (1, 4))).logits.isfinite().all()
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        compose({"method": "btx", "experts": [{"name": "a", "source": "acme/expert-0"},
                                              {"name": "b", "source": "acme/missing"}]},
                tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
