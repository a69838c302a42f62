"""Where a `transformers` causal LM keeps its blocks and FFNs, read off the model itself.

The decoder blocks are the `nn.ModuleList` with one entry per hidden layer, outside any vision or audio tower. A
block's FFN is its child module under one of a few names (`mlp`, `feed_forward`, `ffn`, `mlp_block`; GraniteMoeHybrid's
dense form: `shared_mlp`, the FFN its blocks keep when they hold no MoE beside it). How that FFN computes is
`ffn_layout`'s.
"""

from __future__ import annotations

import re

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ...errors import UnsupportedArchitectureError

LINEAR_TYPES = (nn.Linear, Conv1D)
FFN_CHILD_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
# An FFN that sits beside an MoE in a family's MoE form and is the block's whole FFN in its dense form (no MoE child)
FFN_BESIDE_MOE_NAMES = ("shared_mlp",)


def language_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the model's language part: its nested text config in a multimodal wrapper (Gemma 3's, LLaVA's
    `text_config`), else the config itself (also where several text parts make the choice ambiguous)."""
    try:
        return config.get_text_config(decoder=True)
    except ValueError:  # several text parts (MusicGen's encoder and decoder): no one text model to name
        return config


def is_multimodal(config: PretrainedConfig) -> bool:
    """Whether the config wraps its text model beside other parts (a vision or audio tower, a projector): the
    wrapper is what is composed, through its language model."""
    return language_config(config) is not config


# Families whose config counts their decoder blocks under another key than num_hidden_layers: LongCat-Flash's blocks
# each hold two attention sublayers, and its num_hidden_layers counts those (twice its blocks).
BLOCK_COUNT_KEYS = {"longcat_flash": "num_layers"}


def num_layers(config: PretrainedConfig) -> int:
    """The number of decoder blocks: the language model's, in a multimodal wrapper."""
    for candidate in (language_config(config), config):
        own = BLOCK_COUNT_KEYS.get(getattr(candidate, "model_type", ""))
        for key in ((own,) if own else ()) + ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(candidate, key, None)
            if isinstance(value, int):
                return value
    raise UnsupportedArchitectureError(
        f"'{config.model_type}' has no language model config with a number of layers (get_text_config() finds no text "
        "decoder in it, as in vision-language-action models whose output is not next-token logits)")


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, LINEAR_TYPES) for m in module.modules())


def _is_layer_list(module: nn.Module, count: int) -> bool:
    """A list of one entry per layer whose entries hold Linear layers: what decoder blocks (or XLM's parallel
    per-layer parts) look like."""
    return isinstance(module, nn.ModuleList) and len(module) == count and all(_has_linear(b) for b in module)


# Words that name a vision or audio tower (in a module's name or its config's class or model type): its block lists
# are the tower's, never the text decoder's.
TOWER_WORDS = ("vision", "visual", "image", "img", "audio", "speech", "video")


def _names_a_tower(text: str) -> bool:
    return any(part.startswith(TOWER_WORDS) for part in re.split(r"[^a-z]+", text.lower()) if part)


def _is_tower_config(sub: object, config: PretrainedConfig) -> bool:
    """Whether a submodule's config is another part's than the text model's: one of `config`'s sub-configs other
    than its text config (Git's vision_config), or a config named for a modality (`GitVisionConfig`)."""
    if not isinstance(sub, PretrainedConfig) or sub is config or type(sub) is type(config):
        return False  # the text model's config, or a copy of it (a decoder built from its own copy)
    try:
        text = config.get_text_config(decoder=True)
    except ValueError:
        text = config
    if sub is text or type(sub) is type(text):
        return False  # the text config, or the language model's own copy of it (Granite 4 Vision's, after loading)
    parts = [getattr(config, key, None) for key in getattr(config, "sub_configs", None) or {}]
    return any(sub is part for part in parts) or _names_a_tower(type(sub).__name__) or _names_a_tower(
        str(getattr(sub, "model_type", "")))


def _tower_names(model: nn.Module, config: PretrainedConfig) -> list[str]:
    """Qualified names of the model's vision and audio towers: submodules whose config is a tower's, or whose own
    name says so (`image_encoder`, `vision_model`, `audio_tower`)."""
    towers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_within(name, tower) for tower in towers):
            continue
        if _is_tower_config(getattr(module, "config", None), config) or _names_a_tower(name.rpartition(".")[2]):
            towers.append(name)
    return towers


def _within(name: str, parent: str) -> bool:
    return not parent or name == parent or name.startswith(parent + ".")


def _decoder_name(model: nn.Module) -> str | None:
    """The qualified name of the text decoder transformers gives (`get_decoder()`), when it is a proper submodule."""
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    except Exception:  # noqa: BLE001  (a family whose lookup raises gives no preference)
        return None
    if decoder is None or decoder is model:
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


def language_model_name(model: nn.Module, config: PretrainedConfig) -> str:
    """The qualified name of a multimodal wrapper's language model (`model.language_model`): the decoder transformers
    names (`get_decoder()`), where bts streams and `vision: drop` find the decoder's tensors in the wrapper's files."""
    name = _decoder_name(model)
    if name is None:
        raise UnsupportedArchitectureError(
            f"'{config.model_type}' does not name its language model (get_decoder() gives no submodule of "
            f"{type(model).__name__}), so its decoder cannot be taken out of the wrapper; compose it with vision: keep "
            "and method traditional or btx")
    return name


def decoder_layers(model: nn.Module, config: PretrainedConfig) -> tuple[str, nn.ModuleList]:
    """The qualified name and the list of the model's decoder blocks: the first list of one entry per layer whose
    entries hold Linear layers, outside any vision or audio tower (`_tower_names`; Git's image encoder has as many
    layers as its text decoder), and under the decoder transformers names (`get_decoder()`) where it holds one."""
    count = num_layers(config)
    candidates = [(name, module) for name, module in model.named_modules() if _is_layer_list(module, count)]
    towers = _tower_names(model, config)
    text = [(name, module) for name, module in candidates if not any(_within(name, tower) for tower in towers)]
    decoder = _decoder_name(model)
    under_decoder = [(name, module) for name, module in text if decoder is not None and _within(name, decoder)]
    if under_decoder or text:
        name, layers = (under_decoder or text)[0]
        _refuse_blocks_shared_elsewhere(model, config, name, layers, candidates)
        return name, layers
    in_towers = f" outside its vision/audio towers ({', '.join(name for name, _ in candidates)})" if candidates else ""
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} ({config.model_type}): found no list of {count} decoder blocks{in_towers}; "
        "MixtureKit composes decoder-only models whose blocks are listed once per layer"
    )


def _refuse_blocks_shared_elsewhere(model: nn.Module, config: PretrainedConfig, name: str, layers: nn.ModuleList,
                                    candidates: list[tuple[str, nn.ModuleList]]) -> None:
    """Refuse a model whose decoder blocks' weights are tied to another list of blocks (DiffusionGemma's encoder
    reuses its decoder's blocks): composing replaces the decoder's modules, which the other list would lose."""
    own = {id(p) for p in layers.parameters()}
    for other, module in candidates:
        if other != name and not _within(other, name) and any(id(p) in own for p in module.parameters()):
            raise UnsupportedArchitectureError(
                f"'{config.model_type}' ties its decoder blocks' weights ({name}) to another list of blocks "
                f"({other}), which composing would leave with the dense blocks while the decoder's are replaced")


def parallel_layer_lists(model: nn.Module, config: PretrainedConfig,
                         layers_name: str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """The decoder list and every other list of one entry per layer holding Linears beside it (same parent), in
    module order: more than one when a family keeps each layer's parts in parallel lists (XLM's `attentions` and
    `ffns`) instead of blocks that hold them all. `layers_name`: the decoder list's, when the caller has it."""
    if layers_name is None:
        layers_name, _ = decoder_layers(model, config)
    parent, count = layers_name.rpartition(".")[0], num_layers(config)
    lists = model.get_submodule(parent).named_children() if parent else model.named_children()
    return [(f"{parent}.{name}" if parent else name, module) for name, module in lists
            if _is_layer_list(module, count)]


def describe_parallel_lists(parallel: list[tuple[str, nn.ModuleList]]) -> str:
    return ", ".join(f"{name} of {type(module[0]).__name__}" for name, module in parallel)


def stitch_layers(model: nn.Module, config: PretrainedConfig) -> tuple[str, nn.ModuleList]:
    """bts's blocks: `decoder_layers`, refused where a block's output is not the end of a layer. A stitch acts on a
    block's output (the residual stream) and a stream is stepped one block at a time, so a family whose layers are
    parallel per-layer lists (XLM: attention, then residual, norm and FFN from other lists) cannot be stitched."""
    layers_name, layers = decoder_layers(model, config)
    parallel = parallel_layer_lists(model, config, layers_name)
    if len(parallel) > 1:
        raise UnsupportedArchitectureError(
            f"bts cannot stitch '{config.model_type}': its layers are not blocks but parallel per-layer lists "
            f"({describe_parallel_lists(parallel)}), so no block's output is the end of a layer (after its residual), "
            "where stitches act and expert streams are stepped")
    return layers_name, layers


def ffn_child(block: nn.Module) -> str | None:
    """The name of the block's FFN module, or None when it has none under a known name. A `shared_mlp` counts only
    when no child of the block is an MoE: beside one it is an always-on shared expert, not the block's FFN."""
    for name in FFN_CHILD_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    if any(is_mixture_of_experts(child) for child in block.children()):
        return None
    for name in FFN_BESIDE_MOE_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def is_mixture_of_experts(ffn: nn.Module) -> bool:
    return "experts" in dict(ffn.named_children()) or hasattr(ffn, "num_experts")


def linear_names(block: nn.Module) -> list[str]:
    """Names, relative to a decoder block, of its Linear (and GPT-2 Conv1D) layers: what `btx` can route."""
    return [name for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)]


def ffn_linear_names(block: nn.Module, model_type: str = "",
                     parallel: list[tuple[str, nn.ModuleList]] | None = None) -> list[str]:
    """`btx`'s default: the block's FFN Linears (under its FFN child), or its Linears outside attention when the
    FFN's Linears sit on the block itself (OPT-style `fc1`/`fc2`). `parallel`: `parallel_layer_lists` of the model;
    a block that is one of several parallel per-layer lists holds no FFN (XLM's is its attention), which is refused."""
    child = ffn_child(block)
    names = linear_names(block)
    if child is None and parallel and len(parallel) > 1:
        raise UnsupportedArchitectureError(
            f"'{model_type}' has no FFN in its decoder blocks for btx to route by default: its layers are parallel "
            f"per-layer lists ({describe_parallel_lists(parallel)}), so its blocks are the first list's "
            f"({type(block).__name__}) and the FFN's Linears lie outside them; router_layers can name the blocks' own "
            f"Linears ({', '.join(names)}) to route {type(block).__name__} instead")
    if child is not None and is_mixture_of_experts(getattr(block, child)):
        return []  # an MoE's router and experts are not an FFN's projections
    if child is not None:
        return [name for name in names if name.startswith(child + ".")]
    return [name for name in names if "." not in name]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def resolve_names(requested: list[str], valid: list[str], refuse) -> list[str]:
    """Full block-relative names for `requested` entries: a full name (`mlp.up_proj`) or a unique suffix
    (`up_proj`), without repeats. `refuse(entry, candidates)` builds the caller's error for an unknown or ambiguous
    entry (candidates: the names it could mean, none when unknown)."""
    resolved = []
    for entry in requested:
        candidates = [entry] if entry in valid else [name for name in valid if name.endswith("." + entry)]
        if len(candidates) != 1:
            raise refuse(entry, candidates)
        if candidates[0] not in resolved:
            resolved.append(candidates[0])
    return resolved
