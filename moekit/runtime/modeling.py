"""`MixtureKitForCausalLM`: the base architecture built by `transformers`, with routed modules swapped in.

No modeling source is copied or patched. The dense model is built from `config.text_config` by its own class, then
`traditional` replaces each chosen block's `mlp` by a `SparseMoeBlock` and `btx` replaces chosen Linears by
`RoutedLinear`s. The dense model's children become this model's children, so tensor names are the base model's
(`model.layers.0.mlp.experts.gate_up_proj`, ...) and its forward runs unchanged around the replaced modules.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers import DynamicCache
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_MAPPING,
)

from ..errors import CheckpointError, RecipeError, TrainingError, UnsupportedArchitectureError, did_you_mean
from .architecture import (
    LINEAR_TYPES, decoder_layers, ffn_child, ffn_linear_names, is_mixture_of_experts, is_multimodal, linear_names,
    mlp_layout, parallel_layer_lists, resolve_names, stitch_layers,
)
from .cache_argument import CACHE_ARGUMENT, output_cache, pop_cache
from .config import MixtureKitConfig
from .moe_block import SparseMoeBlock
from .routed_linear import RoutedLinear
from .shared_expert import SharedExpertGate
from .data_parallel import data_parallel_world_size, sum_over_ranks
from .routing import Router, RouterLogitsRecorder, balance_from_sums, router_sums
from .stitch import MERGE, Stitch, build_stitches, matching_depths, stitch_points
from .streams import StitchedBlockList, StreamState, capture_stream, replace_output

ROUTED_MODULE_TYPES = (SparseMoeBlock, RoutedLinear)
BALANCE_MODES = ("loss", "bias")


@dataclass
class ComposedCausalLMOutput(MoeCausalLMOutputWithPast):
    """The causal-LM output, plus the hidden states the LM head saw (`last_hidden_state`).

    TRL's trainers patch a model with a fused LM head that runs `model.base_model` (here the model itself) for
    `last_hidden_state` and projects it through `get_output_embeddings()` without materialising the logits. In a
    training forward, `last_hidden_state` also carries the balance loss (see `with_auxiliary_loss`), so a loss built
    from it, as TRL's is, optimises the balance loss too.
    """

    last_hidden_state: torch.FloatTensor | None = None


class TrainingRouting(NamedTuple):
    """What a training forward tells its routing hooks (`register_routing_hook`): the routers' names, their slot counts
    per expert over the global batch (summed over the data-parallel ranks; `[routers, E]`, no gradient), and the
    balance loss as added to the optimised loss (weighted, detached). Tensors stay on their device."""

    names: list[str]
    slots: torch.Tensor
    aux_loss: torch.Tensor


class _WithAuxiliaryLoss(torch.autograd.Function):
    """Identity on `hidden` whose backward also sends a gradient of one to `aux_loss`: whatever loss is computed from
    the returned tensor then includes `aux_loss` (once, with weight one), even if that loss never sees it.

    Only when the tensor takes part in the loss: DDP passes every output through its backward, with a zero gradient
    for those the loss does not use, and the balance loss must not be added a second time there."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.aux = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor | None):
        if gradient is None:
            return None, None
        shape, dtype, device = ctx.aux
        used = (gradient != 0).any().to(dtype=dtype, device=device)  # no host synchronisation
        return gradient, used.expand(shape).clone()


def with_auxiliary_loss(hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    return _WithAuxiliaryLoss.apply(hidden, aux_loss)


def with_torch_dtype(config):
    """The config, its `dtype` a torch dtype: some families build tensors with it (Apertus' xIELU), and a config read
    back from a composed checkpoint's JSON holds the name."""
    if isinstance(getattr(config, "dtype", None), str) and isinstance(getattr(torch, config.dtype, None), torch.dtype):
        config.dtype = getattr(torch, config.dtype)
    return config


def dense_model_class(text_config) -> type[PreTrainedModel]:
    """transformers' class for the base: its image-text model for a multimodal wrapper (LLaVA has no causal-LM
    class; Gemma 3's is the same class) or for an image-text model with one flat config and no causal-LM class
    (Chameleon: its VQ image tokenizer beside the decoder), else its causal LM."""
    image_text = type(text_config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    if image_text and (is_multimodal(text_config) or type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING):
        model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(text_config)]
        if getattr(text_config, "is_encoder_decoder", False):
            raise UnsupportedArchitectureError(
                f"'{text_config.model_type}' is an encoder-decoder model ({model_class.__name__}: its decoder "
                "cross-attends to what its encoder makes of the image), and MixtureKit composes decoder-only language "
                "models, with or without a vision tower")
        return model_class
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"'{text_config.model_type}' has no causal-LM or image-text-to-text class in transformers; MixtureKit "
            "composes models that AutoModelForCausalLM or AutoModelForImageTextToText can build"
        ) from None


def resolve_layer_indices(requested: list[int] | None, num_blocks: int) -> list[int]:
    """The blocks that get routers: all when `requested` is empty or None."""
    if not requested:
        return list(range(num_blocks))
    out_of_range = [i for i in requested if not 0 <= i < num_blocks]
    if out_of_range:
        raise RecipeError(f"router_layers_index {out_of_range} out of range: the model has blocks 0..{num_blocks - 1}")
    return sorted(requested)


def resolve_router_layers(requested: list[str] | None, block: nn.Module, model_type: str,
                          parallel: list[tuple[str, nn.ModuleList]] | None = None) -> list[str]:
    """Map `router_layers` entries (full `mlp.up_proj` or a unique suffix like `up_proj`) onto the block's Linears.
    `parallel`: the model's `parallel_layer_lists`, for the default (`ffn_linear_names`)."""
    valid = linear_names(block)
    if requested is None:
        default = ffn_linear_names(block, model_type, parallel)
        child = ffn_child(block)
        if not default and child is not None and is_mixture_of_experts(getattr(block, child)):
            attention = [name for name in valid if not name.startswith(child + ".")]
            raise RecipeError(f"'{model_type}' has no dense FFN module whose Linears btx routes by default (an MoE, "
                              "a recurrent block, or Linears outside any FFN module); its FFN is already a "
                              f"Mixture-of-Experts ({type(getattr(block, child)).__name__}): name the Linears beside "
                              f"it in router_layers (here: {', '.join(attention)}) and its experts are averaged")
        if not default:
            raise RecipeError(f"'{model_type}' has no dense FFN module whose Linears btx routes by default (an MoE, "
                              "a recurrent block, or Linears outside any FFN module); name them in router_layers "
                              f"(valid names: {', '.join(valid)})")
        return default

    child = ffn_child(block)
    moe = getattr(block, child) if child is not None and is_mixture_of_experts(getattr(block, child)) else None

    def refuse(entry: str, candidates: list[str]) -> RecipeError:
        if moe is not None and not candidates:  # a family whose first blocks are dense and later ones MoE
            return RecipeError(
                f"router_layers entry '{entry}' is not a Linear of a block of '{model_type}' whose FFN is already a "
                f"Mixture-of-Experts ({type(moe).__name__}), and btx routes dense FFNs' Linears; set "
                f"router_layers_index to the dense blocks, or name Linears every routed block has "
                f"(valid names here: {', '.join(valid)})")
        why = "is ambiguous" if candidates else "is not a Linear of the block"
        return RecipeError(f"router_layers entry '{entry}' {why} in '{model_type}'; valid names: {', '.join(valid)}")

    return resolve_names(requested, valid, refuse)


def blocks_holding(requested: list[str] | None, blocks: list[nn.Module], model_type: str) -> list[int] | None:
    """The blocks btx routes when the recipe names Linears but no router_layers_index: those that hold every named
    Linear, when some blocks hold none (a hybrid's linear-attention or Mamba blocks beside its attention blocks, when
    attention projections are named); None when every block holds them, or none does (resolving then says why)."""
    if not requested:
        return None

    def holds(block: nn.Module, entry: str) -> bool:
        valid = linear_names(block)
        return entry in valid or sum(name.endswith("." + entry) for name in valid) == 1

    held = [[holds(block, entry) for entry in requested] for block in blocks]
    partial = [index for index, marks in enumerate(held) if any(marks) and not all(marks)]
    if partial:
        index = partial[0]
        missing = [entry for entry, mark in zip(requested, held[index]) if not mark]
        raise RecipeError(
            f"router_layers names Linears that block {index} of '{model_type}' holds only in part (it has no "
            f"{', '.join(missing)}); name Linears that each block holds all of or none of, or set "
            f"router_layers_index (valid names in block {index}: {', '.join(linear_names(blocks[index]))})")
    holding = [index for index, marks in enumerate(held) if all(marks)]
    return holding if holding and len(holding) < len(blocks) else None


def saved_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors `save_pretrained` writes for `model`, by name and shape: its state dict less the tied weights."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def check_checkpoint(folder: Path) -> None:
    """Compare a composed checkpoint's tensor headers with what its config builds; raise naming the first problems."""
    from ..sources.resolve import weight_files
    from ..sources.safetensors_io import CheckpointReader

    config = MixtureKitConfig.from_pretrained(folder)
    files = weight_files(folder)
    if not files:
        return
    with torch.device("meta"):
        expected_model = MixtureKitForCausalLM(config)
    reader = CheckpointReader(files)
    reader.read_as(expected_model)  # names as transformers loads them: its save reverts renamings of the families
    stored = reader.tensors
    expected = saved_tensor_shapes(expected_model)
    problems = [f"tensor '{n}' has shape {list(stored[n].shape)}, the config needs {list(shape)}"
                for n, shape in expected.items() if n in stored and stored[n].shape != shape]
    missing = [n for n in expected if n not in stored and not n.endswith(".inv_freq")]
    needed_by_model = {n for n, _ in expected_model.named_parameters()}
    problems += [f"tensor '{n}' is missing" for n in missing if n in needed_by_model]
    if problems:
        raise CheckpointError(
            f"checkpoint '{folder}' does not match its config (expert_names lists {config.num_experts} experts: "
            f"{', '.join(config.expert_names)}): {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; recompose it with moekit "
            "compose, or restore the config.json it was written with"
        )


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def convert_dense_to_moe(dense: nn.Module, config: MixtureKitConfig, recorder: RouterLogitsRecorder) -> None:
    """Swap routed modules into a freshly built dense model, in place."""
    text_config = config.text_config
    layers_name, layers = decoder_layers(dense, text_config)
    indices = resolve_layer_indices(config.router_layers_index, len(layers))
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    if not 1 <= top_k <= num_experts:
        raise RecipeError(f"num_experts_per_tok must be between 1 and {num_experts}, got {top_k}")
    if config.shared_expert not in (None, "base"):
        raise RecipeError(f"shared_expert must be 'base' or absent, got {config.shared_expert!r}")
    shared = dict(shared_expert=config.shared_expert is not None,
                  shared_expert_gate=config.shared_expert is not None and config.shared_expert_gate)
    if config.method == "traditional":
        for index in indices:
            layout = mlp_layout(layers[index], text_config.model_type)
            ffn = getattr(layers[index], layout.child)
            setattr(layers[index], layout.child, SparseMoeBlock(ffn, layout, num_experts, top_k, recorder, **shared))
    elif config.method == "btx":
        parallel = parallel_layer_lists(dense, text_config, layers_name) if config.router_layers is None else None
        for index in indices:
            block = layers[index]
            for name in resolve_router_layers(config.router_layers, block, text_config.model_type, parallel):
                linear = block.get_submodule(name)
                if not isinstance(linear, LINEAR_TYPES):
                    raise RecipeError(f"router_layers entry '{name}' is a {type(linear).__name__}, not a Linear")
                _set_submodule(block, name, RoutedLinear(linear, num_experts, top_k, recorder, **shared))
    else:
        raise RecipeError(f"method '{config.method}' is not routed; valid: traditional, btx (bts builds streams)")


class MixtureKitForCausalLM(PreTrainedModel, GenerationMixin):
    """A composed Mixture-of-Experts causal LM; loads with `AutoModelForCausalLM` after `import moekit`."""

    config_class = MixtureKitConfig
    base_model_prefix = "mixturekit"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # A checkpoint written before loss-free balancing has no selection bias: it loads as zeros (no routing change).
    _keys_to_ignore_on_load_missing = [r"\.expert_bias$"]

    def __init__(self, config: MixtureKitConfig):
        super().__init__(config)
        dense = dense_model_class(config.text_config)(with_torch_dtype(config.text_config))
        self.router_recorder = RouterLogitsRecorder()
        if config.method == "bts":
            self._build_streams(dense)
        else:
            convert_dense_to_moe(dense, config, self.router_recorder)
        for name, child in dense.named_children():
            self.add_module(name, child)
        self._share_own_tensors(dense)
        # The dense model shares its children with us; kept out of the module tree so tensors are not named twice.
        object.__setattr__(self, "_dense", dense)
        self._tied_weights_keys = dict(getattr(dense, "_tied_weights_keys", None) or {})
        self._dense_accepts = self._accepted_arguments(type(dense).forward)
        self.post_init()
        self.apply_default_freeze()
        self.set_balance(getattr(config, "balance", "loss"))
        self.set_experts_backend(config.experts_backend)
        self.disable_experts(getattr(config, "disabled_experts", None) or [])
        # The weight of the balance term: `config.alpha`, unless a training controller changes it between steps
        # (`training.AutoAlphaCallback`, for `alpha_mode: auto`; it keeps its state in the trainer's checkpoints).
        self.current_alpha = float(config.alpha)
        # Called after each training forward with its `TrainingRouting` (`register_routing_hook`).
        object.__setattr__(self, "_routing_hooks", OrderedDict())  # a dict that `RemovableHandle` can refer to weakly
        # The LM head's input of the running forward, for `last_hidden_state` (a plain attribute, not state).
        object.__setattr__(self, "_lm_head_input", None)
        self.get_output_embeddings().register_forward_pre_hook(self._keep_lm_head_input)

    def _share_own_tensors(self, dense: nn.Module) -> None:
        """The dense model's own parameters and buffers, outside any child (BLIP-2's `query_tokens`), become ours under
        the same names, and the dense model reads them from our tables: loading replaces a parameter where it is
        registered, so a copy of the table would leave the dense forward reading the unloaded one."""
        for name, parameter in dense._parameters.items():
            self.register_parameter(name, parameter)
        for name, buffer in dense._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in dense._non_persistent_buffers_set)
        object.__setattr__(dense, "_parameters", self._parameters)
        object.__setattr__(dense, "_buffers", self._buffers)
        object.__setattr__(dense, "_non_persistent_buffers_set", self._non_persistent_buffers_set)

    def _keep_lm_head_input(self, module: nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling():
            object.__setattr__(self, "_lm_head_input", args[0] if args else None)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModelForCausalLM") -> None:
        """Not registered, as `MixtureKitConfig.register_for_auto_class` says why."""

    def register_routing_hook(self, hook: Callable[[TrainingRouting], None]) -> RemovableHandle:
        """Call `hook(routing)` after every training forward (training mode, gradient on) with its `TrainingRouting`;
        `handle.remove()` detaches it. How training watches the load and adapts alpha (`training.callbacks`) without
        the forward keeping statistics or running a controller: a forward hook would miss TRL's fused head, whose
        output has no routing, and would need the global counts computed a second time."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def set_balance(self, balance: str) -> None:
        """`loss` or `bias`: whether every router adds its `expert_bias` to its logits to choose experts (loss-free
        balancing; training moves the bias, `training.BiasBalanceCallback`). Also names each router."""
        if balance not in BALANCE_MODES:
            raise RecipeError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}"
                              f"{did_you_mean(str(balance), list(BALANCE_MODES))}")
        self.config.balance = balance
        for name, router in self.routers():
            object.__setattr__(router, "qualified_name", name)
            router.use_selection_bias(balance == "bias")

    def disable_experts(self, names: list[str]) -> None:
        """Opt these experts out at inference, in addition to those already out (FlexOlmo's opt-out): every router
        masks their logits to -inf before top-k, and bts leaves their streams out of every stitch (the merge's
        softmax runs over the hub and the other streams). The model is then the same function as the checkpoint
        `moekit edit --remove` writes without them. Recorded in `config.disabled_experts`, so it is saved."""
        names = list(names)
        known = list(self.config.expert_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RecipeError(f"cannot disable unknown expert(s) {unknown}; the experts are {known}"
                              f"{did_you_mean(str(unknown[0]), known)}")
        disabled = [n for n in known if n in set(names) | set(self.config.disabled_experts or ())]
        needed = 1 if self.config.method == "bts" else self.config.num_experts_per_tok
        if len(known) - len(disabled) < needed:
            raise RecipeError(
                f"cannot disable {disabled}: {len(known) - len(disabled)} of {len(known)} experts would remain, and "
                + ("bts needs at least one expert stream" if self.config.method == "bts" else
                   f"top-{self.config.num_experts_per_tok} routing needs at least {needed} (num_experts_per_tok)"))
        self.config.disabled_experts = disabled
        indices = [known.index(n) for n in disabled]
        for _, router in self.routers():
            router.disable_experts(indices)

    def enable_experts(self, names: list[str] | None = None) -> None:
        """Opt experts back in (`names`, or every disabled one when None)."""
        known = list(self.config.expert_names)
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            raise RecipeError(f"cannot enable unknown expert(s) {unknown}; the experts are {known}")
        keep = [] if names is None else [n for n in self.config.disabled_experts if n not in set(names)]
        self.config.disabled_experts = []
        self.disable_experts(keep)

    def routing_biases(self) -> dict[str, torch.Tensor | None]:
        """Each router's selection bias by name (None under `balance: loss`): what `route` needs besides the logits
        to repeat the model's choice from `router_logits`."""
        return {name: router.selection_bias for name, router in self.routers()}

    def set_experts_backend(self, backend: str) -> None:
        """Choose how stacked experts multiply (auto, loop, grouped_mm) for every routed module."""
        from .experts import BACKENDS

        if backend not in BACKENDS:
            raise RecipeError(f"experts_backend must be one of {BACKENDS}, got '{backend}'")
        self.config.experts_backend = backend
        for module in self.modules():
            if isinstance(module, ROUTED_MODULE_TYPES):
                (module.experts if isinstance(module, SparseMoeBlock) else module).backend = backend

    def apply_default_freeze(self) -> None:
        """bts: the hub and the expert streams stay frozen and the stitches train; routed methods: nothing frozen."""
        if self.config.method == "bts":
            self.requires_grad_(False)
            self.stitches.requires_grad_(True)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """As `PreTrainedModel.from_pretrained`, after checking a local checkpoint's tensors against its config (so a
        mismatch is named, and a missing router is an error instead of a random one); loading creates fresh
        parameters, so the freeze is applied again."""
        source = Path(str(args[0] if args else kwargs.get("pretrained_model_name_or_path", "")))
        if (source / "config.json").is_file():
            check_checkpoint(source)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.zero_missing_expert_biases()
        model.apply_default_freeze()
        return loaded

    def zero_missing_expert_biases(self) -> None:
        """Zero every router's `expert_bias` that loading did not fill: a checkpoint written before loss-free
        balancing has none, and routes as a zero bias does. The routers sit inside the dense model, whose own
        `_init_weights` (not ours) transformers runs on them, so the missing buffer is left as unfilled memory."""
        with torch.no_grad():
            for _, router in self.routers():
                if not getattr(router.expert_bias, "_is_hf_initialized", False):
                    router.expert_bias.zero_()

    def _build_streams(self, hub: PreTrainedModel) -> None:
        """bts: the hub (`dense`), one frozen base model per expert (`streams.<name>`), and the `stitches`."""
        config, text_config = self.config, self.config.text_config
        _, hub_blocks = stitch_layers(hub, text_config)
        hub_blocks.__class__ = StitchedBlockList
        object.__setattr__(self, "_hub_blocks", hub_blocks)
        points = stitch_points(len(hub_blocks), None, config.stitch_layers_index)
        out_of_range = [p for p in points if not 0 <= p < len(hub_blocks)]
        if out_of_range:
            raise RecipeError(
                f"stitch_layers_index {out_of_range} out of range: the hub has blocks 0..{len(hub_blocks) - 1}"
            )
        streams, sizes, self._stream_blocks, self._stream_depths = {}, [], {}, {}
        for name, stream_config in zip(config.expert_names, config.expert_config_objects()):
            stream_config._attn_implementation = text_config._attn_implementation
            try:
                stream = MODEL_MAPPING[type(stream_config)](with_torch_dtype(stream_config))
            except KeyError:
                raise UnsupportedArchitectureError(f"'{stream_config.model_type}' has no base model class") from None
            _, blocks = stitch_layers(stream, stream_config)
            streams[name] = stream
            sizes.append(stream_config.hidden_size)
            self._stream_blocks[name] = blocks
            self._stream_depths[name] = matching_depths(points, len(hub_blocks), len(blocks))
        self.streams = nn.ModuleDict(streams)
        try:
            self.stitches = build_stitches(points, config.hidden_size, sizes, config.stitch_dropout,
                                           getattr(config, "stitch_directions", None))
        except ValueError as error:
            raise RecipeError(str(error)) from None
        self._stitch_at = {point: k for k, point in enumerate(points)}
        self.stitch_points = points

    def _stream_caches(self, cache: Any) -> dict[str, Any]:
        """Each expert stream's own KV cache, kept on the hub's cache object so generation carries it along."""
        caches = getattr(cache, "mixturekit_stream_caches", None)
        if caches is None:
            caches = {name: DynamicCache(config=c) for name, c in zip(self.streams, self.config.expert_config_objects())}
            cache.mixturekit_stream_caches = caches
        return caches

    def _forward_with_streams(self, arguments: dict[str, Any]) -> Any:
        """Capture every stream's block inputs, then run the hub; stitches act after the hub's stitch blocks."""
        use_cache = arguments.get("use_cache", getattr(self.config.text_config, "use_cache", True))
        cache = arguments.get(CACHE_ARGUMENT)
        if use_cache and cache is None:
            cache = arguments[CACHE_ARGUMENT] = DynamicCache(config=self.config.text_config)
        caches = self._stream_caches(cache) if use_cache else {}
        states = []
        disabled = set(getattr(self.config, "disabled_experts", None) or ())
        for name, stream in self.streams.items():
            if name in disabled:  # opted out: it reaches no stitch, so it need not run
                continue
            inputs = {k: arguments[k] for k in ("attention_mask", "position_ids", "cache_position") if k in arguments}
            if "input_ids" in arguments:
                inputs["input_ids"] = arguments["input_ids"]
            else:
                embeds, hub_type = arguments["inputs_embeds"], self.config.text_config.model_type
                if embeds.shape[-1] != stream.config.hidden_size:
                    raise ValueError(
                        f"inputs_embeds have width {embeds.shape[-1]}, but expert stream '{name}' has hidden size "
                        f"{stream.config.hidden_size}; pass input_ids so each stream embeds them itself"
                    )
                if stream.config.model_type != hub_type:
                    raise ValueError(
                        f"inputs_embeds are embeddings of the hub's family ({hub_type}), but expert stream '{name}' "
                        f"is a {stream.config.model_type} model, which embeds tokens its own way; pass input_ids so "
                        "each stream embeds them itself"
                    )
                inputs["inputs_embeds"] = embeds
            inputs.update({"use_cache": bool(use_cache), CACHE_ARGUMENT: caches.get(name)})
            states.append((name, capture_stream(stream, self._stream_blocks[name], inputs)))
        self._hub_blocks.after_block = lambda index, output: self._after_hub_block(states, index, output)
        try:
            return self._dense(**arguments, return_dict=True)
        finally:
            self._hub_blocks.after_block = None

    def _after_hub_block(self, states: list[tuple[str, StreamState]], index: int, output: Any) -> Any:
        k = self._stitch_at.get(index)
        if k is None:
            return output
        hub = output[0] if isinstance(output, tuple) else output
        for name, state in states:
            state.advance_to(self._stream_depths[name][k])
        stitch, experts = self.stitches[k], [state.hidden for _, state in states]
        names = list(self.streams)
        active = [names.index(name) for name, _ in states]
        if stitch.direction == MERGE:
            hub = stitch.merge(hub, experts, active)
        else:
            for (_, state), updated in zip(states, stitch.broadcast(hub, experts, active)):
                state.hidden = updated
        return replace_output(output, hub)

    @staticmethod
    def _accepted_arguments(forward) -> set[str] | None:
        parameters = inspect.signature(forward).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return None
        return set(parameters)

    @property
    def dense_model(self) -> PreTrainedModel:
        """The base architecture's own model object (its modules are this model's modules)."""
        return self._dense

    def routers(self) -> list[tuple[str, Router]]:
        return [(name, module) for name, module in self.named_modules() if isinstance(module, Router)]

    def routed_modules(self) -> list[tuple[str, nn.Module]]:
        return [(name, module) for name, module in self.named_modules() if isinstance(module, ROUTED_MODULE_TYPES)]

    def get_input_embeddings(self) -> nn.Module:
        return self._dense.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._dense.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        head = self._dense.get_output_embeddings()
        language = getattr(self._dense, "language_model", None)
        if head is None and isinstance(language, PreTrainedModel):  # a wrapper holding a whole causal LM that does
            head = language.get_output_embeddings()  # not name its head (Nemotron Omni's `language_model`)
        return head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self._dense.set_output_embeddings(value)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """A family whose class generates through its own `generate` (BLIP-2, InstructBLIP, Kosmos-2: the image's
        features computed once, then its language model's `generate`; its forward reads the image at every step)
        generates through it when the experts are routed inside the dense model (traditional, btx); bts steps its
        streams in this model's forward, which only the generic `generate` calls."""
        if "generate" in vars(type(self._dense)) and self.config.method != "bts":
            return type(self._dense).generate(self._dense, *args, **kwargs)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.FloatTensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The dense model's own preparation, given what `generate` passes under the installed release's names
        (`generate` reads `inputs_embeds` and `kwargs` from this signature)."""
        return self._dense.prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]):
        """The dense model's own: Qwen-VL and Qwen3.5 wrappers place an image's tokens in 3D (multimodal RoPE) here;
        the default's 1D positions would make `generate` compute other logits than the forward does."""
        return self._dense._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def _update_model_kwargs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The dense model's own update between generation steps: PaliGemma marks each generated token as causal
        suffix there (`token_type_ids` 1); the generic update would put it in the bidirectional prefix, and
        generation without the cache would then differ from generation with it."""
        return self._dense._update_model_kwargs_for_generation(*args, **kwargs)

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        """The dense model's own check of `generate`'s inputs (an image-text base takes `pixel_values` and its
        family's image arguments there), less the arguments only our forward takes (`output_router_logits`)."""
        own = set(inspect.signature(self.forward).parameters) - set(inspect.signature(self._dense.forward).parameters)
        self._dense._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in own})

    def _prefill(self, *args: Any, **kwargs: Any):
        """transformers' own; a cache that cannot say how many tokens it holds is refused in one sentence rather than
        failing inside `generate`: transformers 5.17's prefill asks for it, and its `DynamicCache` of recurrent layers
        only (a Mamba hub's) has no attention layer to read it from. Later releases do not ask."""
        try:
            return super()._prefill(*args, **kwargs)
        except ValueError as error:
            if "get_seq_length" not in str(error):
                raise
            import transformers

            raise UnsupportedArchitectureError(
                f"'{self.config.text_config.model_type}' has only recurrent cache layers, and transformers "
                f"{transformers.__version__}'s generate cannot track their length ({error}); generate with "
                "transformers 5.24 or later (forward passes and training work on this release)"
            ) from None

    @classmethod
    def is_custom_code(cls) -> bool:
        """Not custom code to transformers' loader: for custom code it skips `_init_weights` on every module whose
        own tensors were loaded, and so never fills the non-persistent buffers a family's model computes there
        (FalconH1's `mup_vector` stayed uninitialised memory: NaN logits). Our `_init_weights` leaves loaded tensors
        alone instead, as transformers' own models do."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Router):
            nn.init.normal_(module.weight, std=0.02)  # guarded by transformers while loading: a loaded weight stays
            nn.init.zeros_(module.expert_bias)  # likewise
        elif isinstance(module, SharedExpertGate):
            nn.init.zeros_(module.weight)  # the shared expert at weight ½, as composed (guarded as above)
        elif isinstance(module, Stitch):
            if not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.reset_parameters()  # in-place writes transformers cannot guard: only for stitches not loaded
        else:
            self._dense._init_weights(module)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> ComposedCausalLMOutput:
        """The dense model's forward, plus the routers' logits and the load-balancing loss (`aux_loss`).

        The KV cache comes in `kwargs` as `cache` or `past_key_values` (see `cache_argument`); other keyword arguments
        go to the dense model's forward where it accepts them.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        kwargs.pop("return_dict", None)
        cache = pop_cache(kwargs)
        arguments = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
            **{CACHE_ARGUMENT: cache}, **kwargs,
        )
        arguments = {
            k: v for k, v in arguments.items()
            if v is not None and not (k == "logits_to_keep" and isinstance(v, int) and v == 0)
            and (self._dense_accepts is None or k in self._dense_accepts)
        }
        object.__setattr__(self, "_lm_head_input", None)
        with self.router_recorder.recording() as router_logits:
            if self.config.method == "bts":
                outputs = self._forward_with_streams(arguments)
            else:
                outputs = self._dense(**arguments, return_dict=True)
        hidden, training_step = self._lm_head_input, self.training and torch.is_grad_enabled()
        object.__setattr__(self, "_lm_head_input", None)
        aux_loss, loss_weight = None, 1.0
        if router_logits and (labels is not None or output_router_logits or training_step):
            aux_loss, loss_weight, slots = self._aux_loss_and_weight(router_logits, attention_mask, labels, kwargs)
            if training_step:
                weighted = loss_weight * aux_loss
                if hidden is not None:  # for losses built from the hidden states (TRL's fused head)
                    hidden = with_auxiliary_loss(hidden, weighted)
                if self._routing_hooks:  # the trainer's statistics and alpha controller, if any
                    names = list(self.router_recorder.names) or [""] * len(router_logits)
                    routing = TrainingRouting(names, slots, weighted.detach())
                    for hook in list(self._routing_hooks.values()):
                        hook(routing)
        if hidden is not None and hidden.requires_grad and hidden._base is not None:
            # The LM head's input is a view (a slice of the last block's output, and the view `with_auxiliary_loss`
            # returns): FSDP2 hooks the root module's outputs for its pre-backward all-gather, and an in-place op on
            # a view would drop that hook. A copy of [batch, length, hidden], a fraction of the logits' size.
            hidden = hidden.clone()
        loss = outputs.loss
        if loss is not None and aux_loss is not None and (self.current_alpha > 0 or self.config.router_z_loss_coef):
            loss = loss + loss_weight * aux_loss.to(loss.device)
        composed = ComposedCausalLMOutput(
            loss=loss, aux_loss=aux_loss, logits=outputs.logits, **{CACHE_ARGUMENT: output_cache(outputs)},
            hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
            router_logits=tuple(router_logits) if output_router_logits else None, last_hidden_state=hidden,
        )
        for key, value in outputs.items():  # the family's own fields, which its generation reads back (Idefics'
            if key not in composed and value is not None:  # `image_outputs`: the image's features, computed once)
                composed[key] = value
        return composed

    def load_balancing_loss(
        self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`alpha * sum over routers of E * sum_i f_i P_i` (+ the z-loss if set), padding excluded, with
        `alpha = current_alpha`: a function of the router logits (as Mixtral's `load_balancing_loss_func`), which
        counts nothing and changes nothing on the model.

        Raises if training lost the loss's gradient. In a data-parallel training step the counts are summed over the
        ranks first: each rank returns its share of the global batch's loss times the number of ranks, so that the
        mean over ranks (what DDP, FSDP and ZeRO average gradients to) is the loss of the global batch.
        """
        return self._aux_loss_and_weight(router_logits, attention_mask)[0]

    def _aux_loss_and_weight(
        self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, loss_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, float | torch.Tensor, torch.Tensor]:
        """The aux loss (see `load_balancing_loss`), the weight to add it to the LM loss with, and the slot counts
        `[routers, E]` it was computed from (over the global batch in a training step).

        The weight is 1, except where `transformers.Trainer` passes `num_items_in_batch`: it then multiplies the loss
        by the number of ranks and sums it over gradient-accumulation steps instead of averaging, as it does for the
        token-summed LM loss. The weight, this micro-batch's share of the step's label tokens divided by the number of
        ranks, undoes both, so the aux loss counts once per step at any rank count and accumulation.

        Three things here serve training yet stay in the forward, because the loss the trainer differentiates is
        built here: the sum of the counts over the ranks (the gradient of the global batch's balance needs the
        global f_i inside this forward, also for FSDP/DDP loops that call the model directly; one collective for
        every router and the label count); the weight for `num_items_in_batch` (the Trainer optimises
        `outputs.loss` as returned); and the check that the loss kept its gradient (only the forward can see it
        lost, at the first step, where the cause can still be named). The alpha controller and the routing
        statistics are training's (`training.callbacks`); they read each training forward's counts through
        `register_routing_hook`.
        """
        config, k = self.config, self.config.num_experts_per_tok
        biases = self.router_recorder.biases  # the selection biases of the forward that recorded these logits
        biases = biases if len(biases) == len(router_logits) else [None] * len(router_logits)
        sums = [router_sums(logits, k, self._token_mask(attention_mask, logits), bias)
                for logits, bias in zip(router_logits, biases)]
        counts = torch.stack([torch.cat([s.slots, s.tokens.reshape(1)]).to(sums[0].slots.device) for s in sums])
        num_items = (loss_kwargs or {}).get("num_items_in_batch")
        label_items = self._label_items(labels, loss_kwargs) if num_items is not None else None
        ranks = 1
        # A training step (not the no-grad forwards of a DPO reference or of generation): counts summed over the
        # ranks, which all run it.
        training_step = self.training and torch.is_grad_enabled()
        if training_step:
            # One collective for every router (and the label count): all ranks run the same training forwards.
            ranks = data_parallel_world_size()
            if label_items is not None:
                counts = torch.cat([counts, label_items.to(counts).expand(1, counts.shape[1])])
            counts = sum_over_ranks(counts)
            if label_items is not None:
                counts, label_items = counts[:-1], counts[-1, 0]
        balance, z_loss = None, None
        for router_sum, row in zip(sums, counts):
            tokens = row[-1].to(router_sum.probability_sum.device)
            term = balance_from_sums(router_sum.probability_sum, row[:-1].to(tokens.device), tokens, k)
            balance = term if balance is None else balance + term.to(balance.device)
            if config.router_z_loss_coef:
                z = router_sum.logsumexp_squared_sum / tokens.clamp(min=1)
                z_loss = z if z_loss is None else z_loss + z.to(z_loss.device)
        aux_loss = self.current_alpha * balance
        if z_loss is not None:
            aux_loss = aux_loss + config.router_z_loss_coef * z_loss
        aux_loss = aux_loss * ranks
        routers_train = any(router.weight.requires_grad for _, router in self.routers())
        if training_step and routers_train and not aux_loss.requires_grad:
            raise TrainingError(
                "the load-balancing loss lost its gradient: reentrant activation checkpointing runs blocks without "
                "autograd. Enable it with {'use_reentrant': False} as the checkpointing kwargs "
                "(activation_checkpointing_kwargs from transformers 5.24, gradient_checkpointing_kwargs before)."
            )
        weight = 1.0
        if num_items is not None and label_items is not None:
            total = torch.as_tensor(num_items, device=aux_loss.device, dtype=torch.float32).clamp(min=1)
            weight = label_items.to(aux_loss.device, torch.float32) / total / ranks
        return aux_loss, weight, counts[:, :-1]

    @staticmethod
    def _token_mask(attention_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
        """The attention mask's entries for the tokens this forward routed (the last ones, when decoding)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        current = attention_mask[:, -(logits.shape[0] // attention_mask.shape[0]):]
        return current.reshape(-1).bool() if current.numel() == logits.shape[0] else None

    @staticmethod
    def _label_items(labels: torch.Tensor | None, loss_kwargs: dict[str, Any] | None) -> torch.Tensor | None:
        """This micro-batch's label tokens, counted as `transformers.Trainer` counts `num_items_in_batch`."""
        shift_labels = (loss_kwargs or {}).get("shift_labels")
        if shift_labels is not None:
            return shift_labels.ne(-100).sum().float()
        return labels[..., 1:].ne(-100).sum().float() if labels is not None else None
