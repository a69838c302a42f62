"""`moekit.load` and the one check of "is this a composed checkpoint" (`runtime.assembly.config.require_composed`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit
from moekit import MixtureKitForCausalLM, SourceError, compose
from moekit.analysis import AnalysisError
from moekit.runtime.assembly.config import require_composed
from tiny_models import VOCAB, make_model, save_model, tiny_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    experts = [save_model(make_model(tiny_config("llama"), seed), root / f"e{seed}") for seed in range(2)]
    composed = compose({"method": "btx", "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)],
                        "router_init": "random"}, root / "composed", progress=False)
    return experts[0], composed


def test_load_gives_the_composed_model_ready_for_inference(folders):
    _, composed = folders
    model = moekit.load(composed)
    assert isinstance(model, MixtureKitForCausalLM) and not model.training
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0)).to(model.device)
    reference = AutoModelForCausalLM.from_pretrained(composed, dtype=torch.float32).eval()
    with torch.no_grad():  # the same model as transformers' own loader gives
        torch.testing.assert_close(model.float()(ids).logits.cpu(), reference(ids.cpu()).logits)
    half = moekit.load(composed, device="cpu", dtype=torch.bfloat16)
    assert half.device.type == "cpu" and next(half.parameters()).dtype == torch.bfloat16
    assert next(moekit.load(composed, device="cpu").parameters()).dtype == torch.float32  # CPU default


def test_dense_and_missing_checkpoints_are_refused_naming_what_was_found(folders, tmp_path):
    dense, _ = folders
    with pytest.raises(SourceError, match=r"is a dense llama checkpoint, not a composed one .*moekit compose"):
        moekit.load(dense)
    with pytest.raises(AnalysisError, match=r"dense llama checkpoint.*routing views need.*, so give a folder"):
        require_composed(dense, "routing views need one", AnalysisError)
    with pytest.raises(SourceError, match="cannot read a model config"):
        moekit.load(tmp_path / "no-such-folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="a checkpoint without a model_type, not a composed one"):
        require_composed(tmp_path / "other")
