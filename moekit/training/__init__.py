"""Training: freeze policies, router/stitch training on transformers' Trainer and TRL, and what training adds to
the model's balance loss (data-parallel counts, the alpha controller, bias balancing, routing statistics).

The names load on first use: importing `moekit.training.freeze` (or this package) does not pull in TRL, PEFT
or `datasets`, which a GPU image may lack and a freeze policy does not need.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "AutoAlphaCallback": "auto_alpha",
    "BiasBalanceCallback": "bias_balance", "bias_update": "bias_balance",
    "RoutingStatsCallback": "callbacks", "find_composed_model": "composed",
    "ComposedDPOTrainer": "trl_adapter", "run_dpo": "dpo",
    "POLICIES": "freeze", "TrainableSummary": "freeze", "apply_freeze_policy": "freeze", "parameter_roles": "freeze",
    "apply_lora": "lora", "load_lora": "lora", "lora_config_for": "lora",
    "initialize_routers": "router_init",
    "train_routers": "routers",
    "ComposedSFTTrainer": "trl_adapter", "run_sft": "sft",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
