"""Runtime: the composed model as transformers runs it (assembly on the base model, routed modules, compute
backends, BTS streams), registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .assembly.backbone import MixtureKitModel
from .assembly.config import MixtureKitConfig
from .assembly.conversion import convert_dense_to_moe
from .assembly.modeling import MixtureKitForCausalLM
from .routed.moe_block import SparseMoeBlock
from .routed.routed_linear import RoutedLinear
from .routed.balance import load_balancing_loss
from .routed.routing import Router, route, set_debug_checks

AutoConfig.register(MixtureKitConfig.model_type, MixtureKitConfig, exist_ok=True)
AutoModelForCausalLM.register(MixtureKitConfig, MixtureKitForCausalLM, exist_ok=True)
# A composition of image-text models takes `pixel_values` (its base wrapper's forward runs): one class for both.
AutoModelForImageTextToText.register(MixtureKitConfig, MixtureKitForCausalLM, exist_ok=True)
# The decoder without its LM head: what vLLM's Transformers backend builds (`runtime.assembly.backbone`).
AutoModel.register(MixtureKitConfig, MixtureKitModel, exist_ok=True)

__all__ = [
    "MixtureKitConfig", "MixtureKitForCausalLM", "MixtureKitModel", "Router", "RoutedLinear", "SparseMoeBlock",
    "convert_dense_to_moe", "load_balancing_loss", "route", "set_debug_checks",
]
