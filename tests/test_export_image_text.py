"""Native export of image-text compositions, vision tower kept: `traditional` over Qwen3-VL is Qwen3-VL-MoE and over
Qwen3.5 it is Qwen3.5-MoE. Each export is loaded with plain transformers in a process that never imports moekit and
must give the composed model's logits and greedy tokens with an image in the input."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from multimodal_models import FAMILIES, TEXT, make_image_text_model

from moekit import compose
from moekit.export import ExportError, export

PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForImageTextToText
assert "moekit" not in sys.modules
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "generated": generated, "class": type(model).__name__}, sys.argv[3])
"""


def _run_plain(folder, inputs: dict, tmp_path) -> dict:
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _compose(tmp_path, config, **extra):
    models = [make_image_text_model(config, seed) for seed in range(4)]  # all built before any is saved, as the
    folders = [tmp_path / f"dense{seed}" for seed in range(4)]           # sweep does (saving records the dtype)
    for model, folder in zip(models, folders):
        model.save_pretrained(folder)
    recipe = {"method": "traditional", "num_experts_per_tok": 2, "router_init_std": 0.5,
              "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders[:3])], **extra}
    if extra.get("shared_expert"):
        recipe["base"] = {"name": "base", "source": str(folders[3])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compose(recipe, tmp_path / "composed", progress=False)


def _stored_names(folder) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    return {name for file in folder.glob("*.safetensors") for name in safe_open(file, "pt").keys()}


@pytest.mark.parametrize("family,target,cls,layout,extra", [
    ("qwen3_vl", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "per-expert", {}),
    ("qwen3_vl", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "packed", {"router_layers_index": [1]}),
    ("qwen3_5", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "per-expert", {}),
    ("qwen3_5", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "packed",
     {"shared_expert": "base", "shared_expert_gate": True}),
])
def test_image_text_export_matches_the_composition_with_an_image(tmp_path, family, target, cls, layout, extra):
    config, make_inputs = FAMILIES[family]()
    folder = _compose(tmp_path, config, **extra)
    exported = export(folder, "auto", tmp_path / "exported", layout=layout)
    written = AutoConfig.from_pretrained(exported)
    assert written.model_type == target and written.architectures == [cls]
    assert written.text_config.num_experts == 3 and written.vision_config.depth == 1
    if extra.get("router_layers_index"):  # block 0 keeps the dense FFN the experts averaged
        assert written.text_config.mlp_only_layers == [0]
    names = _stored_names(exported)
    assert any(name.startswith("model.visual.") for name in names)
    layer = "model.language_model.layers.1.mlp"
    if layout == "packed" or target == "qwen3_vl_moe":  # Qwen3-VL-MoE's Hub layout is packed too, transposed
        assert {f"{layer}.experts.gate_up_proj", f"{layer}.experts.down_proj", f"{layer}.gate.weight"} <= names
    else:
        assert {f"{layer}.experts.{e}.{p}.weight" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")} \
            <= names

    composed = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = dict(make_inputs(config))
    result = _run_plain(exported, inputs, tmp_path)
    assert result["class"] == cls
    with torch.no_grad():
        reference = composed(**inputs).logits
        text_only = composed(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(reference, text_only, atol=1e-3)  # the image is really read
    torch.testing.assert_close(result["logits"], reference, atol=1e-5, rtol=0)
    generated = composed.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(result["generated"], generated)


def test_qwen3_vl_hub_layout_is_transposed(tmp_path):
    """The per-expert (Hub) layout of Qwen3-VL-MoE: `gate_up_proj [E, d, 2f]` and `down_proj [E, f, d]`, the
    composition's stacked experts transposed."""
    from safetensors import safe_open

    config, _ = FAMILIES["qwen3_vl"]()
    folder = _compose(tmp_path, config)
    exported = export(folder, "auto", tmp_path / "exported")
    tensors, stored = {}, {}
    for target, source in ((tensors, exported), (stored, folder)):
        for file in source.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                target.update({k: f.get_tensor(k) for k in f.keys() if ".mlp.experts." in k})
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert tensors[name].shape == (3, TEXT["hidden_size"], 2 * TEXT["intermediate_size"])
    assert torch.equal(tensors[name], stored[name].transpose(1, 2))
    down = name.replace("gate_up_proj", "down_proj")
    assert torch.equal(tensors[down], stored[down].transpose(1, 2))


def test_qwen3_vl_square_experts_are_refused_in_the_hub_layout(tmp_path):
    """A hidden size equal to the FFN width makes the transposed layout indistinguishable to transformers' loader:
    refused in that layout, written in the packed one."""
    config, _ = FAMILIES["qwen3_vl"]()
    config.text_config.intermediate_size = config.text_config.hidden_size
    folder = _compose(tmp_path, config)
    with pytest.raises(ExportError, match="--layout packed"):
        export(folder, "auto", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert export(folder, "auto", tmp_path / "packed", layout="packed").is_dir()


def test_qwen3_vl_with_a_shared_expert_is_refused(tmp_path):
    config, _ = FAMILIES["qwen3_vl"]()
    folder = _compose(tmp_path, config, shared_expert="base")
    with pytest.raises(ExportError, match="shared expert, which qwen3_vl_moe does not have"):
        export(folder, "auto", tmp_path / "exported")


def test_gemma4_image_text_is_refused_with_why_its_moe_layer_differs(tmp_path):
    config, _ = FAMILIES["gemma4"]()
    folder = _compose(tmp_path, config)
    with pytest.raises(ExportError, match=r"traditional over 'gemma4' has no exact native MoE: Gemma 4's MoE layer"):
        export(folder, "auto", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
