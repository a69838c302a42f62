"""Decide, from configs and tensor headers alone, where every output tensor comes from.

The composed model is built on the `meta` device (no memory, no weights): its tensor names and shapes are the
output. Each routed module says how its stacked tensors are made of the experts' dense ones (`source_map`); every
other tensor has the same name in the sources and is averaged (or copied from the base). Compatibility is checked
here, before anything is written.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..errors import RecipeError, UnsupportedArchitectureError
from ..recipe import Recipe, load_recipe
from ..recipe.recipe import DEFAULT_BIAS_RATE
from ..runtime.base_model.architecture import (
    decoder_layers, is_multimodal, language_config, language_model_name, parallel_layer_lists, stitch_layers,
)
from ..runtime.base_model.ffn_layout import check_ffn_computes, mlp_layout
from ..runtime.assembly.config import MixtureKitConfig
from ..runtime.assembly.conversion import blocks_holding, resolve_layer_indices, resolve_router_layers
from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.routed.routing import Router
from ..runtime.routed.shared_expert import (
    SHARED_EXPERT, SHARED_EXPERT_GATE, is_shared_expert_tensor, shared_expert_source,
)
from ..runtime.routed.stacking import StackSource
from ..runtime.bts.stitch import stitch_points
from ..sources import LocalModel, resolve_source
from ..sources.lora_adapter import AdaptedReader
from ..runtime.base_model.dense_model import dense_model_class
from .compatibility import check_compatible, check_dense_tensors, meta_dense_model

logger = logging.getLogger(__name__)

Origin = Literal["average", "copy", "stack", "new"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, shape, dtype and where it comes from.

    `average`: mean over `models` of tensor `sources[0]`; `copy`: tensor `sources[0]` of `models[0]`;
    `stack`: for each model in order, `sources` concatenated on dim 0 (each transposed first if `transpose`);
    `new`: a router initialised by `init` (no source).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: Origin
    models: tuple[int, ...] = ()
    sources: tuple[str, ...] = ()
    transpose: bool = False
    init: str | None = None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class CompositionPlan:
    """Everything the composer needs: the models, the config to write, and the ordered tensor plans."""

    recipe: Recipe
    models: list[LocalModel]
    expert_models: list[int]  # indices into `models`, in expert order
    reference: int  # index of the model whose config, tokenizer and generation config are used
    config: MixtureKitConfig
    tensors: list[TensorPlan]
    dtype: torch.dtype
    ignored_source_tensors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def active_parameters(self) -> int:
        return active_parameters(self.total_parameters, self.count("stack"), self.config)

    def count(self, origin: Origin) -> int:
        return sum(t.numel for t in self.tensors if t.origin == origin)


def active_parameters(total: int, stacked: int, config) -> int:
    """Parameters one token uses: shared ones, k of E experts' stacked ones, and the routers (a stacked tensor holds
    E equal slices, so k/E of it is exact)."""
    return total - stacked + stacked * config.num_experts_per_tok // config.num_experts


def source_dtype(model: LocalModel) -> torch.dtype:
    """The dtype of the first floating-point tensor the model stores (float32 if none): what `dtype: auto` keeps."""
    for info in model.reader.tensors.values():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


@dataclass(frozen=True)
class _StackRole:
    relative: str
    source: StackSource


def tensor_roles(composed: MixtureKitForCausalLM) -> dict[str, tuple[torch.Tensor, str, _StackRole | None]]:
    """Every saved tensor of a composed model with its role: `stack` (experts), `router`, `shared`, a shared expert's
    `shared_expert` (its copy of the base's FFN) and `shared_gate`, and for bts `stream` (an expert stream's own
    weight) or `stitch`."""
    tied = set(getattr(composed, "all_tied_weights_keys", None) or {})
    routed = composed.routed_modules()
    roles = {}
    for name, tensor in composed.state_dict().items():
        if name in tied:
            continue
        role, stack = "shared", None
        if name.startswith(("streams.", "stitches.")):
            roles[name] = (tensor, "stream" if name.startswith("streams.") else "stitch", None)
            continue
        owner = next(((p, m) for p, m in routed if name.startswith(p + ".")), None)
        if owner is not None:
            prefix, module = owner
            relative = name[len(prefix) + 1:]
            if relative in module.source_map:
                role, stack = "stack", _StackRole(relative, module.source_map[relative])
            elif relative.startswith(SHARED_EXPERT_GATE + "."):
                role = "shared_gate"
            elif relative.startswith(SHARED_EXPERT + "."):
                role = "shared_expert"
            elif isinstance(module.get_submodule(relative.rpartition(".")[0]), Router):
                role = "router"
        roles[name] = (tensor, role, stack)
    return roles


def build_plan(recipe: Recipe | dict | str | Path, cache_dir: Path | None = None) -> CompositionPlan:
    """Resolve the sources, check them, and plan every output tensor (no weights are read)."""
    recipe = load_recipe(recipe)
    sources = recipe.all_sources
    models = [resolve_source(spec, cache_dir, recipe.allow_pickle) for spec in sources]
    by_name = {model.name: i for i, model in enumerate(models)}
    if recipe.method == "bts":
        return _plan_streams(recipe, models, by_name)
    expert_models = [by_name[spec.name] for spec in recipe.expert_sources]
    reference = expert_models[0]
    notes = check_compatible(models, reference)
    ref_model = models[reference]
    dtype = DTYPES[recipe.dtype] if recipe.dtype != "auto" else source_dtype(ref_model)
    dtype_name = str(dtype).removeprefix("torch.")

    source_config = _with_dtype(ref_model.config, dtype_name)
    dense, expected = check_dense_tensors(models, source_config)
    text_config, to_source = source_config, _same_name
    if recipe.vision == "drop" and is_multimodal(source_config):
        text_config = _with_dtype(language_config(source_config), dtype_name)
        dense, to_source = _without_vision(dense, source_config, text_config)
    router_layers = None
    router_layers_index = recipe.router_layers_index or None
    layers_name, blocks = decoder_layers(dense, text_config)
    parallel = parallel_layer_lists(dense, text_config, layers_name)
    if recipe.method == "btx":
        if router_layers_index is None:  # a hybrid decoder: route the named Linears in the blocks that have them
            router_layers_index = blocks_holding(recipe.router_layers, list(blocks), text_config.model_type)
        first = blocks[router_layers_index[0]] if router_layers_index else blocks[0]
        router_layers = resolve_router_layers(recipe.router_layers, first, text_config.model_type, parallel)
    else:
        for index in resolve_layer_indices(recipe.router_layers_index, len(blocks)):
            check_ffn_computes(blocks[index], mlp_layout(blocks[index], text_config.model_type, parallel),
                               text_config.model_type)
    config = MixtureKitConfig(
        text_config=text_config, method=recipe.method, expert_names=[s.name for s in recipe.expert_sources],
        num_experts_per_tok=recipe.top_k, router_layers=router_layers,
        router_layers_index=router_layers_index, alpha=recipe.alpha, dtype=dtype_name,
        alpha_mode=recipe.alpha_mode, load_floor=recipe.load_floor, alpha_max=recipe.alpha_max,
        router_z_loss_coef=recipe.router_z_loss_coef, experts_backend=recipe.experts_backend,
        shared_expert=recipe.shared_expert, shared_expert_gate=recipe.shared_expert_gate,
        balance=recipe.balance, balance_bias_rate=recipe.balance_bias_rate or DEFAULT_BIAS_RATE,
    )
    with torch.device("meta"):
        composed = MixtureKitForCausalLM(config)
    base = by_name[recipe.base.name] if recipe.base is not None else None
    shared_models = (by_name[recipe.base.name],) if recipe.shared_weights == "base" else tuple(expert_models)
    tensors = []
    for name, (tensor, role, stack) in tensor_roles(composed).items():
        shape = tuple(tensor.shape)
        out_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
        if role == "stack":
            prefix = name[: -len(stack.relative)].rstrip(".")
            tensors.append(TensorPlan(name, shape, out_dtype, "stack", tuple(expert_models),
                                      tuple(to_source(f"{prefix}.{n}") for n in stack.source.names),
                                      stack.source.transpose))
        elif role == "router" and name.endswith(".expert_bias"):  # loss-free balancing's bias: float32, zero
            tensors.append(TensorPlan(name, shape, torch.float32, "new", init="zeros"))
        elif role == "router":
            tensors.append(TensorPlan(name, shape, dtype, "new", init=recipe.router_init))
        elif role == "shared_expert":  # the base's own dense tensor, under the shared expert's name
            tensors.append(TensorPlan(name, shape, out_dtype, "copy", (base,), (to_source(shared_expert_source(name)),)))
        elif role == "shared_gate":  # zero: the shared expert starts at weight sigmoid(0) = 1/2
            tensors.append(TensorPlan(name, shape, dtype, "new", init="zeros"))
        elif to_source(name) in expected:  # otherwise a buffer the model computes itself
            origin: Origin = "copy" if len(shared_models) == 1 else "average"
            tensors.append(TensorPlan(name, shape, out_dtype, origin, shared_models, (to_source(name),)))
    written = expected if text_config is source_config else {source for t in tensors for source in t.sources}
    ignored = sorted(n for n in ref_model.reader.names() if n not in written)  # vision: drop: the tower's too
    _check_adapters(recipe, models, by_name, tensors)
    for note in notes:
        logger.warning(note)
    return CompositionPlan(recipe, models, expert_models, reference, config, tensors, dtype, ignored, notes)


def _check_adapters(recipe: Recipe, models: list[LocalModel], by_name: dict[str, int],
                    tensors: list[TensorPlan] | None) -> None:
    """LoRA-adapter experts must adapt the recipe's base, and (for traditional and btx) only weights the method
    routes: an update to an averaged weight would be averaged away, silently."""
    adapters = {i: m for i, m in enumerate(models) if isinstance(m.reader, AdaptedReader)}
    if not adapters:
        return
    base = models[by_name[recipe.base.name]] if recipe.base is not None else None
    for index, model in adapters.items():
        if base is None or base.folder.resolve() != model.folder.resolve():
            raise RecipeError(
                f"expert '{model.name}' is a LoRA adapter of '{model.reader.adapter.base}', which is not the recipe's "
                f"base ({'none given' if base is None else repr(recipe.base.source)}): set `base` to that model, so "
                "every adapter is read on the weights it was trained on")
        adapted = model.reader.adapted_names()
        lost = [t for t in tensors or () if t.origin in ("average", "copy") and not is_shared_expert_tensor(t.name)]
        shared = sorted(n for t in lost for n in t.sources if n in adapted)
        if shared:
            fate = "averages over the experts" if recipe.shared_weights == "average" else "copies from the base"
            raise RecipeError(
                f"expert '{model.name}' is a LoRA adapter that changes {shared[:3]}{' …' if len(shared) > 3 else ''}, "
                f"which {recipe.method} does not route but {fate}: the update would be lost. Adapt only the routed "
                "projections (traditional: the MLP; btx: router_layers), or compose with method: bts, whose expert "
                "streams keep every weight")


def _with_dtype(config, dtype_name: str):
    config = copy.deepcopy(config)
    config.dtype = dtype_name
    return config


def _same_name(name: str) -> str:
    return name


def _without_vision(wrapper: torch.nn.Module, wrapper_config, text_config):
    """`vision: drop`: the text-only model of a multimodal wrapper's language model (weightless), and the function
    that names each of its tensors as the wrapper's files do (`model.layers.0...` is `model.language_model.layers.0...`,
    the LM head is the wrapper's). Refused where the wrapper's language model is not the text model's body."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedArchitectureError(
            f"vision: drop cannot write '{wrapper_config.model_type}''s language model alone: transformers has no "
            f"causal-LM class for its text config ('{text_config.model_type}'); keep the vision tower (vision: keep)")
    text = meta_dense_model(text_config)
    language = language_model_name(wrapper, wrapper_config)
    body, prefix = text.base_model, text.base_model_prefix
    if type(wrapper.get_submodule(language)) is not type(body) or text.get_submodule(prefix) is not body:
        raise UnsupportedArchitectureError(
            f"vision: drop cannot take '{wrapper_config.model_type}''s language model out: its {language} is a "
            f"{type(wrapper.get_submodule(language)).__name__}, the text model "
            f"{type(text).__name__}'s body a {type(body).__name__}; keep the vision tower (vision: keep)")
    text_head, wrapper_head = text.get_output_embeddings(), wrapper.get_output_embeddings()
    head_names = {} if text_head is None or wrapper_head is None else {
        _module_name(text, text_head): _module_name(wrapper, wrapper_head)}

    def to_source(name: str) -> str:
        if name.startswith(prefix + "."):
            return language + name[len(prefix):]
        owner, _, leaf = name.rpartition(".")
        return f"{head_names[owner]}.{leaf}" if owner in head_names else name

    return text, to_source


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _check_image_at_tokens(config) -> None:
    """bts steps each expert stream, its text alone, beside the hub block by block: an image-text model whose image
    does not sit at image tokens of the text (a flat config naming no image token: Git prepends the image's
    embeddings, Idefics cross-attends to them) has no stream positions that match the hub's."""
    import inspect

    model_class = dense_model_class(config)
    reads_pixels = "pixel_values" in inspect.signature(model_class.forward).parameters
    names_token = any("image_token" in key for key in config.to_dict())
    if reads_pixels and not is_multimodal(config) and not names_token:
        raise UnsupportedArchitectureError(
            f"bts cannot stitch '{config.model_type}': its config names no image token, so its image reaches the "
            f"decoder other than at image tokens of the text ({model_class.__name__}), where the expert streams, "
            "which read the text alone, have no matching positions")


def _plan_streams(recipe: Recipe, models: list[LocalModel], by_name: dict[str, int]) -> CompositionPlan:
    """bts: the hub's tensors and each expert stream's base-model tensors are copied; stitches are new."""
    hub = by_name[recipe.hub_name]
    streams = [i for i in range(len(models)) if i != hub]
    notes = check_compatible(models, hub, same_architecture=False)
    dtype = DTYPES[recipe.dtype] if recipe.dtype != "auto" else source_dtype(models[hub])
    dtype_name = str(dtype).removeprefix("torch.")
    configs, prefixes, denses, expected, hub_source = [], {}, {}, {}, _same_name
    for index, model in enumerate(models):
        config = _with_dtype(model.config, dtype_name)
        _check_image_at_tokens(config)
        denses[index], expected[index] = check_dense_tensors([model], config)
        prefixes[index] = denses[index].base_model_prefix
        # A multimodal expert is a stream of its language model alone (the image path is the hub's); a multimodal
        # hub keeps its vision tower unless the recipe drops it.
        if is_multimodal(config) and (index != hub or recipe.vision == "drop"):
            source_config, config = config, _with_dtype(language_config(config), dtype_name)
            if index == hub:
                denses[index], hub_source = _without_vision(denses[index], source_config, config)
            else:
                stitch_layers(denses[index], source_config)  # stepped block by block beside the hub
                prefixes[index] = language_model_name(denses[index], source_config)
        configs.append(config)
    _, hub_blocks = stitch_layers(denses[hub], configs[hub])
    for index in streams:  # each stream is stepped block by block beside the hub: refused as the hub would be
        if not is_multimodal(models[index].config):
            stitch_layers(denses[index], configs[index])
    points = stitch_points(len(hub_blocks), recipe.stitch_freq, recipe.stitch_layers_index)
    out_of_range = [p for p in points if p >= len(hub_blocks)]
    if out_of_range:
        raise RecipeError(
            f"stitch_layers_index {out_of_range} out of range: the hub '{models[hub].name}' has blocks "
            f"0..{len(hub_blocks) - 1}"
        )
    config = MixtureKitConfig(
        text_config=configs[hub], method="bts", expert_names=[models[i].name for i in streams],
        num_experts_per_tok=len(streams), expert_configs=[configs[i] for i in streams], stitch_layers_index=points,
        stitch_dropout=recipe.stitch_dropout, alpha=0.0, dtype=dtype_name, hub_name=models[hub].name,
    )
    with torch.device("meta"):
        composed = MixtureKitForCausalLM(config)
    hub_expected = expected[hub]
    parameters = {name for name, _ in composed.named_parameters()}
    tensors = []
    for name, (tensor, role, _) in tensor_roles(composed).items():
        shape = tuple(tensor.shape)
        out_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
        if role == "stitch":
            tensors.append(TensorPlan(name, shape, dtype, "new", init="stitch"))
        elif role == "stream":
            stream_name, relative = name.removeprefix("streams.").split(".", 1)
            index = by_name[stream_name]
            source = f"{prefixes[index]}.{relative}"
            if source in models[index].reader:
                tensors.append(TensorPlan(name, shape, out_dtype, "copy", (index,), (source,)))
            elif name in parameters:
                raise UnsupportedArchitectureError(
                    f"bts cannot use '{configs[index].model_type}' as a stream: its base model "
                    f"({type(denses[index].base_model).__name__}) has '{relative}', which the causal-LM checkpoint of "
                    f"'{models[index].name}' does not hold (its base model is not the causal LM's body, as in "
                    "encoder and encoder-decoder families)")
        elif hub_source(name) in hub_expected:
            tensors.append(TensorPlan(name, shape, out_dtype, "copy", (hub,), (hub_source(name),)))
    for note in notes:
        logger.warning(note)
    _check_adapters(recipe, models, by_name, None)  # every stream keeps all its weights: only the base must match
    return CompositionPlan(recipe, models, streams, hub, config, tensors, dtype, [], notes)
