"""Training: freeze policies, router/stitch training on transformers' Trainer, routing statistics while training."""

from .callbacks import RoutingStatsCallback, find_composed_model
from .dpo import ComposedDPOTrainer, run_dpo
from .freeze import POLICIES, TrainableSummary, apply_freeze_policy, parameter_roles
from .lora import apply_lora, load_lora, lora_config_for
from .router_init import initialize_routers
from .routers import train_routers
from .sft import ComposedSFTTrainer, run_sft

__all__ = [
    "POLICIES", "ComposedDPOTrainer", "ComposedSFTTrainer", "RoutingStatsCallback", "TrainableSummary",
    "apply_freeze_policy", "apply_lora", "find_composed_model", "initialize_routers", "load_lora",
    "lora_config_for", "parameter_roles", "run_dpo", "run_sft", "train_routers",
]
