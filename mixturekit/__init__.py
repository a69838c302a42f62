"""MixtureKit: compose Mixture-of-Experts language models from dense Hugging Face checkpoints."""

from .errors import (
    CompatibilityError, MixtureKitError, OutputError, RecipeError, SourceError, TrainingError,
    UnsupportedArchitectureError,
)
from .recipe import ModelSource, Recipe, load_recipe
from .plan import CompositionPlan, build_plan, plan_summary
from .compose import compose
from .build_moe import build_moe
from .runtime import MixtureKitConfig, MixtureKitForCausalLM, load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "CompatibilityError", "CompositionPlan", "MixtureKitConfig", "MixtureKitError", "MixtureKitForCausalLM", "ModelSource",
    "OutputError", "Recipe", "RecipeError", "SourceError", "TrainingError", "UnsupportedArchitectureError",
    "build_moe", "build_plan", "compose", "load_balancing_loss", "load_recipe", "plan_summary",
]
