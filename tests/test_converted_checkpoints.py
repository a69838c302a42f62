"""Checkpoints whose stored layout transformers converts on load (its per-model-type rules in
`transformers.conversion_mapping`, reverted by `save_pretrained`, so even tiny models it saves keep the stored layout)
are read as transformers loads them: renamed (EXAONE's `transformer.h.*`), split (LaraMini's fused `in_proj`), or
stacked (MoE experts stored one Linear each), planned from headers alone and converted tensor by tensor on read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from family_sweep import tiny_config
from moekit import CompatibilityError, MixtureKitError, build_plan, compose, merge_experts
from moekit.sources import CheckpointReader
from tiny_models import VOCAB, make_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # families' own warnings about tiny configs


def _needs(model_type: str, rule_text: str | None = None) -> None:
    """Skip where the installed transformers lacks the family, or lacks the conversion rule under test (5.17)."""
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers has no '{model_type}' here")
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    rules = get_checkpoint_conversion_mapping(model_type) or []
    if rule_text is not None and not any(rule_text in str(rule.source_patterns) for rule in rules):
        pytest.skip(f"transformers converts no '{rule_text}' of '{model_type}' here")


def _saved(model_type: str, root, seeds=(0,), **overrides):
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    models = [make_model(config, seed) for seed in seeds]
    folders = []
    for seed, model in zip(seeds, models):
        model.save_pretrained(root / f"{model_type}-{seed}")
        folders.append(root / f"{model_type}-{seed}")
    return models, folders


def _meta_model(folder):
    from transformers import AutoConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def _counting_reads(monkeypatch) -> list[str]:
    reads = []
    original = CheckpointReader._read

    def counted(info):
        reads.append(info.name)
        return original(info)

    monkeypatch.setattr(CheckpointReader, "_read", staticmethod(counted))
    return reads


def _tokens(batch=2, length=9):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _reads_like_from_pretrained(folder, monkeypatch) -> CheckpointReader:
    """The reader of `folder` as its model loads it: every model tensor under its name and shape, known without
    reading any data; read, bit for bit what `from_pretrained` puts in the model."""
    reader = CheckpointReader(sorted(folder.glob("*.safetensors")))
    reads = _counting_reads(monkeypatch)
    reader.read_as(_meta_model(folder))
    assert reads == [], "names and shapes must come from the headers alone"
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tied = set(getattr(loaded, "all_tied_weights_keys", {}) or {})
    for name, tensor in loaded.state_dict().items():
        if name in tied or name not in dict(loaded.named_parameters()):
            continue
        assert tuple(reader.info(name).shape) == tuple(tensor.shape), name
        assert torch.equal(reader.get(name), tensor), name
    return reader


def test_a_fused_tensor_is_split_as_transformers_splits_it(tmp_path, monkeypatch):
    _needs("lara_mini", "linear_attn.in_proj")
    _, (folder,) = _saved("lara_mini", tmp_path)
    stored = load_file(folder / "model.safetensors")
    assert "model.layers.0.linear_attn.in_proj.weight" in stored  # saved in the stored, fused layout
    reader = _reads_like_from_pretrained(folder, monkeypatch)
    parts = [f"model.layers.0.linear_attn.in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")]
    assert all(reader.stored(name) is None for name in parts)  # computed on read, never copied as bytes
    assert "model.layers.0.linear_attn.in_proj.weight" not in reader


def test_fused_projections_are_chunked_as_transformers_chunks_them(tmp_path, monkeypatch):
    """HRM-Text stores each block's FFN as one `gate_up_proj` and its attention as one `gqkv_proj` (`Chunk` rules)."""
    _needs("hrm_text", "gate_up_proj")
    _, (folder,) = _saved("hrm_text", tmp_path, num_hidden_layers=4, num_layers_per_stack=2, L_bp_cycles=[1],
                          H_cycles=1, L_cycles=1, head_dim=8)
    assert "model.L_module.layers.0.mlp.gate_up_proj.weight" in load_file(folder / "model.safetensors")
    reader = _reads_like_from_pretrained(folder, monkeypatch)
    assert {"model.L_module.layers.0.mlp.gate_proj.weight", "model.L_module.layers.0.self_attn.q_proj.weight"} \
        <= set(reader.names())


def test_moe_experts_stored_one_by_one_are_stacked_as_transformers_stacks_them(tmp_path, monkeypatch):
    _needs("mixtral", "w1")
    _, (folder,) = _saved("mixtral", tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in load_file(folder / "model.safetensors")
    reader = _reads_like_from_pretrained(folder, monkeypatch)
    assert reader.info("model.layers.0.mlp.experts.gate_up_proj").shape[0] == 4


def test_a_moe_family_composes_with_bts_and_is_refused_by_traditional_and_btx_in_one_sentence(tmp_path):
    _needs("qwen2_moe", "mlp.experts.*.gate_proj.weight")
    models, folders = _saved("qwen2_moe", tmp_path, seeds=(0, 1))
    out = compose({"method": "bts", "base": {"name": "hub", "source": str(folders[0])},
                   "experts": [{"name": "e", "source": str(folders[1])}]}, tmp_path / "bts", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # initial stitches: the hub's logits
        torch.testing.assert_close(composed(input_ids=_tokens()).logits, models[0](input_ids=_tokens()).logits,
                                   atol=1e-5, rtol=0)
    experts = [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]
    for method, reason in (("traditional", "its FFN is already a Mixture-of-Experts"),
                           ("btx", "has no dense FFN module whose Linears btx routes")):
        with pytest.raises(MixtureKitError) as refused:
            build_plan({"method": method, "experts": experts})
        assert reason in str(refused.value) and "converts on load" not in str(refused.value)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_renamed_checkpoints_compose_identical_copies_to_the_dense_logits(tmp_path, method):
    _needs("exaone", "transformer")
    models, folders = _saved("exaone", tmp_path, seeds=(0, 1))
    assert any(k.startswith("transformer.h.0.mlp.c_fc_0") for k in load_file(folders[0] / "model.safetensors"))
    copies = compose({"method": method, "num_experts_per_tok": 2, "seed": 7,
                      "experts": [{"name": f"e{i}", "source": str(folders[0])} for i in range(3)]},
                     tmp_path / "copies", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(copies).eval()
    with torch.no_grad():
        torch.testing.assert_close(composed(input_ids=_tokens()).logits, models[0](input_ids=_tokens()).logits,
                                   atol=1e-5, rtol=0)
    mixed = compose({"method": method, "num_experts_per_tok": 2,
                     "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]},
                    tmp_path / "mixed", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(mixed).eval()
    composed.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_tokens()).logits, composed(input_ids=_tokens()).logits,
                                   atol=0, rtol=0)


def test_merge_reads_converted_checkpoints(tmp_path):
    _needs("exaone", "transformer")
    models, folders = _saved("exaone", tmp_path, seeds=(0, 1))
    merged = merge_experts(folders, tmp_path / "merged", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    dense = [dict(model.named_parameters()) for model in models]
    for name, tensor in loaded.named_parameters():  # the mean of the experts' weights, under the model's names
        torch.testing.assert_close(tensor, (dense[0][name] + dense[1][name]) / 2, atol=0, rtol=0, msg=name)


def test_a_conversion_that_cannot_be_applied_is_refused_naming_the_family_and_the_rule(tmp_path):
    _needs("lara_mini", "linear_attn.in_proj")
    _, (folder,) = _saved("lara_mini", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    fused = "model.layers.0.linear_attn.in_proj.weight"
    tensors[fused] = tensors[fused][:-3].contiguous()  # rows missing: the split no longer fits the model
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompatibilityError, match=r"'lara_mini' checkpoints store 'model\.layers\.0\.linear_attn\."
                                                 r"in_proj\.weight'.*converts on load.*Split"):
        build_plan({"method": "bts", "base": {"name": "hub", "source": str(folder)},
                    "experts": [{"name": "e", "source": str(folder)}]})


def test_a_composition_saved_by_transformers_in_the_stored_layout_loads(tmp_path):
    """transformers' save reverts a family's renamings inside a composed model too (Laguna's `shared_experts.` ->
    `shared_expert.`): the checkpoint check reads names as transformers loads them."""
    _needs("laguna", "mlp.shared_expert.")
    models, folders = _saved("laguna", tmp_path, seeds=(0, 1))
    out = compose({"method": "bts", "base": {"name": "hub", "source": str(folders[0])},
                   "experts": [{"name": "e", "source": str(folders[1])}]}, tmp_path / "bts", progress=False)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    composed.save_pretrained(tmp_path / "saved")
    assert any(".shared_expert." in name for name in load_file(tmp_path / "saved" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_tokens()).logits, composed(input_ids=_tokens()).logits,
                                   atol=0, rtol=0)


def test_a_lora_adapter_applies_to_a_renamed_base_under_the_models_names(tmp_path):
    """PEFT names an adapter's updates by the loaded model's parameters (`model.layers.0.mlp.gate_proj`), not by the
    base checkpoint's stored names (`transformer.h.0.mlp.c_fc_0`): they compose like the expert merged from them."""
    _needs("exaone", "transformer")
    from peft import LoraConfig, get_peft_model

    from moekit.training.upstream_warnings import upstream_checkpointing_renames_silenced

    _, (base,) = _saved("exaone", tmp_path)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with upstream_checkpointing_renames_silenced():
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                init_lora_weights=False))
        peft.save_pretrained(tmp_path / "adapter")
        peft.merge_and_unload().save_pretrained(tmp_path / "merged")
    outputs = {}
    for kind in ("adapter", "merged"):
        outputs[kind] = compose({"method": "traditional", "base": {"name": "base", "source": str(base)},
                                 "base_as_expert": True, "dtype": "float32",
                                 "experts": [{"name": "e", "source": str(tmp_path / kind)}]},
                                tmp_path / f"composed-{kind}", progress=False)
    from_adapter, from_merged = (load_file(outputs[k] / "model.safetensors") for k in ("adapter", "merged"))
    assert set(from_adapter) == set(from_merged)
    assert all(torch.equal(from_adapter[name], tensor) for name, tensor in from_merged.items())
