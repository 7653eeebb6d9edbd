"""Exceptions of hescape-train."""

from __future__ import annotations

__all__ = ["HescapeConfigError"]


class HescapeConfigError(ValueError):
    """A bad configuration: unknown key, wrong value type, inconsistent settings."""
