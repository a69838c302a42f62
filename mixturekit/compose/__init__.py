"""Composer: execute a plan by streaming tensors into an atomically written checkpoint."""

from .composer import assign_shards, compose, materialize_parts

__all__ = ["assign_shards", "compose", "materialize_parts"]
