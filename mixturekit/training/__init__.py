"""Training: freeze policies, router/stitch training on transformers' Trainer, routing statistics while training."""

from .callbacks import RoutingStatsCallback, find_composed_model
from .freeze import POLICIES, TrainableSummary, apply_freeze_policy, parameter_roles
from .routers import train_routers

__all__ = [
    "POLICIES", "RoutingStatsCallback", "TrainableSummary", "apply_freeze_policy", "find_composed_model",
    "parameter_roles", "train_routers",
]
