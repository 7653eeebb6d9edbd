"""Read an AnnData (``.h5ad``) of spatial counts together with the H&E image its coordinates refer to.

What is read (scanpy / squidpy conventions, checked against scanpy 1.11 ``read_visium``, which sets
``obsm["spatial"]`` to the Space Ranger columns ``pxl_col_in_fullres, pxl_row_in_fullres`` and
``uns["spatial"][library_id]["scalefactors"]`` to ``scalefactors_json.json``; formats fact sheet §2):

``obsm["spatial"]``
    Positions ``(n_obs, 2)``: x (image column) then y (image row), **in pixels of the image given with
    ``image``** (Space Ranger's full-resolution pixels for Visium). Extra columns are ignored.
Counts
    ``layers["counts"]`` when present, else ``X`` (or the layer named by ``layer``): raw counts, finite,
    non-negative and integer-valued. Log-normalised or scaled values are refused with a message naming
    ``layers["counts"]``.
Genes
    ``var_names`` are the symbols and ``var["gene_ids"]`` (or ``gene_id``, ``ensembl_id``) the Ensembl ids; when
    ``var_names`` are Ensembl ids, the symbols come from ``var["gene_symbols"]`` (or ``gene_symbol``,
    ``feature_name``, ``gene_name``, ``symbol``). With ``var["feature_types"]``, only ``Gene Expression``
    features are kept.
Pixel size (µm per pixel of the image)
    In this order: ``image_um_per_px`` given by the user; the Visium spot lattice (spots are 100 µm centre to
    centre, :func:`~hescape.data.readers.spaceranger.fit_lattice` on ``obs["array_row"/"array_col"]``, or the
    median nearest-neighbour spacing of the spots when those columns are absent, from at least 7 spots, 80 % of
    them regular: :func:`~hescape.data.readers.visium.visium_um_per_px_from_spots`); Visium HD's
    ``microns_per_pixel``; Space Ranger's ``spot_diameter_fullres`` (the pixel diameter of a theoretical 65 µm spot;
    55 µm in HEST-1k files, recognised by HEST's ``tissue_downscaled_fullres_scalef`` key, HEST ``utils.py``
    ``register_downscale_img``). Without any of them the build is refused, naming ``--image-um-per-px``. A given
    value that disagrees with the lattice by more than 2 %, or with ``spot_diameter_fullres`` by more than 5 %,
    is used with a warning.
Level
    ``spots``: every observation is a Visium spot (55 µm disc), kept as it is. ``cells``: observations are cells
    (or Visium HD bins) to pool into pseudo-spots. ``auto`` (default): ``cells`` for Visium HD markers
    (``bin_size_um``/``microns_per_pixel`` scale factors, ``s_008um_…`` barcodes), ``spots`` when ``obs`` has
    ``array_row``/``array_col`` or the scale factors have ``spot_diameter_fullres``, ``cells`` otherwise.

anndata and pandas are optional dependencies (``pip install "hescape-data[anndata]"``), imported only here.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..counts import check_counts
from ..errors import HescapeDataError, InputFormatError, brief
from ..patches import scale_matrix
from .image import ArrayImage, SlideImage, check_not_blank, open_image
from .spaceranger import HD_BARCODE, LatticeFit
from .visium import (
    SCALE_REFUSE_FRACTION,
    SPOT_DIAMETER_FULLRES_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    fit_visium_lattice,
    spacing_px,
    visium_um_per_px_from_spots,
)
from .xenium import SpatialSample

__all__ = ["ANNDATA_HINT", "LEVELS", "PixelSize", "import_anndata", "read_h5ad", "anndata_counts", "anndata_genes",
           "spatial_px", "visium_lattice_from_obs", "spacing_px", "read_anndata", "PIXEL_SIZE_WARN_FRACTION",
           "check_positions_on_image"]

#: How to install the optional dependencies this module needs.
ANNDATA_HINT = 'pip install "hescape-data[anndata]"'
#: ``level`` values of :func:`read_anndata`.
LEVELS = ("auto", "spots", "cells")
#: Warn when a pixel size disagrees with the spot lattice by more than this fraction (HEST-1k's estimates are off
#: by several per cent on some samples, HEST issue #122).
PIXEL_SIZE_WARN_FRACTION = 0.02
#: Warn when a pixel size disagrees with ``spot_diameter_fullres`` by more than this (it is good to a few per cent).
SPOT_DIAMETER_WARN_FRACTION = 0.05
#: Spot diameter that HEST-1k's ``spot_diameter_fullres`` measures (HEST ``register_downscale_img(spot_size=55.)``).
HEST_SPOT_DIAMETER_FULLRES_UM = 55.0
#: Median nearest-neighbour spacing (µm) above which "cells" look like spots (cells are ~5-20 µm apart).
CELL_SPACING_WARN_UM = 40.0
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids")
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol", "gene_names")
#: The manifest's ``lattice_source`` for each way :func:`~hescape.data.readers.visium.visium_um_per_px_from_spots`
#: measures the pixel size.
_SPOT_SCALE_SOURCES = {"lattice": "obs array_row/array_col, 100 µm pitch",
                       "spacing": "median nearest-neighbour spot spacing, 100 µm pitch"}


def import_anndata():
    """The ``anndata`` module, or a :class:`HescapeDataError` naming the extra to install."""
    try:
        import anndata
        import pandas  # noqa: F401 - anndata needs it; named in the message if absent
    except ImportError as e:
        msg = (f"reading .h5ad files: expected the anndata and pandas packages, found {e.name or 'one'} missing; "
               f"install them with {ANNDATA_HINT}")
        raise HescapeDataError(msg) from None
    return anndata


def read_h5ad(path: str | os.PathLike, *, backed: bool = False):
    """An AnnData read from ``path`` (fully in memory, or ``backed="r"``); one-line errors for a bad file."""
    anndata = import_anndata()
    path = Path(path)
    if not path.is_file():
        msg = f"expected an AnnData .h5ad file at {path}, found no such file"
        raise InputFormatError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's deprecation chatter about old files is not the user's problem
            return anndata.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        msg = f"{path}: expected an AnnData .h5ad file, found one anndata cannot read ({type(e).__name__}: {brief(e, 100)})"
        raise InputFormatError(msg) from None


def spatial_px(adata, where) -> np.ndarray:
    """``obsm["spatial"][:, :2]`` as ``(n_obs, 2)`` float64 (x, y image pixels); refused when absent or not finite."""
    keys = list(adata.obsm.keys())
    if "spatial" not in keys:
        cols = [c for c in ("pxl_col_in_fullres", "pxl_row_in_fullres") if c in adata.obs.columns]
        fix = ("adata.obsm['spatial'] = adata.obs[['pxl_col_in_fullres', 'pxl_row_in_fullres']].to_numpy()"
               if len(cols) == 2 else "adata.obsm['spatial'] = an (n_obs, 2) array of x, y image pixels")
        msg = (f"{where}: expected positions in obsm['spatial'] (x, y in pixels of the H&E image, as scanpy and "
               f"squidpy write them), found obsm keys {keys}; add them ({fix}) and save the file again")
        raise InputFormatError(msg)
    xy = np.asarray(adata.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[0] != adata.n_obs or xy.shape[1] < 2 or xy.dtype.kind not in "iuf":
        msg = (f"{where}: expected obsm['spatial'] to be a numeric (n_obs, 2) array of x, y pixels, found shape "
               f"{xy.shape} of dtype {xy.dtype}")
        raise InputFormatError(msg)
    xy = xy[:, :2].astype(np.float64)
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        msg = (f"{where}: expected finite positions in obsm['spatial'], found {int(bad.sum())} observations with "
               "NaN/inf; drop them (adata = adata[np.isfinite(adata.obsm['spatial']).all(1)]) and save again")
        raise InputFormatError(msg)
    return xy


def anndata_counts(adata, where, *, layer: str | None = None,
                   allow_non_integer: bool = False) -> tuple[sp.csr_matrix, str]:
    """Raw counts ``(n_obs, n_vars)`` float32 CSR and where they came from (``layers['counts']``, ``X``, ...).

    ``layer``: ``None`` (``layers["counts"]`` when present, else ``X``), ``"X"`` or a layer name.
    """
    layers = list(adata.layers.keys())
    if layer is None:
        layer = "counts" if "counts" in layers else "X"
    if layer == "X":
        m, name = adata.X, "X"
    elif layer in layers:
        m, name = adata.layers[layer], f"layers[{layer!r}]"
    else:
        msg = f"{where}: expected the layer {layer!r} (--layer), found layers {layers}; choose one of them or X"
        raise InputFormatError(msg)
    if m is None:
        msg = f"{where}: expected a count matrix in {name}, found none; put the raw counts in layers['counts']"
        raise InputFormatError(msg)
    if not sp.issparse(m):
        m = np.asarray(m)
        if m.dtype.kind not in "iufb":
            msg = f"{where}: expected numeric counts in {name}, found dtype {m.dtype}"
            raise InputFormatError(msg)
    m = sp.csr_matrix(m)
    vals = m.data
    if vals.dtype.kind == "f" and not allow_non_integer:
        finite = vals[np.isfinite(vals)]
        frac = finite != np.floor(finite)
        if frac.any():
            ex = [round(float(x), 4) for x in np.unique(finite[frac])[:3]]
            others = [k for k in layers if k != layer]
            msg = (f"{where}: expected raw integer counts in {name}, found {int(frac.sum())} non-integer values "
                   f"(e.g. {ex}: log-normalised or scaled data); store the raw counts in layers['counts'] "
                   "(read before X), or name the layer holding them with --layer"
                   f"{f' (layers here: {others})' if others else ''}; --allow-non-integer-counts if the values "
                   "are counts by design")
            raise InputFormatError(msg)
    check_counts(vals, f"{where}: {name}", allow_non_integer=True)  # NaN/inf and negatives, whatever the flag
    return sp.csr_matrix(m, dtype=np.float32), name


def check_positions_on_image(img: SlideImage, image_name, xy_px: np.ndarray, where) -> None:
    """Refuse positions beyond the image (by more than 2 %): they are not in this image's pixels.

    The image is closed before raising.
    """
    h, w = img.shape
    if len(xy_px) and (xy_px[:, 0].max() > w * 1.02 or xy_px[:, 1].max() > h * 1.02 or xy_px.min() < -0.02 * max(h, w)):
        img.close()
        msg = (f"{where}: expected obsm['spatial'] in pixels of {image_name} ({w}×{h} px), found positions reaching "
               f"x = {xy_px[:, 0].min():.0f}…{xy_px[:, 0].max():.0f}, y = {xy_px[:, 1].min():.0f}…"
               f"{xy_px[:, 1].max():.0f}; pass the full-resolution image the positions refer to (a downsampled one "
               "needs its scale factor: --image hires/lowres with uns['spatial'])")
        raise InputFormatError(msg)


def _looks_ensembl(values) -> bool:
    vals = [str(v) for v in values[:200]]
    return bool(vals) and sum(v.upper().startswith("ENS") for v in vals) > 0.8 * len(vals)


def anndata_genes(adata, where) -> tuple[list[str], list[str], np.ndarray]:
    """Gene symbols, gene ids and the columns to keep (``(n_vars,)`` bool: Gene Expression features)."""
    var = adata.var
    names = [str(v) for v in adata.var_names]
    keep = np.ones(len(names), dtype=bool)
    if "feature_types" in var.columns:
        keep = np.asarray(var["feature_types"].astype(str) == "Gene Expression")
        if not keep.any():
            kinds = sorted(set(var["feature_types"].astype(str)))[:5]
            msg = f"{where}: expected 'Gene Expression' features in var['feature_types'], found only {kinds}"
            raise InputFormatError(msg)
    id_col = next((c for c in _ID_COLUMNS if c in var.columns), None)
    sym_col = next((c for c in _SYMBOL_COLUMNS if c in var.columns), None)
    if _looks_ensembl(names) and sym_col is not None:
        symbols = [str(v) for v in var[sym_col]]
        ids = [str(v) for v in var[id_col]] if id_col is not None else names
    else:
        symbols = names
        ids = [str(v) for v in var[id_col]] if id_col is not None else names
    return symbols, ids, keep


def visium_lattice_from_obs(obs, xy_px: np.ndarray, where) -> LatticeFit | None:
    """The Visium lattice fitted on ``obs["array_col"/"array_row"]`` and ``xy_px``; None without those columns.

    Raises
    ------
    InputFormatError
        Non-integer array indices, a lattice that is not Visium's hexagonal array, or ``obsm["spatial"]`` columns
        in (row, column) order (the array appears transposed and mirrored).
    """
    if "array_row" not in obs.columns or "array_col" not in obs.columns:
        return None
    rc = np.column_stack([np.asarray(obs["array_row"], dtype=np.float64), np.asarray(obs["array_col"], np.float64)])
    if not np.isfinite(rc).all() or (rc != np.round(rc)).any():
        msg = f"{where}: expected integer obs['array_row'] and obs['array_col'] (Visium array indices), found other values"
        raise InputFormatError(msg)
    fit, problem = fit_visium_lattice(rc[:, 1].astype(np.int64), rc[:, 0].astype(np.int64), xy_px, where)
    if problem == "shape":
        msg = (f"{where}: expected obs['array_row'/'array_col'] of Visium's hexagonal spot array (100 µm between "
               f"neighbours), found another lattice (µm/px along rows / across rows = {fit.anisotropy:.3f}, axes "
               f"skewed by {fit.skew_deg:.1f}°); if the observations are Visium HD bins or cells, pass --level cells")
        raise InputFormatError(msg)
    if problem == "transposed":
        msg = (f"{where}: expected obsm['spatial'] as (x = image column, y = image row), found the columns swapped "
               "(array_col runs down the image and the array appears mirrored); use "
               "adata.obsm['spatial'] = adata.obsm['spatial'][:, ::-1] and save again")
        raise InputFormatError(msg)
    return fit


@dataclass
class PixelSize:
    """µm per pixel of an image, where it came from, and its cross-checks (``record`` goes into the manifest)."""

    um_per_px: float
    source: str
    record: dict


def _library(adata, where, library_id: str | None) -> tuple[str | None, dict]:
    """``(library_id, uns['spatial'][library_id])``, or ``(None, {})`` when ``uns['spatial']`` is absent."""
    spatial = adata.uns.get("spatial") if hasattr(adata.uns, "get") else None
    if not isinstance(spatial, dict) or not spatial:
        if library_id is not None:
            msg = f"{where}: expected uns['spatial'][{library_id!r}] (--library-id), found no uns['spatial']"
            raise InputFormatError(msg)
        return None, {}
    libs = [k for k, v in spatial.items() if isinstance(v, dict)]
    if library_id is None:
        if len(libs) > 1:
            msg = (f"{where}: expected one library in uns['spatial'], found {len(libs)} ({libs[:5]}); choose one "
                   "with --library-id")
            raise InputFormatError(msg)
        if not libs:
            return None, {}
        library_id = libs[0]
    if library_id not in libs:
        msg = f"{where}: expected uns['spatial'][{library_id!r}] (--library-id), found libraries {libs[:10]}"
        raise InputFormatError(msg)
    return library_id, spatial[library_id]


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _scalefactor_um_per_px(sf: dict) -> tuple[float | None, str]:
    """µm/px implied by the scale factors (Visium HD ``microns_per_pixel``, or ``spot_diameter_fullres``)."""
    hd = _positive(sf.get("microns_per_pixel"))
    if hd is not None:
        return hd, "scalefactors microns_per_pixel (Visium HD)"
    d = _positive(sf.get("spot_diameter_fullres"))
    if d is None:
        return None, ""
    if "tissue_downscaled_fullres_scalef" in sf:  # HEST-1k: spot_diameter_fullres = 55 µm / pixel size
        return HEST_SPOT_DIAMETER_FULLRES_UM / d, "scalefactors spot_diameter_fullres (HEST-1k: a 55 µm spot)"
    return SPOT_DIAMETER_FULLRES_UM / d, "scalefactors spot_diameter_fullres (Space Ranger: a 65 µm spot)"


def _rel(a: float, b: float) -> float:
    return a / b - 1.0


def choose_pixel_size(where, *, given: float | None, lattice: tuple[float, str] | None,
                      scalefactor: tuple[float | None, str]) -> PixelSize:
    """The pixel size: the user's, else the lattice's, else the scale factors'; cross-checks warn (or refuse)."""
    sf_mpp, sf_src = scalefactor
    rec: dict = {}
    if lattice is not None:
        rec["um_per_px_lattice"], rec["lattice_source"] = round(lattice[0], 8), lattice[1]
    if sf_mpp is not None:
        rec["um_per_px_scalefactors"], rec["scalefactors_source"] = round(sf_mpp, 8), sf_src
    warn: list[str] = []
    if given is not None:
        mpp, src = float(given), "--image-um-per-px (given)"
        if lattice is not None and abs(_rel(mpp, lattice[0])) > PIXEL_SIZE_WARN_FRACTION:
            warn.append(f"the given {mpp:.5g} µm/px disagrees with the spot lattice ({lattice[1]}: {lattice[0]:.5g} "
                        f"µm/px) by {_rel(mpp, lattice[0]):+.1%}; using the given value")
        elif lattice is None and sf_mpp is not None and abs(_rel(mpp, sf_mpp)) > SPOT_DIAMETER_WARN_FRACTION:
            warn.append(f"the given {mpp:.5g} µm/px disagrees with {sf_src} ({sf_mpp:.5g} µm/px) by "
                        f"{_rel(mpp, sf_mpp):+.1%}; using the given value")
    elif lattice is not None:
        mpp, src = lattice
        if sf_mpp is not None:
            diff = _rel(sf_mpp, mpp)
            if abs(math.log(1 + diff)) > math.log(1 + SCALE_REFUSE_FRACTION):
                msg = (f"{where}: expected {sf_src} to agree with the spot lattice (spots 100 µm apart), found "
                       f"{sf_mpp:.4g} vs {mpp:.4g} µm/px ({diff:+.0%}); scale factors and positions come from "
                       "different runs or images: fix uns['spatial'], or give --image-um-per-px")
                raise InputFormatError(msg)
            if abs(diff) > SPOT_DIAMETER_WARN_FRACTION:
                warn.append(f"the spot lattice gives {mpp:.5g} µm/px, {sf_src} gives {sf_mpp:.5g} ({diff:+.1%}); "
                            "using the lattice (spots are 100 µm apart by design)")
    elif sf_mpp is not None:
        mpp, src = sf_mpp, sf_src
    else:
        msg = (f"{where}: expected the µm per pixel of the image that obsm['spatial'] refers to, found no scale (no "
               "--image-um-per-px, no uns['spatial'][library]['scalefactors'], no Visium spot lattice); pass "
               "--image-um-per-px U (e.g. the scanner's µm/px of the H&E image)")
        raise InputFormatError(msg)
    rec.update(um_per_px=round(float(mpp), 8), um_per_px_source=src)
    if warn:
        rec["pixel_size_warning"] = f"{where}: " + "; ".join(warn)
        warnings.warn(rec["pixel_size_warning"], UserWarning, stacklevel=3)
    return PixelSize(float(mpp), src, rec)


def _is_visium_hd(adata, sf: dict) -> bool:
    if "bin_size_um" in sf or "microns_per_pixel" in sf:
        return True
    return adata.n_obs > 0 and bool(HD_BARCODE.match(str(adata.obs_names[0])))


def detect_level(adata, sf: dict) -> tuple[str, str]:
    """``(level, reason)`` for ``level="auto"`` (see the module docstring)."""
    if _is_visium_hd(adata, sf):
        return "cells", "Visium HD bins (bin scale factors or s_XXXum_ barcodes): pooled like cells"
    if "array_row" in adata.obs.columns and "array_col" in adata.obs.columns:
        return "spots", "obs has array_row/array_col (Visium spots)"
    if "spot_diameter_fullres" in sf:
        return "spots", "uns['spatial'] scale factors have spot_diameter_fullres (Visium spots)"
    return "cells", "no Visium spot markers (array_row/array_col, spot_diameter_fullres): cells"


def _uns_image(lib: dict, which: str, where) -> tuple[SlideImage, float]:
    images = lib.get("images") if isinstance(lib.get("images"), dict) else {}
    sf = lib.get("scalefactors") if isinstance(lib.get("scalefactors"), dict) else {}
    key = f"tissue_{which}_scalef"
    if which not in images or _positive(sf.get(key)) is None:
        msg = (f"{where}: expected uns['spatial'][library]['images'][{which!r}] and scalefactors[{key!r}] to use "
               f"--image {which}, found images {sorted(images)} and scale factors {sorted(sf)}; pass the H&E image file")
        raise InputFormatError(msg)
    arr = np.asarray(images[which])
    if arr.dtype.kind == "f":  # scanpy reads PNGs as floats in [0, 1]
        arr = np.clip(np.rint(arr * (255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0)), 0, 255)
        arr = arr.astype(np.uint8)
    return ArrayImage(arr, name=f"{where}: uns['spatial'] {which} image"), float(sf[key])


def read_anndata(path: str | os.PathLike, *, image: str | os.PathLike | None, image_um_per_px: float | None = None,
                 level: str = "auto", layer: str | None = None, library_id: str | None = None,
                 allow_non_integer_counts: bool = False, name: str | None = None) -> SpatialSample:
    """Read an ``.h5ad`` and its H&E image: positions (µm), raw counts, genes and the image's µm → px affine.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    image
        The H&E image whose pixels ``obsm["spatial"]`` is in (TIFF read lazily; PNG/JPEG in memory), or
        ``"hires"``/``"lowres"`` for the images in ``uns["spatial"][library]["images"]`` (Space Ranger's
        downsampled PNGs; ``obsm["spatial"]`` is then in full-resolution pixels and ``tissue_{hires,lowres}_scalef``
        maps them onto the PNG).
    image_um_per_px
        µm per pixel of ``obsm["spatial"]``'s pixels (full resolution); default: measured (module docstring).
    level
        ``"spots"``, ``"cells"`` or ``"auto"`` (module docstring).
    layer
        The count layer (``"X"`` or a ``layers`` key); default ``layers["counts"]`` when present, else ``X``.
    library_id
        The ``uns["spatial"]`` library, when there are several.
    allow_non_integer_counts
        Accept fractional counts (never negative or NaN ones).
    name
        Sample name (default: the file name without ``.h5ad``).

    Returns
    -------
    SpatialSample
        ``kind`` is ``"spots"`` (55 µm Visium spots, kept as they are) or ``"cells"`` (points to pool);
        ``obs_ids`` are the obs names; ``metadata`` records the level, the count source and the pixel size with
        its cross-checks.

    Raises
    ------
    InputFormatError
        No ``obsm["spatial"]``, normalised counts, no pixel size, a lattice that is not Visium's, positions beyond
        a full-resolution image, a blank image; :class:`HescapeDataError` when anndata is not installed.
    """
    if level not in LEVELS:
        msg = f"--level: expected one of {list(LEVELS)}, found {level!r}"
        raise HescapeDataError(msg)
    if image is None:
        msg = ("no image given: expected the H&E image whose pixels obsm['spatial'] is in (--image FILE), or "
               "'hires'/'lowres' for the images in uns['spatial']; found none")
        raise InputFormatError(msg)
    if image_um_per_px is not None and _positive(image_um_per_px) is None:
        msg = f"--image-um-per-px: expected a positive number of µm per image pixel, found {image_um_per_px!r}"
        raise HescapeDataError(msg)
    path = Path(path)
    adata = read_h5ad(path)
    where = path
    if adata.n_obs == 0:
        msg = f"{where}: expected observations (spots or cells), found none"
        raise InputFormatError(msg)
    xy_px = spatial_px(adata, where)
    lib_id, lib = _library(adata, where, library_id)
    sf = lib.get("scalefactors") if isinstance(lib.get("scalefactors"), dict) else {}
    detected, reason = detect_level(adata, sf)
    level_used = detected if level == "auto" else level
    counts, count_src = anndata_counts(adata, where, layer=layer, allow_non_integer=allow_non_integer_counts)
    genes, gene_ids, keep_var = anndata_genes(adata, where)
    if not keep_var.all():
        counts = counts[:, np.flatnonzero(keep_var)].tocsr()
        genes = [g for g, k in zip(genes, keep_var, strict=True) if k]
        gene_ids = [g for g, k in zip(gene_ids, keep_var, strict=True) if k]

    lattice = None
    if level_used == "spots":
        scale = visium_um_per_px_from_spots(xy_px, visium_lattice_from_obs(adata.obs, xy_px, where), where=where,
                                            required=False)
        if scale is not None:
            lattice = (scale.um_per_px, _SPOT_SCALE_SOURCES[scale.method])
    px = choose_pixel_size(where, given=image_um_per_px, lattice=lattice, scalefactor=_scalefactor_um_per_px(sf))
    med_um = spacing_px(xy_px)[0] * px.um_per_px
    if level_used == "spots" and lattice is None and not abs(med_um / VISIUM_PITCH_UM - 1) < 0.1:
        msg = (f"{where}: expected Visium spots 100 µm apart (--level spots), found a median spacing of "
               f"{med_um:.3g} µm at {px.um_per_px:.4g} µm/px; these are not Visium spots (--level cells pools "
               "them into pseudo-spots) or the pixel size is wrong (--image-um-per-px)")
        raise InputFormatError(msg)
    meta = {"level": level_used, "level_detected": reason if level == "auto" else f"given ({level})",
            "counts_from": count_src, "library_id": lib_id, **px.record}
    if level_used == "cells" and med_um > CELL_SPACING_WARN_UM:
        meta["level_warning"] = (f"{where}: observations pooled as cells are {med_um:.0f} µm apart (median), "
                                 "more like spots than cells; pass --level spots to keep Visium spots as they are")
        warnings.warn(meta["level_warning"], UserWarning, stacklevel=2)

    if str(image) in ("hires", "lowres"):
        img, scalef = _uns_image(lib, str(image), where)
        img_path: str = f"uns['spatial'][{lib_id!r}]['images'][{str(image)!r}]"
    else:
        img_path = str(image)
        img, scalef = open_image(image), 1.0
        check_positions_on_image(img, Path(image).name, xy_px, where)
    try:
        check_not_blank(img, img_path)
    except InputFormatError:
        img.close()
        raise
    meta["image"] = img_path
    return SpatialSample(
        name=name or path.name.removesuffix(".h5ad"),
        obs_ids=np.asarray([str(o) for o in adata.obs_names], dtype=object),
        xy_um=xy_px * px.um_per_px,
        counts=counts,
        genes=genes,
        gene_ids=gene_ids,
        image=img,
        um_to_px=scale_matrix(scalef / px.um_per_px),
        kind=level_used,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM if level_used == "spots" else None,
        metadata=meta,
    )
