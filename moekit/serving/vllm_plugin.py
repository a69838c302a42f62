"""vLLM plugin (entry point `vllm.general_plugins`): composed checkpoints load in vLLM where `moekit` is installed.

vLLM runs `register` in each of its processes before reading a model config. It registers the composed model with
transformers (`import moekit`), gives vLLM the flat view of its config (`ServingConfig`), and names the
architecture `MixtureKitForCausalLM` as vLLM's Transformers backend with its fused MoE layer, which then builds the
composed backbone (`MixtureKitModel`) from transformers' own classes around the routed modules. No
`trust_remote_code` is needed.
"""

from __future__ import annotations

from ..runtime import MixtureKitConfig, MixtureKitModel

from ..errors import UnsupportedArchitectureError

ARCHITECTURE = "MixtureKitForCausalLM"
# What vLLM is proven to run as transformers does (tests/test_vllm.py: greedy tokens equal, log-probabilities within
# 1e-4): traditional through vLLM's fused MoE layer, btx with its routed Linears run as they are. bts cannot run there
# at all (`runtime.assembly.backbone`).
SERVED_METHODS = ("traditional", "btx")


# vLLM's fused MoE kernel applies a gated SiLU (silu(gate) * up) whatever the model's own activation.
FUSED_ACTIVATIONS = ("silu", "swish")


def refuse_in_vllm(config: MixtureKitConfig) -> None:
    """Raise, before any weight is read, for a composition vLLM does not serve, saying what to do instead."""
    instead = ("serve it with transformers (AutoModelForCausalLM after `import moekit`)")
    disabled = list(getattr(config, "disabled_experts", None) or [])
    if disabled:
        raise UnsupportedArchitectureError(
            f"experts {disabled} are opted out (config disabled_experts), which vLLM's MoE does not read: write a "
            f"checkpoint without them (moekit edit CHECKPOINT --remove {disabled[0]} -o OUT, the same function) and "
            f"serve that, or {instead}")
    if config.is_multimodal:
        raise UnsupportedArchitectureError(
            f"an image-text composition ('{config.text_config.model_type}') is not served by vLLM here: only text "
            f"decoders were proven against transformers; {instead}")
    language = config.language_config
    activation = getattr(language, "hidden_act", None) or getattr(language, "hidden_activation", None)
    if config.method == "traditional" and activation not in FUSED_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"a traditional composition of '{language.model_type}' (FFN activation {activation!r}) is not served by "
            f"vLLM here: its fused MoE kernel applies SiLU ({', '.join(FUSED_ACTIVATIONS)} only), so the experts "
            f"would compute another function; {instead}")
    if config.method == "bts":
        raise UnsupportedArchitectureError(
            "a bts composition is not served by vLLM: its expert streams are whole decoders beside the hub, with "
            "attention layers of their own, which vLLM (one decoder, one KV cache) cannot hold; nor can it be "
            "exported to a native MoE that vLLM serves (a hub with stitched streams has no native equivalent); "
            "serve it with transformers (AutoModelForCausalLM after `import moekit`), or compose with method: "
            "traditional, which serves in vLLM and exports to native MoE checkpoints (moekit export)")
    if config.method not in SERVED_METHODS:
        raise UnsupportedArchitectureError(
            f"a {config.method} composition is not served by vLLM here (only {', '.join(SERVED_METHODS)}); "
            f"{instead}")
# vLLM's Transformers backend with fused experts: traditional's stacked experts follow transformers' experts
# convention and run in vLLM's fused MoE kernel; btx's routed Linears run as they are.
VLLM_CLASS = "vllm.model_executor.models.transformers:TransformersMoEForCausalLM"


class ServingConfig(MixtureKitConfig):
    """The composed config as vLLM reads it: flat.

    vLLM reads the decoder's shape (heads, layers, experts) from `get_text_config()`, and takes a config whose text
    config is another object for a multimodal model (it then looks for an image processor). This view answers
    `get_text_config()` with itself and reads what it lacks from `text_config`, so vLLM sees the base architecture's
    fields with the composition's `num_experts` and `num_experts_per_tok`. Only vLLM's processes use it."""

    def __init__(self, **kwargs):  # transformers would otherwise give a subclass a generated __init__
        super().__init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> ServingConfig:
        return self

    def __getattr__(self, name: str):
        text_config = self.__dict__.get("text_config")
        if text_config is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(text_config, name)


class ServedModel(MixtureKitModel):
    """The composed backbone, built from the flat view (transformers maps a config class to one model class)."""

    config_class = ServingConfig

    def __init__(self, config: ServingConfig):
        refuse_in_vllm(config)
        super().__init__(config)


def register() -> None:
    from transformers import AutoModel
    from vllm import ModelRegistry
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    _CONFIG_REGISTRY[MixtureKitConfig.model_type] = ServingConfig
    AutoModel.register(ServingConfig, ServedModel, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, VLLM_CLASS)
