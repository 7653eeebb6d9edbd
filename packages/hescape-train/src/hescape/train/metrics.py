"""Metrics written twice, as JSON Lines and as CSV, one complete line per record.

A :class:`MetricsLog` named ``steps`` writes ``steps.jsonl`` and ``steps.csv`` in the run directory. The CSV's
columns are fixed by the first record (its header line); later records fill the same columns (a missing value is
empty). :meth:`MetricsLog.sizes` gives the byte length of both files, which a checkpoint records after
:meth:`MetricsLog.sync`; :meth:`MetricsLog.truncate` cuts both back to those lengths when a run resumes, so the
files hold exactly the records of the steps before the checkpoint, whatever a killed process left after them.
"""

from __future__ import annotations

import csv as csvlib
import io
import json
import math
import os
from pathlib import Path

from .atomic import AppendLog
from .errors import HescapeConfigError

__all__ = ["MetricsLog"]


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


class MetricsLog:
    """``<name>.jsonl`` and ``<name>.csv`` in ``run_dir``, appended one record at a time."""

    def __init__(self, run_dir: str | os.PathLike, name: str):
        self.run_dir = Path(run_dir)
        self.name = name
        self._jsonl = AppendLog(self.run_dir / f"{name}.jsonl")
        self._csv = AppendLog(self.run_dir / f"{name}.csv")
        self._fields: list[str] | None = None
        self._read_header()

    def _read_header(self) -> None:
        self._fields = None
        if self._csv.size() > 0:
            with open(self._csv.path, newline="") as f:
                first = f.readline()
            if first.endswith("\n"):
                self._fields = next(csvlib.reader([first]))

    def write(self, record: dict, *, csv: bool = True) -> None:
        """Append ``record`` (a flat dict of numbers and strings) to both files (``csv=False``: JSON Lines only,
        for a record of another kind than the CSV's rows)."""
        self._jsonl.write_line(json.dumps({k: _json_value(v) for k, v in record.items()}))
        if not csv:
            return
        if self._fields is None:
            self._fields = list(record)
            self._csv.write_line(self._csv_line(self._fields))
        self._csv.write_line(self._csv_line(["" if record.get(k) is None else record[k] for k in self._fields]))

    @staticmethod
    def _csv_line(values: list) -> str:
        buf = io.StringIO()
        csvlib.writer(buf, lineterminator="").writerow(values)
        return buf.getvalue()

    def sync(self) -> None:
        self._jsonl.sync()
        self._csv.sync()

    def sizes(self) -> dict[str, int]:
        """Byte lengths ``{"<name>.jsonl": n, "<name>.csv": m}`` (call :meth:`sync` first)."""
        return {self._jsonl.path.name: self._jsonl.size(), self._csv.path.name: self._csv.size()}

    def truncate(self, sizes: dict[str, int]) -> None:
        """Cut both files to the lengths a checkpoint recorded (0 when it recorded none).

        Raises
        ------
        HescapeConfigError
            A file shorter than recorded: it lost records the checkpoint relies on.
        """
        for log in (self._jsonl, self._csv):
            want = int(sizes.get(log.path.name, 0))
            have = log.size()
            if have < want:
                msg = (f"{log.path} has {have} bytes but the checkpoint recorded {want}: records were lost after it "
                       "was written; restore the file or start a new run")
                raise HescapeConfigError(msg)
            log.truncate(want)
        self._read_header()

    def close(self) -> None:
        self._jsonl.close()
        self._csv.close()
