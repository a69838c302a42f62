"""The exceptions MixtureKit raises: each names what is wrong and what would be valid."""

from __future__ import annotations

import difflib


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


class MergeError(MixtureKitError, ValueError):
    """A merge's settings are invalid: its method, base, density, weights or dtype, or fewer than two experts."""


class OutputError(MixtureKitError, OSError):
    """The output folder exists or cannot be written."""


class CheckpointError(MixtureKitError, ValueError):
    """A composed checkpoint is inconsistent with its own config."""


class TrainingError(MixtureKitError, RuntimeError):
    """A training setup would silently train the wrong thing (e.g. a loss without gradient)."""


class RoutingNumericsError(MixtureKitError, FloatingPointError):
    """A router saw non-finite hidden states (raised only with debug checks on, instead of routing silently)."""


def did_you_mean(word: str, choices: list[str]) -> str:
    """The valid choice `word` most likely meant, as a message suffix: the one it abbreviates, else the closest
    spelling; empty when none is close."""
    close = [c for c in choices if len(word) >= 3 and c.startswith(word)][:1]
    close = close or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
