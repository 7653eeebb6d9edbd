"""Atomic output files of the ``hescape-eval`` commands: nothing half-written, nothing replaced unless asked.

Every file is written to a temporary file in the target's folder, flushed and ``fsync``-ed, given the permissions a
plain ``open(…, "w")`` would (``0o666 & ~umask``), then moved into place with ``os.replace`` (atomic on POSIX within
one file system). :func:`publish` moves a finished temporary file to its final name *without* replacing an existing
one (``os.link``, which fails when the name exists), so two commands racing for one output cannot silently
overwrite each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import HescapeEvalError
from .io import atomic_write

__all__ = ["atomic_write_text", "publish", "refuse_existing"]


def refuse_existing(paths: Iterable[str | os.PathLike], *, option: str = "--out") -> None:
    """Raise when any of ``paths`` exists (checked before any work, so a refused command costs nothing).

    Raises
    ------
    HescapeEvalError
        Naming the first existing path and the ``--overwrite`` fix.
    """
    for p in paths:
        p = Path(p)
        if p.exists() or p.is_symlink():
            raise HescapeEvalError.build(what=f"{option} {p}", expected="a path where no output exists yet",
                                         found="an existing " + ("directory" if p.is_dir() else "file"),
                                         fix=f"choose another {option}, or pass --overwrite to replace it")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; missing parent folders are created. Returns ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def publish(tmp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    """Move the finished file ``tmp`` to ``path`` (same folder); refuse an existing ``path`` unless ``overwrite``.

    Without ``overwrite`` the move is a hard link followed by removing ``tmp``: the link fails if ``path`` appeared
    since the command started, so an existing file is never replaced. On a file system without hard links the
    existence check is repeated and ``os.replace`` used. ``tmp`` is removed in every case.

    Raises
    ------
    HescapeEvalError
        ``path`` exists and ``overwrite`` is false.
    """
    tmp, path = Path(tmp), Path(path)
    try:
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError:
            refuse_existing([path], option=option)
            raise  # pragma: no cover - refuse_existing raised
        except OSError:  # no hard links on this file system (e.g. some network or FAT mounts)
            refuse_existing([path], option=option)
            os.replace(tmp, path)
        return path
    finally:
        tmp.unlink(missing_ok=True)
