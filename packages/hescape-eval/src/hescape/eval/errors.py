"""Exceptions and warnings of hescape-eval. Every message says what was expected, what was found and the fix."""

from __future__ import annotations

__all__ = ["HescapeEvalError", "HescapeEvalWarning"]


class HescapeEvalError(ValueError):
    """Invalid input to a metric: the message says what was expected, what was found and the fix."""

    @classmethod
    def build(cls, what: str, *, expected: str, found: str, fix: str) -> HescapeEvalError:
        """Message in the package's fixed shape: ``<what>: expected <…>, found <…>; fix: <…>``."""
        return cls(f"{what}: expected {expected}, found {found}; fix: {fix}")


class HescapeEvalWarning(RuntimeWarning):
    """A metric ran on a slower path than asked for (e.g. the compiled kernel is missing)."""
