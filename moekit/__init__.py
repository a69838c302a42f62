"""MixtureKit: compose Mixture-of-Experts language models from dense Hugging Face checkpoints."""

from .errors import (
    CompatibilityError, MergeError, MixtureKitError, OutputError, RecipeError, SourceError, TrainingError,
    UnsupportedArchitectureError,
)
from .recipe import ModelSource, Recipe, load_recipe
from .plan import CompositionPlan, build_plan, plan_summary
from .compose import compose
from .export import ExportError, export  # eager: a lazy name would lose to the subpackage of the same name
from .build_moe import build_moe
from .runtime import MixtureKitConfig, MixtureKitForCausalLM, load_balancing_loss
from .training.balance_loss import training_auxiliary_loss as _training_auxiliary_loss

# Training wraps the model's balance loss (data-parallel counts, `num_items_in_batch`); the runtime imports no training.
MixtureKitForCausalLM.auxiliary_loss_wrapper = _training_auxiliary_loss

from .distribution import VERSION as __version__

# What the README teaches beyond composing, loaded on first use: `import moekit` stays as light as registering the
# model needs (training pulls in TRL, PEFT and datasets; the views matplotlib).
_LAZY = {
    "load": "loading", "load_processor": "loading",
    "evaluate": "evaluation",
    "merge_experts": "merging", "compare_to_merging": "comparison",
    "convert_gguf": "sources",
    "capture_routing": "analysis", "capture_routing_of_inputs": "analysis", "RoutingTrace": "analysis", "routing_by_label": "analysis",
    "utilisation": "analysis", "dead_experts": "analysis",
    "write_report": "views", "RoutingReport": "views",
    "push": "publishing", "benchmark": "benchmarking",
    "remove_experts": "editing", "add_expert": "editing", "prune_experts": "editing",
    "fit_routers_from_data": "editing", "EditError": "editing",
    "apply_freeze_policy": "training", "train_routers": "training", "initialize_routers": "training",
    "RoutingStatsCallback": "training", "AutoAlphaCallback": "training", "BiasBalanceCallback": "training",
    "run_sft": "training", "run_dpo": "training",
    "ComposedSFTTrainer": "training", "ComposedDPOTrainer": "training", "lora_config_for": "training",
}

__all__ = sorted([
    "CompatibilityError", "CompositionPlan", "MergeError", "MixtureKitConfig", "MixtureKitError", "MixtureKitForCausalLM",
    "ModelSource", "OutputError", "Recipe", "RecipeError", "SourceError", "TrainingError",
    "UnsupportedArchitectureError",
    "ExportError", "build_moe", "build_plan", "compose", "export", "load_balancing_loss", "load_recipe", "plan_summary",
    *_LAZY,
])


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
