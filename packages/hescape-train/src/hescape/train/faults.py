"""Fault injection for the crash tests: kill the process at a named point, as a power cut or ``kill -9`` would.

Set ``HESCAPE_TRAIN_FAULT`` to a comma-separated list of ``<point>:<n>`` items; when the running process reaches
``point`` for the ``n``-th time it stops there with SIGKILL — no ``finally`` block, no flush, no clean-up. With
``HESCAPE_TRAIN_FAULT_MARKER=<file>`` it instead creates that file and sleeps, so that another process can kill it
at that point (``kill -9 <pid>``). Points:

``step``
    after the optimiser step of a global step (``n`` = the step number, 1-based), before its logging.
``checkpoint_partial``
    inside the ``n``-th checkpoint write of the process: the weights are in the temporary directory, the side
    file is not.
``checkpoint_before_index``
    the ``n``-th checkpoint directory is complete and in place; ``index.json`` still names the previous one.
``checkpoint_after_index``
    ``index.json`` names the new checkpoint; the checkpoint it replaced is not yet deleted.
``results``
    after the test lines are appended to ``metrics.jsonl``, before the results files are written.
``feature_cache_write``
    inside the ``n``-th feature-cache write of the process (:mod:`hescape.train.feature_cache`): the temporary
    features file is filled and locked, not yet renamed into place.

Without the variable nothing happens (one dictionary lookup per call). Not for production use.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

__all__ = ["fault_point"]

_COUNTS: Counter = Counter()


def _plan() -> dict[str, set[int]]:
    spec = os.environ.get("HESCAPE_TRAIN_FAULT", "")
    plan: dict[str, set[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.partition(":")
        plan.setdefault(point, set()).add(int(n or 1))
    return plan


def fault_point(point: str, n: int | None = None) -> None:
    """Mark that the process reached ``point`` (its ``n``-th time, or the count of calls so far)."""
    if "HESCAPE_TRAIN_FAULT" not in os.environ:
        return
    if n is None:
        _COUNTS[point] += 1
        n = _COUNTS[point]
    if n not in _plan().get(point, ()):
        return
    marker = os.environ.get("HESCAPE_TRAIN_FAULT_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(f"{os.getpid()} {point}:{n}\n")
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)
