"""Composer: execute a plan by streaming tensors into an atomically written checkpoint."""

from .composer import compose, materialize_parts

__all__ = ["compose", "materialize_parts"]
