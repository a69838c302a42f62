"""Activation checkpointing settings for `transformers` training arguments, under the name the installed release uses.

transformers renamed `gradient_checkpointing` (now deprecated) to `activation_checkpointing` after 5.17. Checkpointing
is always non-reentrant here: reentrant checkpointing runs blocks without autograd and drops the load-balancing
loss's gradient.
"""

from __future__ import annotations

from typing import Any

import transformers

CHECKPOINTING_ARGUMENT = ("activation_checkpointing" if "activation_checkpointing" in
                          transformers.TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")


def checkpointing_arguments(enabled: bool, **kwargs: Any) -> dict[str, Any]:
    """`TrainingArguments` keywords that turn (non-reentrant) activation checkpointing on or off."""
    return {CHECKPOINTING_ARGUMENT: enabled, f"{CHECKPOINTING_ARGUMENT}_kwargs": {"use_reentrant": False, **kwargs}}
