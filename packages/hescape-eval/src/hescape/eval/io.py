"""Saved test embeddings of a run: the file ``RUN_DIR/embeddings/test.npz`` that ``hescape-eval retrieval`` reads.

File format (``hescape-embeddings/1``)
---------------------------------------
An uncompressed NumPy ``.npz`` (no pickled objects; loaded with ``allow_pickle=False``) holding:

``image``, ``gene``
    ``(N, d)`` float32, row ``i`` of each is spot ``i``; L2-normalised (every row's norm within ``1e-3`` of 1),
    as ``hescape.models.HescapeCLIP.encode_image`` / ``encode_gene`` return them.
``index``
    ``(N,)`` row of each spot in the split's dataset (int64), or string spot ids.
``sample``, ``donor``
    ``(N,)`` unicode strings: the sample and donor of each spot (for ``--by sample`` / ``--by donor``).
``spot_id`` (optional)
    ``(N,)`` unicode strings: each spot's identity within its sample (``PairedSpotDataset.spot_ids``: a Visium
    barcode, a pseudo-spot's lattice id), so ``(sample, spot_id)`` joins a row back to the source object. Files
    without it load with ``spot_id`` None.
``format``
    0-d unicode string ``"hescape-embeddings/1"``.

Rows are stored in dataset order (the order a ``shuffle=False`` loader yields them), which the ``batch:B``
protocol of :mod:`hescape.eval.protocol` relies on. Writes are atomic: a temporary file in the same folder,
``fsync``, then ``os.replace``; a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError

__all__ = ["EMBEDDINGS_FORMAT", "Embeddings", "embeddings_path", "load_embeddings", "save_embeddings"]

#: Value of the ``format`` entry of files written by :func:`save_embeddings`.
EMBEDDINGS_FORMAT = "hescape-embeddings/1"
_NORM_TOL = 1e-3


@dataclass(frozen=True)
class Embeddings:
    """Contents of an embeddings file (see the module docstring for shapes and dtypes)."""

    image: np.ndarray
    gene: np.ndarray
    index: np.ndarray
    sample: np.ndarray
    donor: np.ndarray
    path: Path | None = None
    spot_id: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def labels(self, key: str) -> np.ndarray:
        """The ``sample`` or ``donor`` label of every row."""
        if key not in ("sample", "donor"):
            raise HescapeEvalError.build(what="grouping", expected="'sample' or 'donor'", found=repr(key),
                                         fix="use --by sample or --by donor")
        return self.sample if key == "sample" else self.donor


def embeddings_path(run_dir: str | os.PathLike, split: str = "test") -> Path:
    """``RUN_DIR/embeddings/<split>.npz``: where a run keeps the embeddings of a split."""
    return Path(run_dir) / "embeddings" / f"{split}.npz"


def _to_numpy(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # bfloat16 has no NumPy dtype
    return np.asarray(x)


def _check_matrix(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or x.dtype.kind != "f":
        raise HescapeEvalError.build(what=what, expected="a non-empty (N, d) float matrix",
                                     found=f"shape {x.shape}, dtype {x.dtype}", fix="pass one embedding row per spot")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise HescapeEvalError.build(what=what, expected="finite values", found="NaN or inf",
                                     fix="check the encoder outputs before saving them")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    worst = int(np.argmax(np.abs(norms - 1.0)))
    if abs(norms[worst] - 1.0) > _NORM_TOL:
        raise HescapeEvalError.build(what=what, expected=f"L2-normalised rows (norm within {_NORM_TOL:g} of 1)",
                                     found=f"row {worst} with norm {norms[worst]:.6g}",
                                     fix="save the unit vectors of encode_image/encode_gene "
                                         "(torch.nn.functional.normalize(x, dim=-1))")
    return x


def _check_labels(x: np.ndarray, what: str, n: int, allow_int: bool) -> np.ndarray:
    if x.ndim != 1 or x.shape[0] != n:
        raise HescapeEvalError.build(what=what, expected=f"one entry per row, shape ({n},)", found=f"shape {x.shape}",
                                     fix="pass the metadata of the same spots, in the same order")
    if allow_int and x.dtype.kind in "iu":
        return x.astype(np.int64)
    if x.dtype.kind in "US" or (x.dtype.kind == "O" and all(isinstance(v, str | bytes) for v in x.tolist())):
        return x.astype(str)
    kinds = "integers or strings" if allow_int else "strings"
    raise HescapeEvalError.build(what=what, expected=kinds, found=f"dtype {x.dtype}",
                                 fix=f"pass {what} as a list or array of {kinds}")


def _validate(image, gene, index, sample, donor, spot_id=None) -> dict[str, np.ndarray]:
    img = _check_matrix(_to_numpy(image, "image"), "image embeddings")
    gen = _check_matrix(_to_numpy(gene, "gene"), "gene embeddings")
    if img.shape != gen.shape:
        raise HescapeEvalError.build(what="image and gene embeddings", expected="the same shape (N, d)",
                                     found=f"{img.shape} and {gen.shape}",
                                     fix="embed the same spots with both towers (paired rows)")
    n = img.shape[0]
    return {"image": img, "gene": gen,
            "index": _check_labels(_to_numpy(index, "index"), "index", n, allow_int=True),
            "sample": _check_labels(_to_numpy(sample, "sample"), "sample", n, allow_int=False),
            "donor": _check_labels(_to_numpy(donor, "donor"), "donor", n, allow_int=False),
            **({} if spot_id is None else
               {"spot_id": _check_labels(_to_numpy(spot_id, "spot_id"), "spot_id", n, allow_int=False)})}


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def save_embeddings(path: str | os.PathLike, *, image, gene, index, sample, donor, spot_id=None) -> Path:
    """Write a run's embeddings atomically (format in the module docstring); returns the path written.

    Parameters
    ----------
    path
        Target file, usually :func:`embeddings_path` ``(run_dir)``; missing parent folders are created.
    image, gene
        ``(N, d)`` L2-normalised embeddings (tensors or arrays, any float dtype; stored as float32).
    index
        ``(N,)`` dataset rows (ints) or spot ids (strings).
    sample, donor
        ``(N,)`` strings.
    spot_id
        Optional ``(N,)`` strings: each spot's id within its sample (``PairedSpotDataset.spot_ids``).

    Raises
    ------
    HescapeEvalError
        Shapes that differ, NaN/inf, rows that are not unit vectors, labels of the wrong length or type.
    """
    arrays = _validate(image, gene, index, sample, donor, spot_id)
    return atomic_write(path, lambda fh: np.savez(fh, format=np.array(EMBEDDINGS_FORMAT), **arrays))


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Create ``path`` atomically: ``write(fh)`` fills a temporary binary file in the same folder (missing parents
    are created), which is flushed, fsynced, given ``0o666 & ~umask`` and renamed onto ``path``; on any error the
    temporary file is removed and ``path`` is untouched. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_npz(path: str | os.PathLike, *, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive ``path`` (``allow_pickle=False``), read in full.

    A damaged file fails here with one :class:`HescapeEvalError` instead of whatever NumPy or :mod:`zipfile` raise
    (``BadZipFile`` for a truncated archive, ``EOFError`` for an empty file, ``zlib.error`` or a CRC ``BadZipFile``
    for a corrupt member, a bare array for an ``.npy`` file renamed ``.npz``, ``ValueError`` for pickled objects).

    Raises
    ------
    HescapeEvalError
        ``<what>: expected an .npz archive of arrays, found unreadable (<cause>); fix: <fix>``.
    """
    try:
        with open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                msg = f"a single {type(z).__name__} (an .npy file, not an .npz archive)"
                raise _NotNpz(msg)
            with z:
                return {k: np.asarray(z[k]) for k in z.files}
    except _NotNpz as exc:
        found = str(exc)
    except Exception as exc:  # noqa: BLE001 - any damage (zipfile, zlib, EOF, format) is one clear error
        found = f"unreadable ({type(exc).__name__}: {exc})"
    raise HescapeEvalError.build(what=what, expected="an .npz archive of arrays", found=found, fix=fix)


class _NotNpz(Exception):
    pass


def load_embeddings(source: str | os.PathLike, split: str = "test") -> Embeddings:
    """Read embeddings from a run directory (``RUN_DIR/embeddings/<split>.npz``) or an ``.npz`` file.

    Raises
    ------
    HescapeEvalError
        No such file (the message names the file and how to produce it), an unreadable or foreign file, or
        contents that fail the checks of :func:`save_embeddings`.
    """
    source = Path(source)
    path = source if source.suffix == ".npz" or source.is_file() else embeddings_path(source, split)
    if not path.is_file():
        where = f"run directory {source}" if source.is_dir() else f"{source}"
        found = "no such file" if path.parent.parent.exists() or path == source else f"no such directory {source}"
        raise HescapeEvalError.build(
            what=f"embeddings of {where}", expected=f"the file {path}", found=found,
            fix=(f"embed that split with the run's checkpoint (hescape-eval embed {source} DATASET --split {split} "
                 f"--out {split}.npz) and pass that file instead of the run directory"
                 if source.is_dir() and split != "test" else
                 f"rerun training with a hescape-train that saves embeddings (embeddings/{path.name}), or embed the "
                 "split with hescape-eval embed RUN DATASET --split SPLIT, or write them with "
                 "hescape.eval.io.save_embeddings(path, image=..., gene=..., index=..., sample=..., donor=...)"))
    data = read_npz(path, what=f"embeddings file {path}", fix="write it again with hescape.eval.io.save_embeddings")
    fmt = str(data.get("format", ""))
    missing = [k for k in ("image", "gene", "index", "sample", "donor") if k not in data]
    if fmt != EMBEDDINGS_FORMAT or missing:
        raise HescapeEvalError.build(what=f"embeddings file {path}",
                                     expected=f"format {EMBEDDINGS_FORMAT!r} with image, gene, index, sample, donor",
                                     found=f"format {fmt!r}" + (f", missing {missing}" if missing else ""),
                                     fix="write it with hescape.eval.io.save_embeddings")
    arrays = _validate(data["image"], data["gene"], data["index"], data["sample"], data["donor"],
                       data.get("spot_id"))
    return Embeddings(**arrays, path=path)


def remove_if_empty(folder: str | os.PathLike) -> None:
    """Remove ``folder`` if it is still empty (an output folder a failed command created); otherwise leave it."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass


def probe_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` (and parents) and prove a file can be written in it, so that a command refuses an
    unwritable output before its work, not after. Raises the ``OSError`` met."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(probe)
