"""Exceptions of hescape-eval."""

from __future__ import annotations

__all__ = ["HescapeEvalError"]


class HescapeEvalError(ValueError):
    """Invalid input to a metric: the message says what was expected, what was found and the fix."""
