"""Exceptions and warnings of hescape-eval. Every message says what was expected, what was found and the fix."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["HescapeEvalError", "HescapeEvalWarning", "plain_list"]

# NumPy >= 2 scalar reprs (``np.str_('donor_02')``, ``np.int64(3)``), as they appear when a list of array elements is
# formatted into a message; :meth:`HescapeEvalError.build` prints their value instead
_NUMPY_SCALAR = re.compile(r"np\.(?:str_|bytes_|bool_?|u?int(?:8|16|32|64)?|float(?:16|32|64)|intp)\(('[^']*'|\"[^\"]*\"|[^()]*)\)")


def plain_list(items: Iterable, limit: int | None = None) -> str:
    """``items`` as plain text for a message, ``"a, b, c"`` (NumPy scalars as their value; at most ``limit`` shown,
    then ``", ..."``)."""
    values = [x.item() if hasattr(x, "item") and not isinstance(x, str) else x for x in items]
    shown = values if limit is None else values[:limit]
    text = ", ".join(str(x) for x in shown)
    return text + (", ..." if limit is not None and len(values) > limit else "")


class HescapeEvalError(ValueError):
    """Invalid input to a metric: the message says what was expected, what was found and the fix."""

    @classmethod
    def build(cls, what: str, *, expected: str, found: str, fix: str) -> HescapeEvalError:
        """Message in the package's fixed shape: ``<what>: expected <…>, found <…>; fix: <…>``."""
        text = f"{what}: expected {expected}, found {found}; fix: {fix}"
        return cls(_NUMPY_SCALAR.sub(lambda m: m.group(1), text))


class HescapeEvalWarning(RuntimeWarning):
    """A metric ran on a slower path than asked for (e.g. the compiled kernel is missing)."""
