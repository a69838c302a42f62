"""Finding the composed model inside whatever wraps it for training (PEFT, accelerate, DDP): one home for the
callbacks, controllers and adapters that all need it."""

from __future__ import annotations

from torch import nn

from ..errors import TrainingError
from ..runtime.assembly.modeling import MixtureKitForCausalLM


def find_composed_model(model: nn.Module | None) -> MixtureKitForCausalLM | None:
    """The `MixtureKitForCausalLM` inside `model` (itself, or wrapped), or None when there is none."""
    if isinstance(model, MixtureKitForCausalLM):
        return model
    return next((m for m in model.modules() if isinstance(m, MixtureKitForCausalLM)), None) if model else None


def composed_model(model: nn.Module) -> MixtureKitForCausalLM:
    """As `find_composed_model`, for callers that cannot go on without one: a `TrainingError` when there is none."""
    found = find_composed_model(model)
    if found is None:
        raise TrainingError(f"expected a composed MixtureKit model, got {type(model).__name__}")
    return found
