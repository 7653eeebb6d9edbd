"""Donor-level split checks: a donor never crosses splits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .errors import SplitLeakageError

__all__ = ["check_no_donor_leakage"]


def check_no_donor_leakage(samples: Iterable[dict]) -> None:
    """Raise :class:`SplitLeakageError` if any donor has samples in more than one split.

    ``samples`` are dicts with ``name``, ``donor`` and ``split`` (the manifest's sample table).
    """
    where: dict[str, set[str]] = defaultdict(set)
    names: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        where[s["donor"]].add(s["split"])
        names[s["donor"]].append(f"{s['name']}:{s['split']}")
    leaks = {d: sorted(v) for d, v in where.items() if len(v) > 1}
    if leaks:
        detail = "; ".join(f"{d} in {v} ({', '.join(names[d])})" for d, v in sorted(leaks.items()))
        msg = f"donor leakage: expected each donor in exactly one split, found {detail}; move all of a donor's samples to one split"
        raise SplitLeakageError(msg)
