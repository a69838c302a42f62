"""Composer: execute a plan by streaming tensors into an atomically written checkpoint."""

from .composer import average_in_blocks, compose, materialize_parts

__all__ = ["average_in_blocks", "compose", "materialize_parts"]
