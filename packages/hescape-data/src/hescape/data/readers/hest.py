"""Read samples of a local HEST-1k download (mahmoodlab/HEST, Hugging Face ``MahmoodLab/hest``).

Layout (verified in mahmoodlab/HEST at commit ``afd42c3``: ``src/hest/HESTData.py`` ``_read_st`` and
``read_HESTData``; ``src/hest/utils.py`` ``_process_row``, the copy into a release folder; tutorial
``1-Downloading-HEST-1k.ipynb``, the folder list)::

    HEST_DIR/st/<id>.h5ad                        counts (AnnData); Xenium: HEST's 100 µm pseudo-spots
    HEST_DIR/wsis/<id>.tif                       the H&E whole-slide image (pyramidal generic TIFF / BigTIFF)
    HEST_DIR/metadata/<id>.json                  sample metadata (below)
    HEST_DIR/transcripts/<id>_transcripts.parquet  Xenium only: every transcript, aligned to the WSI
    HEST_DIR/xenium_seg/<id>_xenium_cell_seg.parquet  Xenium only: cell polygons on the WSI (not read here)

``metadata/<id>.json`` is the sample's ``meta.json`` (``pipeline.py``: the metrics and the metadata-table row,
kept to the keys of ``utils.get_col_selection``): ``id``, ``dataset_title``, ``organ``, ``oncotree_code``,
``species``, ``patient``, ``st_technology`` (``Visium``, ``Xenium``, ``Visium HD``, ``Spatial Transcriptomics``),
``inter_spot_dist``, ``spot_diameter``, ``spots_under_tissue``, ``pixel_size_um_embedded`` (from the TIFF
resolution tags; wrong on some samples, e.g. 1 for TENX95), ``pixel_size_um_estimated``, ``fullres_px_width`` /
``_height``, ... Missing values are written as ``NaN``. HEST uses ``pixel_size_um_estimated`` as the sample's
pixel size (``read_HESTData`` passes it to ``HESTData(pixel_size=...)``), so it is the default here
(``pixel_size="metadata"``).

Coordinates: ``st`` ``obsm["spatial"]`` are spot (pseudo-spot) centres in pixels of ``wsis/<id>.tif``, x then y
(tutorial ``2-Interacting-with-HEST-1k.ipynb``; HEST issue #52: centres). Visium obs carry ``array_row``,
``array_col``, ``pxl_col_in_fullres``, ``pxl_row_in_fullres``. Xenium pseudo-spots (``readers.py``
``pool_transcripts_xenium``) are 100 µm squares on a square grid (``array_col`` along x), named ``RRRxCCC``.
Transcript tables keep XOA's columns (``feature_name``, ``x_location``/``y_location`` in µm, ``qv``, ``cell_id``)
and add ``he_x``/``he_y``, the position on the WSI in pixels (``readers.py`` ``__load_transcripts``; tutorial 2).

Pixel-size check. HEST's pixel size is estimated (Visium: from one row of spots, ``find_pixel_size_from_spot_coords``;
Xenium: from the alignment matrix), and on some samples the pseudo-spot spacing disagrees with it by several per
cent (HEST issue #122). Each sample is therefore measured independently: Visium from the whole spot lattice
(:func:`~hescape.data.readers.spaceranger.fit_lattice`, spots 100 µm apart), or without ``array_row``/``array_col``
from the spots' nearest-neighbour spacing (at least 7 spots, 80 % regular:
:func:`~hescape.data.readers.visium.visium_um_per_px_from_spots`); Xenium from the transcripts' own µm
coordinates fitted against their WSI pixels (an affine least-squares fit, when the transcripts are read), else
from the pseudo-spot grid (100 µm squares). A disagreement above 2 % is warned about; ``pixel_size="lattice"``
uses the measured value instead of the metadata's.

Xenium counts: ``counts_from="spots"`` keeps HEST's 100 µm pseudo-spots as they are (only for the ``hest``
geometry); ``"transcripts"`` pools every transcript with ``qv >= min_qv`` by position; ``"cells"`` groups the
transcripts by ``cell_id`` (unassigned ones dropped) and pools whole cells at their transcripts' mean position.
Negative-control and codeword features (names containing ``BLANK``, ``Control``, ``Codeword`` or
``Intergenic``, the rule HEST's ``get_k_genes`` uses plus XOA's codeword names) are never counted as genes.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import HescapeDataError, InputFormatError, brief
from ..patches import scale_matrix
from .anndata import (
    PIXEL_SIZE_WARN_FRACTION,
    anndata_counts,
    anndata_genes,
    check_positions_on_image,
    read_h5ad,
    spatial_px,
    visium_lattice_from_obs,
)
from .image import check_not_blank, open_image
from .spaceranger import fit_lattice
from .tenx import read_json
from .visium import VISIUM_SPOT_DIAMETER_UM, visium_um_per_px_from_spots
from .xenium import SpatialSample

__all__ = ["HEST_TECHNOLOGIES", "HEST_PSEUDO_SPOT_UM", "HestPaths", "HestSample", "hest_available_ids",
           "resolve_hest_ids", "hest_paths", "read_hest_metadata", "read_hest_sample", "is_control_feature",
           "PIXEL_SIZE_CHOICES", "COUNTS_FROM_CHOICES"]

#: ``st_technology`` values this reader builds from.
HEST_TECHNOLOGIES = ("Visium", "Xenium")
#: Side (and pitch) of HEST's Xenium pseudo-spots, µm (``readers.py`` ``spot_size_um=100.``; issues #46, #79).
HEST_PSEUDO_SPOT_UM = 100.0
PIXEL_SIZE_CHOICES = ("metadata", "lattice")
COUNTS_FROM_CHOICES = ("auto", "spots", "transcripts", "cells")
_CONTROL = re.compile(r"BLANK|Control|Codeword|Intergenic")
#: At most this many transcripts enter the µm → WSI pixel fit (an evenly strided subset).
_FIT_SAMPLE = 200_000
_HINT = "download it from the Hugging Face dataset MahmoodLab/hest"
#: The manifest's ``measured_source`` for each way :func:`~hescape.data.readers.visium.visium_um_per_px_from_spots`
#: measures a Visium sample's pixel size.
_SPOT_SCALE_SOURCES = {"lattice": "spot lattice (array_row/array_col, spots 100 µm apart)",
                       "spacing": "spot spacing (median nearest neighbour = 100 µm)"}


def is_control_feature(name: str) -> bool:
    """True for Xenium negative-control / codeword features (``NegControlProbe_…``, ``BLANK_…``, ``…Codeword…``)."""
    return bool(_CONTROL.search(str(name)))


@dataclass(frozen=True)
class HestPaths:
    """The files of one HEST-1k sample (``transcripts`` is None when absent)."""

    sample_id: str
    st: Path
    wsi: Path
    metadata: Path
    transcripts: Path | None


def hest_available_ids(root: str | os.PathLike) -> list[str]:
    """Sample ids with an ``st/<id>.h5ad`` in ``root``, sorted."""
    st = Path(root) / "st"
    return sorted(p.name[: -len(".h5ad")] for p in st.glob("*.h5ad")) if st.is_dir() else []


def hest_paths(root: str | os.PathLike, sample_id: str) -> HestPaths:
    """The paths of ``sample_id``'s files (existence not checked; see :func:`resolve_hest_ids`)."""
    root = Path(root)
    tx = root / "transcripts" / f"{sample_id}_transcripts.parquet"
    return HestPaths(sample_id, root / "st" / f"{sample_id}.h5ad", root / "wsis" / f"{sample_id}.tif",
                     root / "metadata" / f"{sample_id}.json", tx if tx.is_file() else None)


def resolve_hest_ids(root: str | os.PathLike, ids) -> list[str]:
    """The sample ids to build: ``"all"`` (every ``st/*.h5ad``) or a list / comma-separated string of ids.

    Every id must have its ``st/<id>.h5ad``, ``wsis/<id>.tif`` and ``metadata/<id>.json``; checked before any
    file is read.

    Raises
    ------
    InputFormatError
        ``root`` is not a HEST folder, an id is absent (the message lists the ids that are there) or lacks a file.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"expected a HEST-1k folder (with st/, wsis/, metadata/) at {root}, found no such directory"
        raise InputFormatError(msg)
    available = hest_available_ids(root)
    if not available:
        msg = (f"{root}: expected a HEST-1k folder with st/<id>.h5ad files, found "
               f"{sorted(p.name for p in root.iterdir())[:10]}; point at the folder holding st/, wsis/ and metadata/")
        raise InputFormatError(msg)
    if isinstance(ids, str):
        ids = ["all"] if ids.strip() == "all" else [i.strip() for i in ids.split(",") if i.strip()]
    ids = list(ids)
    if ids == ["all"]:
        ids = available
    if not ids:
        msg = f"--ids: expected sample ids (e.g. {','.join(available[:2])}) or 'all', found none"
        raise HescapeDataError(msg)
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        msg = f"--ids: expected each sample id once, found {dup} repeated"
        raise HescapeDataError(msg)
    absent = [i for i in ids if i not in available]
    if absent:
        shown = ", ".join(available[:20]) + (f", … ({len(available)} in all)" if len(available) > 20 else "")
        msg = (f"{root}: expected st/<id>.h5ad for every requested id, found none for {absent}; available ids: "
               f"{shown}; {_HINT} (e.g. allow_patterns '*{absent[0]}[_.]**') or fix --ids")
        raise InputFormatError(msg)
    for i in ids:
        p = hest_paths(root, i)
        missing = [str(f.relative_to(root)) for f in (p.wsi, p.metadata) if not f.is_file()]
        if missing:
            msg = f"{root}: expected {missing} for sample {i} beside st/{i}.h5ad, found them missing; {_HINT}"
            raise InputFormatError(msg)
    return ids


def _clean(v):
    """JSON-safe metadata value: NaN/inf become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_hest_metadata(path: str | os.PathLike) -> dict:
    """``metadata/<id>.json`` as a dict (``NaN`` values as None)."""
    meta = read_json(Path(path), _HINT)
    return {str(k): _clean(v) for k, v in meta.items()}


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


@dataclass
class HestSample:
    """A HEST-1k sample read for building: the points to keep or pool, and what they are."""

    sample: SpatialSample
    technology: str
    counts_from: str  # "spots" (kept as they are), "transcripts" or "cells" (pooled)
    cells_um: np.ndarray | None = None  # cell positions (µm) counted as n_cells when pooling transcripts
    metadata: dict = field(default_factory=dict)  # HEST metadata/<id>.json


@dataclass
class _Transcripts:
    he_px: np.ndarray  # (n, 2) WSI pixels
    gene: np.ndarray  # (n,) column in genes
    genes: list[str]
    cell: np.ndarray | None  # (n,) cell index, -1 unassigned
    fit_um: np.ndarray | None  # (m, 2) µm (x_location, y_location) of a subset
    fit_px: np.ndarray | None  # (m, 2) their WSI pixels
    stats: dict


def _string_column(col):
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_dictionary(t):
        col = pc.cast(col, pa.string())
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        col = pc.cast(col, pa.string())
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        col = pc.cast(col, pa.string())
    return col


def _read_transcripts(path: Path, *, min_qv: float, genes_hint: list[str] | None) -> _Transcripts:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        msg = f"{path}: expected a Parquet table of transcripts, found unreadable content ({brief(e, 100)})"
        raise InputFormatError(msg) from None
    need = ["feature_name", "he_x", "he_y"]
    missing = [c for c in need if c not in names]
    if missing:
        msg = (f"{path}: expected HEST's transcript columns {need} (he_x/he_y: WSI pixels), missing {missing} "
               f"(found {names[:12]}); {_HINT}")
        raise InputFormatError(msg)
    if min_qv > 0 and "qv" not in names:
        msg = f"{path}: expected a 'qv' column to keep transcripts with qv >= {min_qv:g}, found none; pass --min-qv 0"
        raise InputFormatError(msg)
    cols = need + [c for c in ("qv", "cell_id", "x_location", "y_location") if c in names]
    try:
        t = pq.read_table(path, columns=cols)
    except (pa.ArrowInvalid, OSError) as e:
        msg = f"{path}: expected a Parquet table of transcripts, found unreadable content ({brief(e, 100)})"
        raise InputFormatError(msg) from None
    stats = {"transcripts": t.num_rows}
    if min_qv > 0:
        t = t.filter(pc.greater_equal(t.column("qv"), min_qv))
    stats["qv_passed"] = t.num_rows
    enc = _string_column(t.column("feature_name")).combine_chunks().dictionary_encode()
    dictionary = [str(v) for v in enc.dictionary.to_pylist()]
    codes = np.asarray(enc.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    control = {d for d in dictionary if is_control_feature(d)}
    if genes_hint is not None:
        genes = [g for g in dict.fromkeys(genes_hint) if not is_control_feature(g)]
    else:
        genes = sorted(set(dictionary) - control)
    col_of = {g: i for i, g in enumerate(genes)}
    lut = np.array([col_of.get(d, -1) for d in dictionary] + [-1], dtype=np.int64)
    gene = lut[codes]  # codes == -1 (null names) take the last entry, -1
    keep = gene >= 0
    in_control = np.isin(codes, [i for i, d in enumerate(dictionary) if d in control])
    stats["control_features_dropped"] = int(in_control.sum())
    stats["unknown_features_dropped"] = int((~keep & ~in_control).sum())
    if not keep.any():
        msg = (f"{path}: expected transcripts of the sample's genes (qv >= {min_qv:g}), found none "
               f"({stats['transcripts']} transcripts, {stats['qv_passed']} pass the QV threshold)")
        raise InputFormatError(msg)
    he = np.column_stack([np.asarray(t.column(c).to_numpy(), dtype=np.float64) for c in ("he_x", "he_y")])[keep]
    if not np.isfinite(he).all():
        msg = f"{path}: expected finite he_x/he_y, found {int((~np.isfinite(he)).any(1).sum())} transcripts with NaN/inf"
        raise InputFormatError(msg)
    cell = None
    if "cell_id" in cols:
        cid = t.column("cell_id")
        if pa.types.is_integer(cid.type):
            raw = np.asarray(cid.fill_null(-1).to_numpy(), dtype=np.int64)[keep]
            uniq, inv = np.unique(raw, return_inverse=True)
            cell = np.where(raw < 0, -1, inv).astype(np.int64)  # XOA < 1.3: -1 = unassigned
        else:
            c = _string_column(cid).combine_chunks().dictionary_encode()
            cdict = [str(v) for v in c.dictionary.to_pylist()]
            ccode = np.asarray(c.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)[keep]
            unassigned = np.array([v.strip().upper() in ("", "UNASSIGNED", "-1") for v in cdict] + [True])
            cell = np.where(unassigned[ccode], -1, ccode)
    fit_um = fit_px = None
    if "x_location" in cols and "y_location" in cols:
        idx = np.flatnonzero(keep)
        idx = idx[:: max(1, len(idx) // _FIT_SAMPLE)]
        fit_um = np.column_stack([np.asarray(t.column(c).take(idx).to_numpy(), dtype=np.float64)
                                  for c in ("x_location", "y_location")])
        fit_px = np.column_stack([np.asarray(t.column(c).take(idx).to_numpy(), dtype=np.float64)
                                  for c in ("he_x", "he_y")])
        ok = np.isfinite(fit_um).all(1) & np.isfinite(fit_px).all(1)
        fit_um, fit_px = fit_um[ok], fit_px[ok]
    stats["pooled"] = int(keep.sum())
    return _Transcripts(he, gene[keep], genes, cell, fit_um, fit_px, stats)


def fit_um_to_px(um: np.ndarray, px: np.ndarray, where) -> dict | None:
    """Affine least-squares fit of WSI pixels on µm positions: µm/px, anisotropy and RMS residual (µm)."""
    if um is None or len(um) < 10:
        return None
    x = np.column_stack([um, np.ones(len(um))])
    coef, *_ = np.linalg.lstsq(x, px, rcond=None)
    a = coef[:2].T
    det = float(np.linalg.det(a))
    if not math.isfinite(det) or abs(det) < 1e-12:
        return None
    mpp = 1.0 / math.sqrt(abs(det))
    res = np.linalg.norm(x @ coef - px, axis=1) * mpp
    sv = np.linalg.svd(a, compute_uv=False)
    return {"um_per_px": mpp, "anisotropy": float(sv[0] / sv[1]), "rms_residual_um": float(np.sqrt(np.mean(res**2))),
            "points": int(len(um)), "source": "transcripts x_location/y_location (µm) vs he_x/he_y (WSI px)"}


def _xenium_grid_um_per_px(obs, xy_px: np.ndarray, where) -> float | None:
    """µm/px of HEST's Xenium pseudo-spot grid (100 µm squares, square lattice), None when it cannot be fitted."""
    if "array_row" not in obs.columns or "array_col" not in obs.columns or len(xy_px) < 6:
        return None
    try:
        fit = fit_lattice(np.asarray(obs["array_col"], dtype=np.int64), np.asarray(obs["array_row"], dtype=np.int64),
                          xy_px, step_um=(HEST_PSEUDO_SPOT_UM, HEST_PSEUDO_SPOT_UM), probe=(1, 1),
                          pitch_um=HEST_PSEUDO_SPOT_UM, where=str(where))
    except InputFormatError:
        return None
    return fit.um_per_px


def _choose(sample_id: str, choice: str, meta_mpp: float | None, measured: tuple[float, str] | None) -> tuple[float, dict]:
    """The pixel size under ``choice`` (``metadata`` or ``lattice``), with the 2 % cross-check warning."""
    rec = {"pixel_size_um_estimated": meta_mpp}
    if measured is not None:
        rec["um_per_px_measured"], rec["measured_source"] = round(measured[0], 8), measured[1]
    if choice == "lattice":
        if measured is None:
            msg = (f"HEST sample {sample_id}: --pixel-size lattice: expected a spot lattice or transcript µm "
                   "coordinates to measure the pixel size, found neither; use --pixel-size metadata")
            raise InputFormatError(msg)
        mpp, src = measured[0], f"measured ({measured[1]})"
    elif meta_mpp is not None:
        mpp, src = meta_mpp, "metadata pixel_size_um_estimated"
    elif measured is not None:
        mpp, src = measured[0], f"measured ({measured[1]}); metadata pixel_size_um_estimated is missing"
        warnings.warn(f"HEST sample {sample_id}: metadata has no pixel_size_um_estimated; using the measured "
                      f"{mpp:.5g} µm/px ({measured[1]})", UserWarning, stacklevel=3)
    else:
        msg = (f"HEST sample {sample_id}: expected pixel_size_um_estimated in metadata/{sample_id}.json or a spot "
               f"lattice to measure it, found neither; {_HINT}")
        raise InputFormatError(msg)
    rec.update(um_per_px=round(float(mpp), 8), um_per_px_source=src)
    if meta_mpp is not None and measured is not None:
        diff = measured[0] / meta_mpp - 1.0
        rec["disagreement"] = round(diff, 6)
        if abs(diff) > PIXEL_SIZE_WARN_FRACTION:
            using = ("using the measured value (--pixel-size lattice)" if choice == "lattice" else
                     "using the metadata value (HEST's own); pass --pixel-size lattice to use the measured one")
            rec["pixel_size_warning"] = (
                f"HEST sample {sample_id}: metadata pixel_size_um_estimated is {meta_mpp:.5g} µm/px, measured "
                f"{measured[0]:.5g} µm/px from the {measured[1]} ({diff:+.1%}); {using}")
            warnings.warn(rec["pixel_size_warning"], UserWarning, stacklevel=3)
    return float(mpp), rec


_META_KEYS = ("id", "dataset_title", "organ", "oncotree_code", "species", "patient", "st_technology",
              "inter_spot_dist", "spot_diameter", "pixel_size_um_embedded", "pixel_size_um_estimated")


def read_hest_sample(root: str | os.PathLike, sample_id: str, *, counts_from: str = "spots",
                     pixel_size: str = "metadata", min_qv: float = 20.0,
                     allow_non_integer_counts: bool = False) -> HestSample:
    """Read one HEST-1k sample: its points (spots, transcripts or cells) in µm, counts, genes and WSI.

    Parameters
    ----------
    root
        The HEST-1k folder (``st/``, ``wsis/``, ``metadata/``, optionally ``transcripts/``).
    sample_id
        E.g. ``TENX95``; must exist (:func:`resolve_hest_ids`).
    counts_from
        ``"spots"`` (Visium spots; Xenium: HEST's 100 µm pseudo-spots), or for Xenium ``"transcripts"`` /
        ``"cells"`` (needs ``transcripts/<id>_transcripts.parquet``).
    pixel_size
        ``"metadata"`` (``pixel_size_um_estimated``, HEST's own) or ``"lattice"`` (measured: module docstring).
    min_qv
        Transcripts with a lower ``qv`` are not counted (20: XOA's threshold for its count matrices).

    Raises
    ------
    InputFormatError
        An unsupported ``st_technology`` (Visium HD, Spatial Transcriptomics), missing transcripts, damaged files.
    """
    if counts_from not in ("spots", "transcripts", "cells"):
        msg = f"counts_from: expected 'spots', 'transcripts' or 'cells', found {counts_from!r}"
        raise HescapeDataError(msg)
    if pixel_size not in PIXEL_SIZE_CHOICES:
        msg = f"--pixel-size: expected one of {list(PIXEL_SIZE_CHOICES)}, found {pixel_size!r}"
        raise HescapeDataError(msg)
    p = hest_paths(root, sample_id)
    meta = read_hest_metadata(p.metadata)
    tech = str(meta.get("st_technology") or "")
    if tech not in HEST_TECHNOLOGIES:
        hint = {"Visium HD": "build it from its Space Ranger output with `hescape-data build visium-hd`",
                "Spatial Transcriptomics": "its 100 µm spots 200 µm apart have no HESCAPE geometry yet"}.get(
                    tech, "check the metadata file")
        msg = (f"HEST sample {sample_id}: expected st_technology {list(HEST_TECHNOLOGIES)} in {p.metadata.name}, "
               f"found {tech!r}; {hint}")
        raise InputFormatError(msg)
    if tech == "Visium" and counts_from != "spots":
        msg = (f"HEST sample {sample_id}: Visium spots are kept as they are, found counts_from={counts_from!r} "
               "(transcripts/cells are for Xenium samples); drop --counts-from")
        raise InputFormatError(msg)
    if counts_from in ("transcripts", "cells") and p.transcripts is None:
        msg = (f"HEST sample {sample_id}: expected transcripts/{sample_id}_transcripts.parquet to pool "
               f"{counts_from}, found none; {_HINT} (the transcripts/ folder), or keep HEST's own 100 µm pseudo-spots "
               "with --geometry hest")
        raise InputFormatError(msg)
    adata = read_h5ad(p.st)
    where = f"HEST sample {sample_id} ({p.st})"
    xy_px = spatial_px(adata, where)
    meta_mpp = _positive(meta.get("pixel_size_um_estimated"))
    record = {k: meta.get(k) for k in _META_KEYS if k in meta}

    tx = None
    if tech == "Visium":
        scale = visium_um_per_px_from_spots(xy_px, visium_lattice_from_obs(adata.obs, xy_px, where), where=where,
                                            required=False)
        measured = None if scale is None else (scale.um_per_px, _SPOT_SCALE_SOURCES[scale.method])
    elif counts_from == "spots":
        grid = _xenium_grid_um_per_px(adata.obs, xy_px, where)
        measured = (grid, "pseudo-spot grid (HEST's 100 µm squares)") if grid is not None else None
    else:
        genes_hint, _, keep_var = anndata_genes(adata, where)
        tx = _read_transcripts(p.transcripts, min_qv=min_qv, genes_hint=[g for g, k in zip(genes_hint, keep_var,
                                                                                               strict=True) if k])
        f = fit_um_to_px(tx.fit_um, tx.fit_px, p.transcripts)
        if f is not None:
            record["transcript_fit"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()}
            measured = (f["um_per_px"], "transcripts' µm coordinates fitted to their WSI pixels")
        else:
            grid = _xenium_grid_um_per_px(adata.obs, xy_px, where)
            measured = (grid, "pseudo-spot grid (HEST's 100 µm squares)") if grid is not None else None
    mpp, px_rec = _choose(sample_id, pixel_size, meta_mpp, measured)
    record.update(px_rec)

    img = open_image(p.wsi)
    try:
        if tech == "Visium" or counts_from == "spots":
            check_positions_on_image(img, f"wsis/{sample_id}.tif", xy_px, where)
        check_not_blank(img, p.wsi)
    except InputFormatError:
        img.close()
        raise
    common = {"name": sample_id, "image": img, "um_to_px": scale_matrix(1.0 / mpp)}
    record.update(image=str(p.wsi), st=str(p.st), counts_from=counts_from)
    if tx is None:
        counts, src = anndata_counts(adata, where, allow_non_integer=allow_non_integer_counts)
        genes, gene_ids, keep = anndata_genes(adata, where)
        if tech == "Xenium":
            keep = keep & np.array([not is_control_feature(g) for g in genes])
        if not keep.all():
            counts = counts[:, np.flatnonzero(keep)].tocsr()
            genes = [g for g, k in zip(genes, keep, strict=True) if k]
            gene_ids = [g for g, k in zip(gene_ids, keep, strict=True) if k]
        record["counts_source"] = f"st/{sample_id}.h5ad {src}"
        s = SpatialSample(obs_ids=np.asarray([str(o) for o in adata.obs_names], dtype=object),
                          xy_um=xy_px * mpp, counts=counts, genes=genes, gene_ids=gene_ids, kind="spots",
                          spot_diameter_um=VISIUM_SPOT_DIAMETER_UM if tech == "Visium" else HEST_PSEUDO_SPOT_UM,
                          metadata=record, **common)
        return HestSample(s, tech, "spots", None, meta)

    record["transcripts"] = str(p.transcripts)
    record["transcript_counts"] = tx.stats
    record["min_qv"] = min_qv
    g = len(tx.genes)
    cells_um = None
    if tx.cell is not None and (tx.cell >= 0).any():
        assigned = tx.cell >= 0
        cid = tx.cell[assigned]
        n_c = int(cid.max()) + 1
        w = np.bincount(cid, minlength=n_c).astype(np.float64)
        present = w > 0
        cx = np.bincount(cid, weights=tx.he_px[assigned, 0], minlength=n_c)[present] / w[present]
        cy = np.bincount(cid, weights=tx.he_px[assigned, 1], minlength=n_c)[present] / w[present]
        cells_um = np.column_stack([cx, cy]) * mpp
        if counts_from == "cells":
            remap = np.cumsum(present) - 1
            rows = remap[cid]
            counts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, tx.gene[assigned])),
                                   shape=(int(present.sum()), g))
            counts.sum_duplicates()
            record["cells"] = int(present.sum())
            record["unassigned_transcripts_dropped"] = int((~assigned).sum())
            s = SpatialSample(obs_ids=np.zeros(0, dtype=object), xy_um=cells_um, counts=counts, genes=tx.genes,
                              gene_ids=list(tx.genes), kind="cells", metadata=record, **common)
            return HestSample(s, tech, "cells", cells_um, meta)
    elif counts_from == "cells":
        img.close()
        msg = (f"HEST sample {sample_id}: expected a cell_id column with assigned transcripts in "
               f"{p.transcripts.name} to pool cells, found none; use --counts-from transcripts")
        raise InputFormatError(msg)
    n = len(tx.gene)
    onehot = sp.csr_matrix((np.ones(n, np.float32), tx.gene, np.arange(n + 1, dtype=np.int64)), shape=(n, g))
    s = SpatialSample(obs_ids=np.zeros(0, dtype=object), xy_um=tx.he_px * mpp, counts=onehot, genes=tx.genes,
                      gene_ids=list(tx.genes), kind="transcripts", metadata=record, **common)
    return HestSample(s, tech, "transcripts", cells_um, meta)
