"""Export a run's embeddings and spot metadata to AnnData (``.h5ad``) for scanpy / scib / squidpy.

Layout of the written file (schema ``hescape-anndata/1``)::

    obs_names                 "<sample>:<spot_id>" when spot ids are given (unique within a dataset: hescape-data
                              requires unique sample names and unique spot ids within a sample, so exports of
                              several splits of one dataset concatenate without clashes); else the row id (str)
    obs["row"]                the row id as given (e.g. the row index within the embedded split)
    obs["sample"], obs["donor"], obs["split"]   categorical; plus any extra columns passed
    obs["spot_id"]            optional: each spot's id within its sample (str, e.g. a Visium barcode or a
                              pseudo-spot's lattice id): (sample, spot_id) joins a row back to the source object
    obsm["X_hescape_img"]     (N, D_img) float32 image embeddings
    obsm["X_hescape_gex"]     (N, D_gex) float32 gene-expression embeddings
    obsm["spatial"]           (N, 2) float64 spot centres in µm, (x, y) — squidpy's key
    X, var_names              optional raw counts (N, G) float32 and gene names; else no X
    uns["hescape"]            {"schema", "created_by", "spatial_unit": "um", "params_json", "params"}

``uns["hescape"]["params_json"]`` is the run's parameters as JSON (exact round trip: :func:`read_params`);
``uns["hescape"]["params"]`` repeats its top-level str/int/float/bool entries for browsing. The file is written to a
temporary sibling and renamed into place, so ``path`` never holds a half-written file. Needs the optional extra
``hescape-eval[export]`` (anndata).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError
from .io import _umask

__all__ = ["SCHEMA", "IMG_KEY", "GEX_KEY", "SPATIAL_KEY", "export_anndata", "read_params"]

SCHEMA = "hescape-anndata/1"
IMG_KEY = "X_hescape_img"
GEX_KEY = "X_hescape_gex"
SPATIAL_KEY = "spatial"
_REQUIRED_OBS = ("sample", "donor", "split")


def _err(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


def _array(x, what: str, n: int | None, *, width: int | None = None, dtype=np.float32) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if dtype == np.float32 else x.detach().double().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 2 or arr.shape[1] == 0 or (width is not None and arr.shape[1] != width):
        shape = f"(N, {width})" if width else "(N, D)"
        raise _err(what=what, expected=f"a {shape} array", found=f"shape {arr.shape}", fix="stack one row per spot")
    if n is not None and arr.shape[0] != n:
        raise _err(what=what, expected=f"{n} rows (one per spot)", found=f"{arr.shape[0]}",
                   fix="pass arrays of the same spots, in the same order")
    if not np.isfinite(arr).all():
        raise _err(what=what, expected="finite values", found="NaN or inf", fix="drop or repair those spots")
    return arr


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"hescape-eval {version('hescape-eval')}"
    except PackageNotFoundError:  # running from a source tree
        return "hescape-eval"


def export_anndata(path: str | os.PathLike, *, obs: Mapping[str, Sequence], row_ids: Sequence,
                   image_embeddings=None, gene_embeddings=None, coords_um=None, params: Mapping | None = None,
                   counts=None, gene_names: Sequence[str] | None = None, overwrite: bool = False,
                   spot_ids: Sequence[str] | None = None) -> Path:
    """Write embeddings, spot coordinates (µm) and metadata of one run to an ``.h5ad`` file, atomically.

    Parameters
    ----------
    path
        Output file (``.h5ad``); its folder must exist.
    obs
        Per-spot columns; must contain ``"sample"``, ``"donor"`` and ``"split"`` (length ``N`` each); any other
        columns are kept (strings become categorical).
    row_ids
        ``(N,)`` unique row id of each spot (e.g. its dataset row): ``obs["row"]``, and ``obs_names`` when no
        ``spot_ids`` are given.
    image_embeddings, gene_embeddings
        ``(N, D)`` embeddings (numpy or torch), stored as float32 in ``obsm["X_hescape_img"]`` and
        ``obsm["X_hescape_gex"]``; at least one is required.
    coords_um
        ``(N, 2)`` spot centres ``(x, y)`` in micrometres → ``obsm["spatial"]`` (float64).
    params
        The run's parameters, JSON-serialisable → ``uns["hescape"]``.
    counts, gene_names
        Optional ``(N, G)`` raw counts (dense or scipy.sparse) → ``X`` (float32), with ``G`` gene names.
    overwrite
        Replace an existing file (else refused).
    spot_ids
        Optional ``(N,)`` id of each spot within its sample (``PairedSpotDataset.spot_ids``) → ``obs["spot_id"]``
        (plain strings), and ``obs_names`` = ``"<sample>:<spot_id>"`` (must be unique); join to the source by
        ``(obs["sample"], obs["spot_id"])``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    HescapeEvalError
        Missing obs columns, mismatched lengths, NaN/inf, duplicate row ids, params not JSON-serialisable, an
        existing file without ``overwrite``, a missing folder, or anndata not installed.
    """
    path = Path(path)
    if image_embeddings is None and gene_embeddings is None:
        raise _err(what="embeddings", expected="image_embeddings and/or gene_embeddings", found="neither",
                   fix="pass the run's embeddings")
    rid = np.asarray(row_ids.detach().cpu().numpy() if hasattr(row_ids, "detach") else row_ids).ravel()
    n = len(rid)
    if n == 0:
        raise _err(what="row_ids", expected="at least one spot", found="none", fix="export a non-empty run")
    names = rid.astype(str)
    if len(np.unique(names)) != n:
        _, counts_ = np.unique(names, return_counts=True)
        raise _err(what="row_ids", expected="unique ids", found=f"{int((counts_ > 1).sum())} repeated id(s)",
                   fix="pass the dataset row index of each spot")
    obsm: dict[str, np.ndarray] = {}
    if image_embeddings is not None:
        obsm[IMG_KEY] = _array(image_embeddings, "image_embeddings", n)
    if gene_embeddings is not None:
        obsm[GEX_KEY] = _array(gene_embeddings, "gene_embeddings", n)
    if coords_um is not None:
        obsm[SPATIAL_KEY] = _array(coords_um, "coords_um", n, width=2, dtype=np.float64)
    if spot_ids is not None:
        if "spot_id" in obs:
            raise _err(what="obs['spot_id']", expected="spot ids in spot_ids only", found="an obs column too",
                       fix="pass them once, as spot_ids")
        sid = np.asarray(spot_ids).ravel()
        if len(sid) != n or sid.dtype.kind not in "OUS":
            raise _err(what="spot_ids", expected=f"{n} strings (one per spot)", found=f"{len(sid)} of dtype {sid.dtype}",
                       fix="pass PairedSpotDataset.spot_ids of the same rows")
        obs = {**obs, "spot_id": sid.astype(str)}
    missing = [k for k in _REQUIRED_OBS if k not in obs]
    if missing:
        raise _err(what="obs", expected=f"columns {list(_REQUIRED_OBS)}", found=f"missing {missing}",
                   fix="pass the sample, donor and split of every spot")
    obs_names = names
    if spot_ids is not None:  # a spot's identity, the same in every export of its dataset (row ids restart per split)
        sample = np.asarray(obs["sample"]).ravel()
        if len(sample) == n:
            obs_names = np.char.add(np.char.add(sample.astype(str), ":"), np.asarray(obs["spot_id"]).astype(str))
            if len(np.unique(obs_names)) != n:
                raise _err(what="spot_ids", expected="unique (sample, spot id) pairs",
                           found=f"{n - len(np.unique(obs_names))} repeated pair(s)",
                           fix="pass PairedSpotDataset.spot_ids of the same rows (unique within each sample)")
    columns: dict[str, np.ndarray] = {}
    for k, v in obs.items():
        col = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v).ravel()
        if len(col) != n:
            raise _err(what=f"obs[{k!r}]", expected=f"{n} values (one per spot)", found=f"{len(col)}",
                       fix="pass columns aligned with row_ids")
        if str(k) == "row":
            raise _err(what="obs['row']", expected="no column named 'row' (it holds row_ids)", found="one",
                       fix="rename it")
        columns[str(k)] = col
    try:
        params_json = json.dumps(dict(params or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _err(what="params", expected="a JSON-serialisable mapping (str, numbers, bools, lists, dicts)",
                   found=str(exc), fix="convert paths and arrays to str / lists first") from exc
    x = None
    var_names = None
    if counts is not None:
        if hasattr(counts, "tocsr") and hasattr(counts, "nnz"):
            x = counts.tocsr().astype(np.float32)
            vals = x.data
        else:
            x = _array(counts, "counts", n)
            vals = x
        if x.shape[0] != n or not np.isfinite(vals).all():
            raise _err(what="counts", expected=f"{n} finite rows", found=f"shape {x.shape}", fix="pass raw counts")
        var_names = [str(g) for g in (gene_names if gene_names is not None else [])]
        if len(var_names) != x.shape[1] or len(set(var_names)) != len(var_names):
            raise _err(what="gene_names", expected=f"{x.shape[1]} unique names", found=f"{len(var_names)}",
                       fix="pass the gene names of the counts' columns")
    if path.exists() and not overwrite:
        raise _err(what=str(path), expected="no existing file", found="one", fix="pass overwrite=True or a new path")
    if not path.parent.is_dir():
        raise _err(what=str(path.parent), expected="an existing folder", found="none", fix="create it first")
    try:
        import anndata
        import pandas as pd
    except ImportError as exc:
        raise _err(what="export_anndata", expected="anndata installed", found="no anndata",
                   fix="pip install 'hescape-eval[export]'") from exc

    frame = pd.DataFrame(index=pd.Index(np.asarray(obs_names, dtype=object), name="spot"))
    frame["row"] = rid if rid.dtype.kind in "iu" else names
    for k, col in columns.items():
        if k == "spot_id" and spot_ids is not None:
            frame[k] = col.astype(str).astype(object)  # ids are unique per sample: plain strings, not categories
            continue
        frame[k] = pd.Categorical(col.astype(str)) if col.dtype.kind in "OUS" or k in _REQUIRED_OBS else col
    params_dict = json.loads(params_json)
    uns = {"hescape": {
        "schema": SCHEMA, "created_by": _version(), "spatial_unit": "um", "params_json": params_json,
        "params": {k: v for k, v in params_dict.items() if isinstance(v, str | int | float | bool)},
    }}
    adata = anndata.AnnData(X=x, obs=frame, obsm=obsm, uns=uns,
                            var=None if var_names is None else pd.DataFrame(index=pd.Index(var_names, name="gene")))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.h5ad", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_params(adata) -> dict:
    """The run parameters stored by :func:`export_anndata` (``json.loads`` of ``uns["hescape"]["params_json"]``)."""
    try:
        meta = adata.uns["hescape"]
        if meta["schema"] != SCHEMA:
            raise KeyError(meta["schema"])
        return json.loads(meta["params_json"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise _err(what="uns['hescape']", expected=f"metadata of schema {SCHEMA}", found=f"{exc!r}",
                   fix="read a file written by hescape.eval.export.export_anndata") from exc
