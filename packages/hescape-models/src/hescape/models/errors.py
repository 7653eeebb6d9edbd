"""Exceptions of hescape-models."""

from __future__ import annotations

__all__ = ["HescapeModelError"]


class HescapeModelError(ValueError):
    """Invalid model configuration or input: the message says what was expected, found, and the fix."""
