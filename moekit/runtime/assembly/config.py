"""`MixtureKitConfig`: the base model's own config (`text_config`) plus what the composition adds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ...errors import MixtureKitError, SourceError
from ..base_model.architecture import language_config
from .loader_files import names_loader_files, write_loader_files


class MixtureKitConfig(PretrainedConfig):
    """Configuration of a composed model.

    The base architecture is kept whole as `text_config`, so `transformers` builds it with its own classes. For a
    multimodal base (Gemma 3, LLaVA, Qwen3-VL) that is the wrapper's whole config, vision tower included, and
    `get_text_config()` (used for caches and generation) returns its language model's config; for a text model it
    returns `text_config` itself. The fields here say which modules are replaced.
    """

    model_type = "mixturekit"
    # A plain class attribute works across transformers 5.x: attention settings propagate to `text_config`.
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        method: str = "traditional",
        expert_names: list[str] | None = None,
        num_experts_per_tok: int = 2,
        router_layers: list[str] | None = None,
        router_layers_index: list[int] | None = None,
        alpha: float = 0.01,
        output_router_logits: bool = False,
        expert_configs: list[PretrainedConfig | dict[str, Any]] | None = None,
        stitch_layers_index: list[int] | None = None,
        stitch_directions: list[str] | None = None,
        stitch_dropout: float = 0.0,
        router_z_loss_coef: float = 0.0,
        alpha_mode: str = "fixed",
        load_floor: float | None = None,
        alpha_max: float = 1.0,
        experts_backend: str = "auto",
        shared_expert: str | None = None,
        shared_expert_gate: bool = False,
        balance: str = "loss",
        balance_bias_rate: float = 0.001,
        disabled_experts: list[str] | None = None,
        edits: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = _config_from_fields(text_config)
        elif text_config is None:
            text_config = AutoConfig.for_model("llama")
        self.text_config = text_config
        self.method = method
        self.expert_names = list(expert_names) if expert_names is not None else ["expert_0", "expert_1"]
        self.num_experts_per_tok = num_experts_per_tok
        self.router_layers = list(router_layers) if router_layers is not None else None
        self.router_layers_index = list(router_layers_index) if router_layers_index is not None else None
        self.alpha = alpha
        self.output_router_logits = output_router_logits
        # bts: each expert stream's own config (they may differ from the hub's in width and depth), and the hub
        # blocks after which a stitch sits.
        # Written as transformers writes config.json (the fields that differ from the class's defaults): a full
        # to_dict() puts generic fields into nested sub-configs that some releases refuse (DBRX's on 5.17).
        self.expert_configs = [_config_fields(c) if isinstance(c, PretrainedConfig) else dict(c)
                               for c in expert_configs or []]
        self.stitch_layers_index = list(stitch_layers_index) if stitch_layers_index is not None else None
        # bts: each stitch's direction (merge/broadcast), where it is not the default alternation back from the last
        # merge (`stitch.stitch_directions`): set by `convert-original` for the original MixtureKit's order.
        self.stitch_directions = list(stitch_directions) if stitch_directions is not None else None
        self.stitch_dropout = stitch_dropout
        # Router losses beside the Switch balance term: ST-MoE z-loss, and an automatic alpha (`alpha_mode: auto`)
        # that grows while any expert's share of slots is under `load_floor` (default half the uniform share).
        self.router_z_loss_coef = router_z_loss_coef
        self.alpha_mode = alpha_mode
        self.load_floor = load_floor
        self.alpha_max = alpha_max
        # How routing is balanced: `loss` (the Switch loss weighted by alpha, alone) or `bias` (loss-free balancing,
        # DeepSeek-V3: each router's `expert_bias` moves by `balance_bias_rate` a step towards equal load and is added
        # to the logits for the choice only; the Switch loss still applies where alpha > 0). A config written before
        # these fields reads as `loss`.
        self.balance = balance
        self.balance_bias_rate = balance_bias_rate
        # How stacked experts multiply: auto (grouped_mm where it applies, else the loop), loop, or grouped_mm.
        self.experts_backend = experts_backend
        # traditional/btx: "base" keeps the base's FFN (projection) always on beside the routed experts, weighted by a
        # sigmoid gate (`shared_expert_gate`) or by ½; the routed mix then weighs ½ (`runtime.routed.shared_expert`).
        self.shared_expert = shared_expert
        self.shared_expert_gate = bool(shared_expert_gate)
        # Experts opted out at inference (`MixtureKitForCausalLM.disable_experts`): routed as if removed.
        self.disabled_experts = list(disabled_experts or [])
        # What `moekit edit` did to this checkpoint since it was composed, oldest first (`editing`).
        self.edits = [dict(edit) for edit in edits or []]
        language = language_config(text_config)
        tie = getattr(text_config, "tie_word_embeddings", None)
        kwargs.setdefault("tie_word_embeddings", bool(getattr(language, "tie_word_embeddings", False) if tie is None
                                                      else tie))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # a wrapper's own are deprecated aliases of its text config's (Idefics 3 warns on reading them)
            kwargs.setdefault(key, getattr(language, key, None))
        super().__init__(**kwargs)

    def expert_config_objects(self) -> list[PretrainedConfig]:
        """The bts expert streams' configs as config objects."""
        return [_config_from_fields(data) for data in self.expert_configs]

    def to_diff_dict(self) -> dict[str, Any]:
        """What config.json holds: the base's config as its own save_pretrained writes it (transformers' nested diff
        keeps generic fields in sub-sub-configs, which DBRX's on 5.17 refuses when loaded)."""
        written = super().to_diff_dict()
        if "text_config" in written:
            written["text_config"] = _config_fields(self.text_config)
        return written

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The language model's config: `text_config`, or the one nested in it when the base is a multimodal wrapper
        (transformers' own lookup stops one level down, at the wrapper)."""
        found = super().get_text_config(decoder=decoder, encoder=encoder)
        if found is self.text_config:
            return language_config(found)
        return found

    @property
    def language_config(self) -> PretrainedConfig:
        """The config of the composed decoder: `text_config`, or its language model's in a multimodal wrapper."""
        return language_config(self.text_config)

    @property
    def is_multimodal(self) -> bool:
        """Whether the composition keeps a multimodal wrapper (vision tower and projector beside the decoder)."""
        return self.language_config is not self.text_config

    @property
    def vocab_size(self) -> int:
        return self.language_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.language_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        from ..base_model.architecture import num_layers

        return num_layers(self.text_config)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """As `PretrainedConfig.save_pretrained`; a config whose `auto_map` is ours also writes the two loader files
        it names (`loader_files`), so a re-saved checkpoint loads with `trust_remote_code=True` as a composed one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if names_loader_files(getattr(self, "auto_map", None)):
            write_loader_files(save_directory)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Not registered: transformers would then copy this module into every saved checkpoint and point its
        `auto_map` at it. The loader files import the installed package instead."""


def stored_model_type(folder: str | Path) -> str | None:
    """The `model_type` in a checkpoint folder's config.json (None without one): whether a folder is a composition
    (`MixtureKitConfig.model_type`), read without building a config."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def require_composed(checkpoint: str | Path, why: str = "", error: type[MixtureKitError] = SourceError) -> None:
    """Refuse, before any weight is read, a checkpoint that is not a composed one (a dense model, an unreadable
    folder or id); the message names the model_type found. `why` says what needed a composed one; `error` is the
    class raised for a readable config of another model (a missing or unreadable config is a `SourceError`).

    The one check of "is this a MixtureKit checkpoint", for the CLI, the views, `moekit.load` and `export`; here,
    at the bottom beside `stored_model_type`, so that every package can use it."""
    try:
        model_type = PretrainedConfig.get_config_dict(str(checkpoint))[0].get("model_type")
    except (OSError, ValueError) as failure:
        raise SourceError(f"cannot read a model config from '{checkpoint}': {failure}") from failure
    if model_type != MixtureKitConfig.model_type:
        found = f"a dense {model_type} checkpoint" if model_type else "a checkpoint without a model_type"
        raise error(f"'{checkpoint}' is {found}, not a composed one (not a MixtureKit checkpoint): "
                    f"{why + ', so ' if why else ''}give a folder written by `moekit compose` "
                    f"(model_type {MixtureKitConfig.model_type})")


def _config_fields(config: PretrainedConfig) -> dict[str, Any]:
    """`config` as the dict transformers rebuilds it from: its diff against its class's defaults, with its type."""
    return {"model_type": config.model_type, **config.to_diff_dict()}


def _config_from_fields(fields: dict[str, Any]) -> PretrainedConfig:
    """The config `_config_fields` wrote (or any config dict with its `model_type`), rebuilt by its own class."""
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
