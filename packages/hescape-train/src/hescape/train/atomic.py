"""Crash-safe file writes: whole files replaced atomically, logs appended one complete line at a time.

A whole file is written to a temporary file in the same directory, flushed and ``fsync``-ed, then moved over the
target with :func:`os.replace` (atomic on POSIX within one file system), and the directory is ``fsync``-ed so the
rename itself survives a power cut. A reader, or a run killed at any instant, sees the old file or the new one,
never a mix. The temporary file is removed when the write fails; one left by a killed process is named
``.<target>.<random>.tmp`` and ignored by every reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hescape.data.outputs import file_mode, fsync_path

__all__ = ["fsync_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "AppendLog"]


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so that renames and new entries in it are durable (no-op where unsupported)."""
    fsync_path(path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp_path)`` fills a temporary file beside it, which is then
    fsync-ed and renamed over ``path``. Returns ``path``. Parent directories must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module docstring)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """Replace ``path`` with ``obj`` as JSON (strict: NaN/inf written as null) atomically."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=indent) + "\n")


def _finite(obj):
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class AppendLog:
    """An append-only text file written one complete line per ``write`` call (``O_APPEND``, one ``os.write``).

    A process killed between two calls leaves whole lines; a power cut may leave a partial last line, which
    :meth:`truncate` removes on resume (the checkpoint records :meth:`size` after :meth:`sync`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)

    def write_line(self, line: str) -> None:
        """Append ``line`` plus a newline (the line must not contain one)."""
        if "\n" in line:
            msg = f"a log line must not contain a newline: {line[:80]!r}"
            raise ValueError(msg)
        data = (line + "\n").encode("utf-8")
        while data:
            n = os.write(self._fd, data)
            data = data[n:]

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def sync(self) -> None:
        os.fsync(self._fd)

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes (the length recorded with a checkpoint)."""
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
