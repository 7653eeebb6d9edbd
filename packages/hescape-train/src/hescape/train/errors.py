"""Exceptions of hescape-train. Each message is one line: what was expected, what was found, and the fix."""

from __future__ import annotations

__all__ = ["HescapeConfigError", "TrainingDivergedError"]


class HescapeConfigError(ValueError):
    """A bad configuration: unknown key, wrong value type, inconsistent settings, a run directory in the way."""


class TrainingDivergedError(HescapeConfigError):
    """The loss or the gradient norm became NaN/inf; the run stopped before the optimiser step that would have
    written non-finite weights, and its last checkpoint (all weights finite) is kept."""
