"""Bad recipes and incompatible sources: each a clear error naming the problem, and nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from moekit import (
    CompatibilityError, OutputError, RecipeError, SourceError, UnsupportedArchitectureError, compose, load_recipe,
)
from tiny_models import make_model, save_model, tiny_config


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    return [save_model(make_model(tiny_config("llama"), seed), root / f"llama{seed}") for seed in range(2)]


def _recipe(folders, method="traditional", **extra):
    return {"method": method, "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)], **extra}


def _compose_fails(recipe, output, error, *fragments):
    """Compose must raise `error` whose message holds every fragment, and leave the output's parent unchanged."""
    output.parent.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in output.parent.iterdir())
    with pytest.raises(error) as caught:
        compose(recipe, output, progress=False)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    assert sorted(p.name for p in output.parent.iterdir()) == before
    return str(caught.value)


def test_unknown_method(llamas, tmp_path):
    _compose_fails(_recipe(llamas, method="mixtral"), tmp_path / "out", RecipeError, "method", "traditional", "btx")


@pytest.mark.parametrize("k", [0, 3, -1])
def test_top_k_out_of_range(llamas, tmp_path, k):
    _compose_fails(_recipe(llamas, num_experts_per_tok=k), tmp_path / "out", RecipeError,
                   "num_experts_per_tok", "between 1 and the number of experts (2)")


def test_unknown_router_layer_lists_the_valid_linears(llamas, tmp_path):
    message = _compose_fails(_recipe(llamas, method="btx", router_layers=["mlp.w1"]), tmp_path / "out",
                             RecipeError, "mlp.w1")
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"):
        assert name in message


def test_router_layer_short_names_resolve(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    out = compose(_recipe(llamas, method="btx", router_layers=["up_proj", "self_attn.q_proj"]), tmp_path / "o",
                  progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.router_layers == ["mlp.up_proj", "self_attn.q_proj"]
    assert {name.split(".", 3)[-1] for name, _ in model.routed_modules()} == {"mlp.up_proj", "self_attn.q_proj"}


def test_router_layers_index_out_of_range(llamas, tmp_path):
    _compose_fails(_recipe(llamas, router_layers_index=[0, 5]), tmp_path / "out", RecipeError, "[5]", "0..1")


def test_different_architectures(llamas, tmp_path):
    qwen = save_model(make_model(tiny_config("qwen2"), 0), tmp_path / "qwen")
    _compose_fails(_recipe([llamas[0], qwen]), tmp_path / "out", CompatibilityError,
                   "different architectures", "llama", "qwen2")


def test_different_hidden_sizes(llamas, tmp_path):
    wide = save_model(make_model(tiny_config("llama", hidden_size=48), 0), tmp_path / "wide")
    _compose_fails(_recipe([llamas[0], wide]), tmp_path / "out", CompatibilityError, "hidden_size", "32", "48")


def test_different_vocabularies(llamas, tmp_path):
    other = save_model(make_model(tiny_config("llama", vocab_size=100), 0), tmp_path / "vocab")
    _compose_fails(_recipe([llamas[0], other]), tmp_path / "out", CompatibilityError, "vocabulary sizes", "96", "100")


def test_different_tokenizers(llamas, tmp_path):
    import shutil

    folders = []
    for i, vocab in enumerate(({"a": 0, "b": 1}, {"a": 0, "c": 1})):
        folder = tmp_path / f"tok{i}"
        shutil.copytree(llamas[i], folder)
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
        folders.append(folder)
    _compose_fails(_recipe(folders), tmp_path / "out", CompatibilityError, "different tokenizers")


def test_missing_tensor_is_named(llamas, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llamas[1], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    _compose_fails(_recipe([llamas[0], broken]), tmp_path / "out", CompatibilityError,
                   "'e1'", "model.layers.1.mlp.up_proj.weight")


def test_missing_source_path(llamas, tmp_path):
    _compose_fails(_recipe([llamas[0], tmp_path / "nowhere"]), tmp_path / "out", SourceError, "does not exist",
                   "nowhere")


def test_pickle_only_source_is_refused(llamas, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((llamas[0] / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    _compose_fails(_recipe([llamas[0], folder]), tmp_path / "out", SourceError, "pickle", "pytorch_model.bin")


def test_unsupported_family_is_named(tmp_path):
    config = tiny_config("llama")
    bloom = save_model(make_model(__import__("transformers").AutoConfig.for_model(
        "bloom", vocab_size=96, hidden_size=32, n_layer=2, n_head=4), 0), tmp_path / "bloom")
    message = _compose_fails(_recipe([bloom, bloom]), tmp_path / "out", UnsupportedArchitectureError, "bloom")
    # BloomMLP.forward(hidden_states, residual) adds the residual itself: the reason, and what works instead
    assert "BloomMLP" in message and "residual" in message and "`btx` routes its Linears" in message
    del config


# Multimodal wrappers (Gemma 3, Fuyu, ...) were refused here; they compose now through their language model:
# tests/test_multimodal.py holds them to the invariants, and its refusals (vision: drop without a text model) to
# one sentence each.


def _tiny_xlm(folder):
    from transformers import AutoConfig

    config = AutoConfig.for_model("xlm", vocab_size=96, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return save_model(make_model(config, 0), folder)


def test_xlm_is_refused_for_keeping_attention_and_ffn_in_parallel_lists(tmp_path):
    """XLM's layers are two parallel lists (attentions, ffns), not blocks: the refusal says so, instead of calling
    its attention's projections an FFN's Linears."""
    xlm = _tiny_xlm(tmp_path / "xlm")
    message = _compose_fails(_recipe([xlm, xlm]), tmp_path / "out", UnsupportedArchitectureError,
                             "'xlm' cannot be composed with `traditional`",
                             "not blocks that each hold attention and FFN",
                             "transformer.attentions of MultiHeadAttention", "transformer.ffns of TransformerFFN")
    assert "q_lin" not in message


def test_xlm_btx_default_is_refused_not_routed_onto_attention(tmp_path):
    """btx's default routes an FFN's Linears; XLM's blocks (its `attentions` list) hold none, so the default is
    refused naming the parallel FFN list and what router_layers can name, instead of routing q/k/v/out by default.
    Named in router_layers, the attention projections are routed (and the FFN averaged), as asked."""
    from transformers import AutoModelForCausalLM

    xlm = _tiny_xlm(tmp_path / "xlm")
    message = _compose_fails(_recipe([xlm, xlm], "btx", num_experts_per_tok=2), tmp_path / "out",
                             UnsupportedArchitectureError,
                             "'xlm' has no FFN in its decoder blocks for btx to route by default",
                             "transformer.ffns of TransformerFFN", "router_layers can name",
                             "q_lin, k_lin, v_lin, out_lin")
    assert message.count(". ") == 0  # one sentence
    out = compose(_recipe([xlm, xlm], "btx", num_experts_per_tok=2, router_layers=["q_lin", "out_lin"]),
                  tmp_path / "btx", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.router_layers == ["q_lin", "out_lin"]
    assert [name for name, _ in model.routers()] == [
        f"transformer.attentions.{i}.{linear}.router" for i in range(2) for linear in ("q_lin", "out_lin")]


def test_xlm_bts_is_refused_as_its_blocks_do_not_end_a_layer(tmp_path):
    """A stitch acts on a block's output, after the layer's residual; XLM's attention output is not that (its residual,
    norms and FFN follow from other lists), so bts is refused in one sentence instead of stitching mid-layer."""
    xlm = _tiny_xlm(tmp_path / "xlm")
    recipe = {"method": "bts", "base": {"name": "hub", "source": str(xlm)},
              "experts": [{"name": "e0", "source": str(xlm)}]}
    message = _compose_fails(recipe, tmp_path / "out", UnsupportedArchitectureError,
                             "bts cannot stitch 'xlm'", "parallel per-layer lists",
                             "transformer.ffns of TransformerFFN", "end of a layer (after its residual)")
    assert message.count(". ") == 0


def _tiny_git(folder):
    """Git: a text decoder (`git.encoder.layer`) and an image encoder with as many layers, registered first."""
    from transformers import GitConfig

    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=8)
    config = GitConfig(vision_config=vision, vocab_size=96, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return save_model(make_model(config, 0), folder)


def test_decoder_layers_are_the_text_decoders_not_a_vision_towers(tmp_path):
    """Git's image encoder lists as many blocks as its text decoder, and first: the decoder blocks are the text
    decoder's, so traditional speaks of GitLayer and btx's routers run on text input, one per routed Linear and
    layer."""
    from transformers import AutoModelForCausalLM

    from moekit.runtime.base_model.architecture import decoder_layers

    git = _tiny_git(tmp_path / "git")
    dense = AutoModelForCausalLM.from_pretrained(git)
    assert decoder_layers(dense, dense.config)[0] == "git.encoder.layer"
    _compose_fails(_recipe([git, git]), tmp_path / "out", UnsupportedArchitectureError,
                   "its decoder block (GitLayer) has no FFN module")
    out = compose(_recipe([git, git], "btx", num_experts_per_tok=1, router_layers=["intermediate.dense",
                                                                                    "output.dense"]),
                  tmp_path / "btx", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    names = [name for name, _ in model.routers()]
    assert names == [f"git.encoder.layer.{i}.{linear}.router" for i in range(2)
                     for linear in ("intermediate.dense", "output.dense")]
    tokens = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(input_ids=tokens, output_router_logits=True)
    assert len(output.router_logits) == len(names)  # every router ran on the text
    assert all(logits.shape == (2 * 5, 2) for logits in output.router_logits)


def test_decoder_layers_skip_towers_by_config_or_name():
    """Generic: a list under a submodule whose config is a vision sub-config, or named for a modality, is not the
    decoder's, even when it comes first and has the decoder's length; `get_decoder()`'s module is preferred."""
    from torch import nn
    from transformers import PretrainedConfig

    from moekit.runtime.base_model.architecture import decoder_layers

    class Tower(nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.config = config
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    class Sub(PretrainedConfig):
        model_type = "toy_part"

    class Toy(PretrainedConfig):
        model_type = "toy"
        sub_configs = {"part_config": Sub}

    config = Toy(num_hidden_layers=2)
    config.part_config = Sub()
    model = nn.Module()
    model.config = config
    model.part = Tower(config.part_config)  # a sub-config's module: a tower by its config
    model.audio_tower = Tower()  # a tower by its name
    model.text = Tower(config)
    assert decoder_layers(model, config)[0] == "text.layers"
    model.other = Tower(config)
    model.get_decoder = lambda: model.other
    assert decoder_layers(model, config)[0] == "other.layers"
    del model.text, model.other, model.get_decoder
    with pytest.raises(UnsupportedArchitectureError, match="outside its vision/audio towers"):
        decoder_layers(model, config)


def test_decoder_layers_under_a_copy_of_the_text_config_named_for_vision():
    """Granite 4 Vision: its text config's class names "vision", and after loading its language model holds a copy
    of the text config (not the wrapper's object): that copy is the text model's, not a tower's."""
    import copy

    from torch import nn
    from transformers import PretrainedConfig

    from moekit.runtime.base_model.architecture import decoder_layers

    class ToyVisionTextConfig(PretrainedConfig):
        model_type = "toy_vision_text"

    class ToyVisionConfig(PretrainedConfig):
        model_type = "toy_vision"
        sub_configs = {"text_config": ToyVisionTextConfig}

    config = ToyVisionConfig(text_config=ToyVisionTextConfig(num_hidden_layers=2).to_dict())
    config.text_config = ToyVisionTextConfig(num_hidden_layers=2)
    language_model = nn.Module()
    language_model.config = copy.deepcopy(config.text_config)
    language_model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model = nn.Module()
    model.language_model = language_model
    assert decoder_layers(model, config)[0] == "language_model.layers"


def test_decoder_blocks_tied_to_another_list_are_refused():
    """DiffusionGemma's encoder reuses its decoder's blocks (tied weights): composing would replace the decoder's
    modules and leave the encoder's dense, so the model is refused, naming both lists."""
    from torch import nn
    from transformers import PretrainedConfig

    from moekit.runtime.base_model.architecture import decoder_layers

    config = PretrainedConfig(num_hidden_layers=2)
    model = nn.Module()
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model.get_decoder = lambda: model.decoder
    assert decoder_layers(model, config)[0] == "decoder.layers"  # separate weights: composable
    model.encoder.layers[1].weight = model.decoder.layers[1].weight
    with pytest.raises(UnsupportedArchitectureError, match=r"ties its decoder blocks' weights \(decoder.layers\) "
                       r"to another list of blocks \(encoder.layers\)"):
        decoder_layers(model, config)


def test_output_exists_is_kept_unless_overwrite(llamas, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    _compose_fails(_recipe(llamas), output, OutputError, "already exists", "overwrite")
    assert (output / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what moekit wrote: a folder of the user's files is refused, naming them
    with pytest.raises(OutputError, match=r"holds keep.txt, which moekit did not write.*move those files away"):
        compose(_recipe(llamas), output, overwrite=True, progress=False)
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "mine"
    (output / "keep.txt").unlink()  # an empty folder is replaced, and then the composed checkpoint
    compose(_recipe(llamas), output, overwrite=True, progress=False)
    before = (output / "model.safetensors").read_bytes()
    compose(_recipe(llamas, seed=11), output, overwrite=True, progress=False)
    assert (output / "config.json").is_file() and (output / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder, old folder or journal left behind


def test_no_output_given(llamas):
    with pytest.raises(RecipeError, match="no output folder"):
        compose(_recipe(llamas), progress=False)


@pytest.mark.parametrize("recipe,fragments", [
    ({"method": "btx", "experts": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}, ["unique", "'a'"]),
    ({"method": "btx", "experts": [{"name": "a", "source": "x"}]}, ["at least 2 experts"]),
    ({"method": "btx", "experts": []}, ["experts"]),
    ({"method": "btx", "num_expert_per_tok": 2, "experts": [{"name": "a", "source": "x"}]},
     ["num_expert_per_tok", "did you mean 'num_experts_per_tok'"]),
    ({"method": "btx", "alpha": -1, "experts": [{"name": "a", "source": "x"}, {"name": "b", "source": "y"}]},
     ["alpha", "greater than or equal to 0"]),
    ({"method": "btx", "experts": [{"name": "../evil", "source": "x"}, {"name": "b", "source": "y"}]},
     ["not a valid name"]),
    ({"method": "bts", "stitch_freq": 0, "experts": [{"name": "a", "source": "x"}]}, ["stitch_freq", "at least 1"]),
    ({"method": "traditional", "shared_weights": "base", "experts": [{"name": "a", "source": "x"},
                                                                     {"name": "b", "source": "y"}]}, ["base"]),
    ({"method": "btx", "shard_size": "lots", "experts": [{"name": "a", "source": "x"}, {"name": "b", "source": "y"}]},
     ["shard_size", "2GB"]),
])
def test_recipe_validation(recipe, fragments):
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
