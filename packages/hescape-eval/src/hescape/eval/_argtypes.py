"""Range-checked ``type=`` converters for the numeric options of ``hescape-eval`` (shared by every subcommand).

argparse calls these while it parses the command line, so a value out of range is refused before anything is read
or written: one line, ``hescape-eval: error: argument --seed: expected …, found …; fix: …``, exit status 2
(:class:`hescape.eval.cli._Parser`). Integers are parsed with ``int``; numbers with ``float`` and must be finite
(``nan`` and ``inf`` are refused).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["SEED_MAX", "fraction", "int_range", "number", "seed"]

#: Largest seed accepted: scikit-learn's ``random_state`` (and NumPy's legacy ``RandomState``) take integers in
#: ``[0, 2**32 - 1]``; every seed of hescape-eval reaches one of them (PCA, ridge, fold assignment).
SEED_MAX = 2**32 - 1


def _refuse(expected: str, text: str, fix: str):
    return argparse.ArgumentTypeError(f"expected {expected}, found {text!r}; fix: {fix}")


def int_range(lo: int, hi: int | None = None, *, example: str | None = None):
    """A converter accepting integers ``lo <= v <= hi`` (``hi=None``: no upper bound)."""
    expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    fix = f"pass e.g. {example if example is not None else max(lo, 1)}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _refuse(expected, text, fix) from None
        if value < lo or (hi is not None and value > hi):
            raise _refuse(expected, text, fix)
        return value

    parse.__name__ = "integer"
    return parse


def number(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False, example: str = "1"):
    """A converter accepting finite floats in the range ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    parts = []
    if lo is not None:
        parts.append(f"> {lo:g}" if lo_open else f">= {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    fix = f"pass e.g. {example}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _refuse(expected, text, fix) from None
        bad = (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and value > hi))
        if bad:
            raise _refuse(expected, text, fix)
        return value

    parse.__name__ = "number"
    return parse


def fraction(example: str = "0.5"):
    """A converter accepting a finite number in ``[0, 1]``."""
    return number(lo=0.0, hi=1.0, example=example)


def seed(text: str) -> int:
    """A seed: an integer in ``[0, SEED_MAX]``."""
    return int_range(0, SEED_MAX, example="0")(text)
