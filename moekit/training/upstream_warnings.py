"""Warnings that PEFT's and TRL's own code raises on our calls into them, which are theirs to fix.

transformers 5.24 renamed `gradient_checkpointing_enable` and `is_gradient_checkpointing` to
`activation_checkpointing_*`; PEFT 0.21 and TRL 1.16 still call the old names, which warns (FutureWarning) on every
LoRA model and trainer. Exactly those messages are silenced around our calls into PEFT and TRL; anything else warns.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def upstream_checkpointing_renames_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated", category=FutureWarning
        )
        yield
