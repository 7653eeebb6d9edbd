"""Where a dataset may be written, and the hidden sibling directories of an atomic build.

A build writes into a hidden sibling ``.<out>.tmp-<pid>-<host>-<random>`` and renames it into place; a replace
moves the previous dataset aside to ``.<out>.old-…`` first and deletes it only after the new one is in place.
:func:`check_output_location` refuses, before any input is read, an output that would lose data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputLocationError, brief

__all__ = ["TEMP_KINDS", "MANIFEST", "fsync_path", "dir_mode", "file_mode", "safe_filename", "temp_sibling", "clean_stale_siblings",
           "check_output_location", "is_hescape_dataset",
           "foreign_files"]

MANIFEST = "manifest.json"

#: Kinds of hidden sibling directories a build makes next to its output ``<out>``, named
#: ``.<out name>.<kind>-<pid>-<host>-<random>``: ``tmp`` (the dataset being written), ``old`` (the previous
#: dataset moved aside during a replace), ``bundles`` (scratch inputs of the synthetic builder). A sibling whose
#: process is no longer alive on this host was left by a killed build and is removed by the next build of the
#: same ``<out>`` (:func:`clean_stale_siblings`); siblings of live processes or of other hosts (a shared file
#: system) are never touched.
TEMP_KINDS = ("tmp", "old", "bundles")


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` where there is one (no change of state), else by setting
    and restoring it (two system calls)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or directory so that its contents (or the renames in it) are durable; best effort: some
    file systems refuse it for directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dir_mode() -> int:
    """Mode of the directories a build creates: ``0o777`` minus the umask (as ``mkdir`` would make them)."""
    return 0o777 & ~_umask()


def file_mode() -> int:
    """Mode of the files a build creates: ``0o666`` minus the umask (as ``open`` would make them)."""
    return 0o666 & ~_umask()


def _host() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "host")[:64]
    return host or "host"


def safe_filename(name: str, default: str = "sample") -> str:
    """``name`` made safe as one file name: no path separators, no leading dot, at most 120 characters.

    Names come from inputs (``region_name`` of ``experiment.xenium``, the ``outs/`` folder name) and must never
    lead a path outside the dataset (``../x``, ``/etc/x``). Every character other than letters, digits,
    ``-``, ``_``, ``.`` and ``+`` becomes ``_``; leading dots and underscores are dropped.
    """
    s = re.sub(r"[^A-Za-z0-9._+-]", "_", str(name)).lstrip("._")[:120]
    return s or default


def temp_sibling(out: Path, kind: str) -> Path:
    """Create a hidden, empty sibling directory of ``out`` for ``kind`` (one of :data:`TEMP_KINDS`).

    Its name carries this process id and host, so a later build can tell a leftover of a killed build from the
    work of a live one; its mode follows the umask (``mkdtemp`` alone makes ``0700``).
    """
    if kind not in TEMP_KINDS:
        msg = f"temporary directory kind: expected one of {list(TEMP_KINDS)}, found {kind!r}"
        raise ValueError(msg)
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-{_host()}-", dir=out.parent))
    os.chmod(tmp, dir_mode())
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or cannot tell: leave it alone
    return True


def _siblings(out: Path) -> list[tuple[Path, str, int, str]]:
    """``(path, kind, pid, host)`` of the temporary siblings of ``out`` (see :data:`TEMP_KINDS`)."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(TEMP_KINDS)})-(\d+)-(.+)-[A-Za-z0-9_]+$")
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((p, m.group(1), int(m.group(2)), m.group(3)))
    return found


def _stale(out: Path) -> list[tuple[Path, str]]:
    """The temporary siblings of ``out`` left by dead processes of this host."""
    host = _host()
    return [(p, kind) for p, kind, pid, h in _siblings(out) if h == host and pid != os.getpid() and not _pid_alive(pid)]


def clean_stale_siblings(out: str | os.PathLike) -> list[Path]:
    """Remove what killed builds of ``out`` left next to it; returns the removed paths.

    A build killed between moving the previous dataset aside and moving the new one in leaves no ``out`` but a
    complete ``.old-*`` sibling: that previous dataset is moved back to ``out`` (the interrupted build never
    happened) instead of being deleted. Only siblings of processes that are dead on this host are touched.
    """
    out = Path(os.path.abspath(out))
    removed = []
    stale = _stale(out)
    if not os.path.lexists(out):
        for p, kind in stale:
            if kind == "old" and (p / MANIFEST).is_file():
                os.replace(p, out)
                stale = [(q, k) for q, k in stale if q != p]
                break
    for p, _ in stale:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _interrupted_hint(out: Path) -> str:
    """A sentence naming leftovers of an interrupted build next to ``out``, or ``""``."""
    sib = _siblings(Path(os.path.abspath(out)))
    old = [p for p, kind, _, _ in sib if kind == "old" and (p / MANIFEST).is_file()]
    if old:
        return (f"; an interrupted replace left the previous dataset at {old[0]}: rename it back to {out.name} "
                "(or rebuild; the next build of this path restores it)")
    if sib:
        return f"; {len(sib)} leftover(s) of an interrupted build lie next to it ({sib[0][0].name}): rebuild"
    return ""


def is_hescape_dataset(path: Path) -> bool:
    """True when ``path`` holds a ``manifest.json`` of a HESCAPE dataset (any schema version)."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and str(m.get("schema_version", "")).startswith("hescape-arrow/")


def foreign_files(path: Path, limit: int = 10) -> list[str]:
    """Up to ``limit`` entries of a dataset directory that a build did not write (relative paths).

    A dataset holds ``manifest.json``, ``shard-*.arrow`` and ``qc/*.png`` only; anything else (a user's notebook, a
    nested dataset) would be lost by a replace.
    """
    found: list[str] = []
    for p in sorted(path.iterdir()):
        if p.name == MANIFEST or (p.name.startswith("shard-") and p.suffix == ".arrow" and p.is_file()):
            continue
        if p.name == "qc" and p.is_dir() and not p.is_symlink():
            found += [f"qc/{q.name}" for q in sorted(p.iterdir()) if not (q.suffix == ".png" and q.is_file())]
        else:
            found.append(p.name)
        if len(found) >= limit:
            break
    return found[:limit]


def _within(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_output_location(out: str | os.PathLike, *, overwrite: bool = False,
                          inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output path that cannot be written, or whose replacement would lose data; returns it absolute.

    Checked before any input is read. Nothing is written here, except that leftovers of killed builds of the
    same ``out`` are cleaned first (:func:`clean_stale_siblings`: a previous dataset left aside by an
    interrupted replace is moved back, so it is never lost).

    * ``out`` must not be, contain or lie inside any of ``inputs`` (a build never deletes or writes into its
      own input);
    * an existing ``out`` is replaced only with ``overwrite`` and only when it is a directory holding a HESCAPE
      ``manifest.json``, or an empty directory (a project folder is never deleted); never a file or a symlink;
    * a new ``out`` must not lie under a file, and its first existing parent must be a writable directory.

    Raises
    ------
    FileExistsError
        ``out`` exists and ``overwrite`` is false.
    OutputLocationError
        Any other refusal (one line: expected, found, fix).
    """
    raw = Path(out)
    out = Path(os.path.abspath(raw))
    if out.name in ("", ".", ".."):
        msg = f"--out: expected a directory path ending in a name, found {str(raw)!r}; pass e.g. datasets/sample1"
        raise OutputLocationError(msg)
    real = out.resolve()
    if os.path.isdir(out.parent):
        clean_stale_siblings(out)
    for inp in inputs:
        if inp is None:
            continue
        r_in = Path(os.path.abspath(inp)).resolve()
        if _within(real, r_in) or _within(r_in, real):
            how = "is" if real == r_in else "lies inside" if _within(real, r_in) else "contains"
            msg = (f"--out {out}: expected an output location apart from the inputs, found that it {how} the input "
                   f"{r_in}; a build never writes into or replaces its own input: choose another --out")
            raise OutputLocationError(msg)
    if os.path.islink(out):
        msg = (f"--out {out}: expected a directory, found a symbolic link (to {os.readlink(out)}); pass the real "
               "path, or remove the link")
        raise OutputLocationError(msg)
    if out.exists():
        if not out.is_dir():
            msg = f"--out {out}: expected a dataset directory, found a file; choose another --out"
            raise OutputLocationError(msg)
        if not overwrite:
            msg = f"output directory {out} already exists; choose another path or pass --overwrite"
            raise FileExistsError(msg)
        try:
            empty = not any(out.iterdir())
        except OSError as e:
            msg = f"--out {out}: expected a readable directory to replace, found one that cannot be listed ({brief(e, 200)})"
            raise OutputLocationError(msg) from None
        if not empty and not is_hescape_dataset(out):
            msg = (f"--out {out} --overwrite: expected a HESCAPE dataset (a directory with a HESCAPE "
                   f"{MANIFEST}) or an empty directory, found a directory with other content; refusing to delete "
                   "it: choose another --out, or delete it yourself if you mean it")
            raise OutputLocationError(msg)
        foreign = [] if empty else foreign_files(out)
        if foreign:
            msg = (f"--out {out} --overwrite: expected only the dataset's own files ({MANIFEST}, shard-*.arrow, "
                   f"qc/*.png), found {len(foreign)} other(s) (e.g. {foreign[0]}); refusing to delete them: move them "
                   "out of the dataset, or choose another --out")
            raise OutputLocationError(msg)
    for anc in out.parents:
        if is_hescape_dataset(anc):
            msg = (f"--out {out}: expected a location outside any dataset, found it inside the dataset {anc} (a "
                   "later --overwrite of that dataset would delete it); choose another --out")
            raise OutputLocationError(msg)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        if os.path.lexists(parent):  # a dangling symlink
            break
        parent = parent.parent
    if not parent.is_dir():
        msg = f"--out {out}: expected a directory path, found that {parent} is a file, not a directory; choose another --out"
        raise OutputLocationError(msg)
    if not os.access(parent, os.W_OK | os.X_OK):
        msg = f"--out {out}: expected a writable parent directory, found {parent} not writable; choose another --out"
        raise OutputLocationError(msg)
    return out
