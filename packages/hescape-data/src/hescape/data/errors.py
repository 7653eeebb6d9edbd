"""Exceptions of hescape-data. Every message says what was expected, what was found and how to fix it."""

from __future__ import annotations

__all__ = [
    "HescapeDataError", "DatasetFormatError", "PanelMismatchError", "SplitLeakageError", "InputFormatError",
    "AlignmentError", "RegistrationError", "OutputLocationError", "brief",
]


class HescapeDataError(ValueError):
    """Base class of hescape-data errors (bad input, not a bug)."""


class DatasetFormatError(HescapeDataError):
    """A dataset directory or shard is missing, truncated, corrupt or of an unknown schema."""


class PanelMismatchError(HescapeDataError):
    """A dataset's gene panel differs from the one asked for."""


class SplitLeakageError(HescapeDataError):
    """A donor appears in more than one split."""


class InputFormatError(HescapeDataError):
    """A raw input (Xenium bundle, Space Ranger output, image) is missing, malformed or inconsistent."""


class AlignmentError(InputFormatError):
    """An image alignment matrix is unreadable, singular or not affine."""


class RegistrationError(AlignmentError):
    """The spots do not lie on the tissue of their image (a wrong scale factor, swapped axes, a mirrored image)."""


class OutputLocationError(HescapeDataError):
    """An output path that may not be written or replaced (an input, a non-dataset folder, under a file, ...)."""


def brief(e: BaseException | str, limit: int = 100) -> str:
    """The text of another library's exception made fit to quote inside a one-line error message.

    Library messages may span several lines (pyarrow prints whole schemas) or run long; every run of whitespace,
    line breaks included, becomes one space and the text is cut to ``limit`` characters (``…`` marks a cut).
    """
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"
