"""10x Genomics feature-barcode matrices: the HDF5 file and the MEX folder (Cell Ranger / Space Ranger / XOA).

HDF5 layout (group ``matrix``): ``data``, ``indices`` (feature index), ``indptr`` (one entry per barcode + 1),
``shape`` = (n_features, n_barcodes), ``barcodes``, ``features/{id,name,feature_type}``; the matrix is stored
CSC (features × barcodes), i.e. CSR when read as barcodes × features.
MEX folder: ``matrix.mtx.gz`` (Matrix Market, features × barcodes), ``features.tsv.gz`` (id, name, type) and
``barcodes.tsv.gz``; uncompressed variants are accepted too.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

from ..counts import check_counts, check_feature_names
from ..errors import InputFormatError, brief

__all__ = ["FeatureMatrix", "read_10x_h5", "read_10x_mex", "read_10x_matrix"]

GENE_EXPRESSION = "Gene Expression"


@dataclass
class FeatureMatrix:
    """Counts of barcodes (cells or spots) × features, with the feature table."""

    counts: sp.csr_matrix  # (n_barcodes, n_features) float32
    barcodes: np.ndarray  # (n_barcodes,) str
    feature_ids: np.ndarray  # (n_features,) str
    feature_names: np.ndarray  # (n_features,) str
    feature_types: np.ndarray  # (n_features,) str

    def gene_expression(self) -> FeatureMatrix:
        """Only the ``Gene Expression`` features (drops negative controls, codewords, protein, ...)."""
        keep = self.feature_types == GENE_EXPRESSION
        if not keep.any():
            found = sorted(set(self.feature_types.tolist()))
            msg = (f"expected features of type {GENE_EXPRESSION!r} in the count matrix, found only {found}; "
                   "use a gene-expression matrix")
            raise InputFormatError(msg)
        return FeatureMatrix(self.counts[:, keep].tocsr(), self.barcodes, self.feature_ids[keep],
                             self.feature_names[keep], self.feature_types[keep])


def _str(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind in "SO":
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in a.tolist()], dtype=object)
    return a.astype(str).astype(object)


def read_json(path: Path, missing_hint: str) -> dict:
    """A JSON file of a 10x output (``experiment.xenium``, ``scalefactors_json.json``), or a clear error."""
    if not path.is_file():
        msg = f"expected {path}, found no such file; {missing_hint}"
        raise InputFormatError(msg)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        msg = (f"{path}: expected JSON, found invalid content ({type(e).__name__}: {brief(e, 100)}); the file is "
               "damaged: take it from the original output folder")
        raise InputFormatError(msg) from None
    except OSError as e:
        msg = f"{path}: expected a readable JSON file, found one that cannot be read ({brief(e, 200)}); check its permissions"
        raise InputFormatError(msg) from None
    if not isinstance(obj, dict):
        msg = (f"{path}: expected a JSON object ({{\"key\": value, ...}}), found a JSON {type(obj).__name__}; "
               "the file is damaged or not a 10x output file: take it from the original output folder")
        raise InputFormatError(msg)
    return obj


def _check_unique_barcodes(barcodes: np.ndarray, where: str) -> None:
    """A barcode (cell or spot) listed twice would put two count rows at one position: refuse."""
    uniq, counts = np.unique(np.asarray(barcodes, dtype=str), return_counts=True)
    if len(uniq) != len(barcodes):
        dup = uniq[counts > 1][:3].tolist()
        msg = (f"{where}: expected each barcode once, found {int((counts - 1).sum())} repeated (e.g. {dup}); "
               "the matrix is corrupt or was concatenated from several runs: take it unmodified from Space Ranger/XOA")
        raise InputFormatError(msg)


def read_10x_h5(path: str | os.PathLike, *, allow_non_integer: bool = False) -> FeatureMatrix:
    """Read a 10x HDF5 feature-barcode matrix (all feature types; see :meth:`FeatureMatrix.gene_expression`).

    Values must be raw counts: finite, >= 0 and integer unless ``allow_non_integer`` (see
    :func:`hescape.data.counts.check_counts`); feature names and ids non-empty printable text
    (:func:`hescape.data.counts.check_feature_names`).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        msg = f"expected a 10x HDF5 matrix at {path}, found no such file"
        raise InputFormatError(msg)
    try:
        fh = h5py.File(path, "r")
    except OSError as e:
        msg = f"{path}: expected a 10x HDF5 matrix, found a file HDF5 cannot open ({brief(e, 200)})"
        raise InputFormatError(msg) from None
    with fh:
        need = ["matrix/data", "matrix/indices", "matrix/indptr", "matrix/shape", "matrix/barcodes",
                "matrix/features/id", "matrix/features/name", "matrix/features/feature_type"]
        missing = [k for k in need if k not in fh]
        if missing:
            msg = (f"{path}: expected the 10x v3 HDF5 layout, missing {missing}; "
                   "re-export with Cell Ranger/Space Ranger >= 3 or XOA")
            raise InputFormatError(msg)
        g = fh["matrix"]
        try:
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            shape = np.asarray(g["shape"][:])
            barcodes = _str(g["barcodes"][:])
            ids, names = _str(g["features/id"][:]), _str(g["features/name"][:])
            types = _str(g["features/feature_type"][:])
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            msg = f"{path}: expected a readable 10x HDF5 matrix, found damaged datasets ({brief(e, 100)}); the file is corrupt"
            raise InputFormatError(msg) from None
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        msg = f"{path}: expected matrix/shape to be 2 whole numbers (features, barcodes), found {shape.tolist()!r}"
        raise InputFormatError(msg)
    n_feat, n_bc = (int(v) for v in shape)
    for name, arr, kinds in (("data", data, "iuf"), ("indices", indices, "iu"), ("indptr", indptr, "iu")):
        if arr.ndim != 1 or arr.dtype.kind not in kinds:
            msg = (f"{path}: expected matrix/{name} to be a 1-D {'numeric' if kinds == 'iuf' else 'integer'} array, "
                   f"found dtype {arr.dtype} with shape {arr.shape}; the file is corrupt")
            raise InputFormatError(msg)
    if len(indptr) != n_bc + 1 or len(barcodes) != n_bc or not (len(ids) == len(names) == len(types) == n_feat):
        msg = (f"{path}: shape says {n_feat} features × {n_bc} barcodes, found indptr of length {len(indptr)}, "
               f"{len(barcodes)} barcodes and {len(ids)} features; the file is corrupt")
        raise InputFormatError(msg)
    if len(indices) != len(data) or (len(indices) and (indices.min() < 0 or indices.max() >= n_feat)):
        msg = f"{path}: feature indices out of range or not aligned with data; the file is corrupt"
        raise InputFormatError(msg)
    if indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr.astype(np.int64)) < 0).any():
        msg = (f"{path}: expected matrix/indptr to rise from 0 to {len(data)} (the number of stored values) without "
               f"decreasing, found {int(indptr[0])} … {int(indptr[-1])}"
               f"{' with decreasing steps' if (np.diff(indptr.astype(np.int64)) < 0).any() else ''}; the file is corrupt")
        raise InputFormatError(msg)
    check_counts(data, str(path), allow_non_integer=allow_non_integer)
    check_feature_names(names, ids, str(path))
    counts = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr.astype(np.int64)),
                           shape=(n_bc, n_feat))
    counts.sum_duplicates()
    _check_unique_barcodes(barcodes, str(path))
    return FeatureMatrix(counts, barcodes, ids, names, types)


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)  # noqa: SIM115


def _read_tsv(path: Path) -> list[list[str]]:
    """The non-blank lines of a (gzipped) tab-separated file, split; a damaged file is one clear error."""
    try:
        with _open_text(path) as fh:
            return [ln.rstrip("\n").split("\t") for ln in fh if ln.strip()]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        msg = f"{path}: expected a (gzipped) tab-separated text file, found unreadable content ({brief(e, 100)})"
        raise InputFormatError(msg) from None


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    msg = f"MEX folder {folder}: expected {stem}.gz (or {stem}), found neither"
    raise InputFormatError(msg)


def read_10x_mex(folder: str | os.PathLike, *, allow_non_integer: bool = False) -> FeatureMatrix:
    """Read a 10x MEX folder (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``); raw counts only."""
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"expected a 10x MEX folder at {folder}, found no such directory"
        raise InputFormatError(msg)
    barcodes = np.array([r[0] for r in _read_tsv(_find(folder, "barcodes.tsv"))], dtype=object)
    rows = _read_tsv(_find(folder, "features.tsv"))
    if any(len(r) < 3 for r in rows):
        msg = f"{folder}/features.tsv: expected 3 tab-separated columns (id, name, type), found fewer"
        raise InputFormatError(msg)
    ids = np.array([r[0] for r in rows], dtype=object)
    names = np.array([r[1] for r in rows], dtype=object)
    types = np.array([r[2] for r in rows], dtype=object)
    mtx = _find(folder, "matrix.mtx")
    try:
        with (gzip.open(mtx, "rb") if mtx.suffix == ".gz" else open(mtx, "rb")) as fh:  # noqa: SIM115
            m = sp.coo_matrix(scipy.io.mmread(fh))
    except (ValueError, OSError, EOFError, zlib.error, UnicodeDecodeError, IndexError) as e:
        msg = f"{mtx}: expected a Matrix Market file, found unreadable content ({brief(e, 100)}); the file is corrupt"
        raise InputFormatError(msg) from None
    if m.shape != (len(ids), len(barcodes)):
        msg = (f"{mtx}: expected {len(ids)} features × {len(barcodes)} barcodes (from the tsv files), "
               f"found a {m.shape[0]} × {m.shape[1]} matrix; the folder is inconsistent")
        raise InputFormatError(msg)
    check_counts(m.data, str(mtx), allow_non_integer=allow_non_integer)
    check_feature_names(names, ids, f"{folder}/features.tsv")
    counts = sp.csr_matrix(m.T.astype(np.float32))
    _check_unique_barcodes(barcodes, str(folder))
    return FeatureMatrix(counts, barcodes, ids, names, types)


def read_10x_matrix(path: str | os.PathLike, *, allow_non_integer: bool = False) -> FeatureMatrix:
    """An HDF5 file or a MEX folder, chosen by what ``path`` is; raw counts only (see :func:`read_10x_h5`)."""
    path = Path(path)
    if path.is_dir():
        return read_10x_mex(path, allow_non_integer=allow_non_integer)
    return read_10x_h5(path, allow_non_integer=allow_non_integer)
