"""`MixtureKitForCausalLM`: the base architecture built by `transformers`, with routed modules swapped in.

No modeling source is copied or patched. The dense model is built from `config.text_config` by its own class, then
`traditional` replaces each chosen block's `mlp` by a `SparseMoeBlock` and `btx` replaces chosen Linears by
`RoutedLinear`s. The dense model's children become this model's children, so tensor names are the base model's
(`model.layers.0.mlp.experts.gate_up_proj`, ...) and its forward runs unchanged around the replaced modules.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import GenerationMixin, PreTrainedModel

from ...errors import RecipeError, UnsupportedArchitectureError, did_you_mean
from ..base_model.cache_argument import CACHE_ARGUMENT, output_cache, pop_cache
from .checkpoint_check import check_checkpoint
from .config import MixtureKitConfig
from .conversion import ROUTED_MODULE_TYPES, convert_dense_to_moe
from ..base_model.dense_model import dense_model_class, share_own_tensors, with_torch_dtype
from .outputs import ComposedCausalLMOutput, TrainingRouting, with_auxiliary_loss
from ..bts.hub_streams import HubWithStreams
from ..bts.stitch import Stitch
from ..routed.balance import AuxiliaryLoss, auxiliary_loss
from ..routed.moe_block import SparseMoeBlock
from ..routed.routing import Router, RouterLogitsRecorder
from ..routed.shared_expert import SharedExpertGate

BALANCE_MODES = ("loss", "bias")


class MixtureKitForCausalLM(PreTrainedModel, GenerationMixin, HubWithStreams):
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
    # What training wraps around `auxiliary_loss` in every forward that computes it (`training.balance_loss`,
    # installed on `import moekit`): the counts over the data-parallel ranks, the weight for `num_items_in_batch`, the
    # check that the loss kept its gradient. `wrapper(model, router_logits, attention_mask, labels, loss_kwargs)` returns the
    # loss, the weight to add it to the LM loss with, and the slot counts. None: the pure loss, weight 1.
    auxiliary_loss_wrapper: ClassVar[Callable[..., tuple[torch.Tensor, Any, torch.Tensor]] | None] = None

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
        share_own_tensors(self, dense)
        # The dense model shares its children with us; kept out of the module tree so tensors are not named twice.
        object.__setattr__(self, "_dense", dense)
        self._tied_weights_keys = dict(getattr(dense, "_tied_weights_keys", None) or {})
        self._dense_accepts = self._accepted_arguments(type(dense).forward)
        self.post_init()
        self.apply_default_freeze()
        self.set_balance(getattr(config, "balance", "loss"))
        self.set_experts_backend(config.experts_backend)
        self.disable_experts(getattr(config, "disabled_experts", None) or [])
        # alpha, the balance loss's coefficient: `config.alpha`, unless a training controller changes it between
        # steps (`training.AutoAlphaCallback`, for `alpha_mode: auto`; it keeps its state in the trainer's checkpoints).
        self.current_alpha = float(config.alpha)
        # Called after each training forward with its `TrainingRouting` (`register_routing_hook`).
        object.__setattr__(self, "_routing_hooks", OrderedDict())  # a dict that `RemovableHandle` can refer to weakly
        # The LM head's input of the running forward, for `last_hidden_state` (a plain attribute, not state).
        object.__setattr__(self, "_lm_head_input", None)
        self.get_output_embeddings().register_forward_pre_hook(self._keep_lm_head_input)

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
        from ..compute.experts import BACKENDS

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
            check_checkpoint(source, cls)
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

    def _supports_default_dynamic_cache(self) -> bool:
        """The dense model's answer: `generate` decides it by the class's name, and xLSTM (like RWKV, Reformer,
        XLNet and the first MiniMax) keeps a cache of its own, which a `DynamicCache` given in its place breaks."""
        return self._dense._supports_default_dynamic_cache()

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
            if self.auxiliary_loss_wrapper is None:
                (aux_loss, slots), loss_weight = self.auxiliary_loss(router_logits, attention_mask), 1.0
            else:
                aux_loss, loss_weight, slots = self.auxiliary_loss_wrapper(
                    router_logits, attention_mask, labels, kwargs)
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
        for key, value in outputs.items():  # the family's own fields, which its generation reads back: a cache kept
            if key not in composed and value is not None:  # under its own name (xLSTM's `cache_params`), Idefics'
                composed[key] = value  # `image_outputs` (the image's features, computed once)
        return composed

    def auxiliary_loss(
        self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None,
        global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> AuxiliaryLoss:
        """`routed.balance.auxiliary_loss` of this forward's router logits: `alpha * sum over routers of
        E * sum_i f_i P_i` (+ the z-loss if set), padding excluded, with `alpha = current_alpha` and each router's
        selection bias. A function of the router logits (as Mixtral's `load_balancing_loss_func`), which counts
        nothing and changes nothing on the model; `global_counts` as there."""
        biases = self.router_recorder.biases  # the selection biases of the forward that recorded these logits
        biases = biases if len(biases) == len(router_logits) else [None] * len(router_logits)
        masks = [self._token_mask(attention_mask, logits) for logits in router_logits]
        return auxiliary_loss(router_logits, self.config.num_experts_per_tok, self.current_alpha,
                              self.config.router_z_loss_coef, masks, biases, global_counts)

    @staticmethod
    def _token_mask(attention_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
        """The attention mask's entries for the tokens this forward routed (the last ones, when decoding)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        current = attention_mask[:, -(logits.shape[0] // attention_mask.shape[0]):]
        return current.reshape(-1).bool() if current.numel() == logits.shape[0] else None
