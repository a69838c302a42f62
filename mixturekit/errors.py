"""The exceptions MixtureKit raises: each names what is wrong and what would be valid."""

from __future__ import annotations


class MixtureKitError(Exception):
    """Base class: every error MixtureKit raises on bad input derives from it."""


class RecipeError(MixtureKitError, ValueError):
    """A recipe field is missing, of the wrong type or out of range."""


class SourceError(MixtureKitError, ValueError):
    """A source model cannot be found or read."""


class CompatibilityError(MixtureKitError, ValueError):
    """The experts cannot be composed together (architecture, shapes, vocabulary, tokenizer)."""


class UnsupportedArchitectureError(CompatibilityError):
    """The architecture has no layout MixtureKit knows how to route."""


class OutputError(MixtureKitError, OSError):
    """The output folder exists or cannot be written."""


class CheckpointError(MixtureKitError, ValueError):
    """A composed checkpoint is inconsistent with its own config."""


class TrainingError(MixtureKitError, RuntimeError):
    """A training setup would silently train the wrong thing (e.g. a loss without gradient)."""


class RoutingNumericsError(MixtureKitError, FloatingPointError):
    """A router saw non-finite hidden states (raised only with debug checks on, instead of routing silently)."""
