"""Exceptions of hescape-data. Every message says what was expected, what was found and how to fix it."""

from __future__ import annotations

__all__ = [
    "HescapeDataError", "DatasetFormatError", "PanelMismatchError", "SplitLeakageError", "InputFormatError",
    "AlignmentError", "OutputLocationError",
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


class OutputLocationError(HescapeDataError):
    """An output path that may not be written or replaced (an input, a non-dataset folder, under a file, ...)."""
