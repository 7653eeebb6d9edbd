"""Read a Visium HD Space Ranger output: one bin size of ``binned_outputs/``, bins as points in µm.

Layout (formats fact sheet §5; Space Ranger ≥ 3; spatialdata-io's ``visium_hd`` reader checks the same
invariants)::

    outs/binned_outputs/square_002um/   square_008um/   square_016um/
        filtered_feature_bc_matrix.h5 (or raw_…, or the MEX folder)
        spatial/tissue_positions.parquet   barcode, in_tissue, array_row, array_col,
                                           pxl_row_in_fullres, pxl_col_in_fullres (as Visium)
        spatial/scalefactors_json.json     bin_size_um, microns_per_pixel, spot_diameter_fullres (= the bin
                                           size in full-resolution px), tissue_{hires,lowres}_scalef, ...
        spatial/tissue_{hires,lowres}_image.png

Barcodes look like ``s_008um_00301_00175-1`` (bin size, array row, array column). Bins are squares of
``bin_size_um`` that tile the capture area with no gaps, so bin ``(array_row, array_col)`` has its centre
``bin_size_um`` from each of its four neighbours.

Pixel size: as for Visium spots (:mod:`hescape.data.readers.visium`), measured from the lattice: a robust
affine fit of the bin centres' pixel positions against ``(array_col, array_row)``, one step = ``bin_size_um``.
``microns_per_pixel`` from the scale factors is the cross-check: a warning above 5 % disagreement, a refusal
above 25 % (scale factors of another run or bin size). Tissue µm are full-resolution pixels times the lattice
pixel size (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``), as for Visium.

Bin size: 8 µm by default. It is 10x's recommended size for analysis; a 55 µm HESCAPE pseudo-spot (a hexagon
of 1,965 µm²) holds about 31 bins of 8 µm, so pooling bins whose centre lies inside the spot reproduces the
spot's area to a few per cent, while 16 µm bins (about 8 per spot) quantise its outline coarsely. 2 µm bins
are exact to the micrometre and are allowed, at about 16× the rows to read (some 5–10 million bins under
tissue and ~10⁸ non-zero counts for a full capture area, a few GB of memory).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

from ..errors import InputFormatError
from .spaceranger import LatticeFit, SpotPositions, fit_lattice, read_positions_file
from .tenx import read_10x_matrix, read_json
from .visium import _find_matrix, open_checked_image, sample_of_matrix, scalefactor, spots_of_matrix, with_known_tissue
from .xenium import SpatialSample

__all__ = ["HD_BIN_SIZES_UM", "DEFAULT_BIN_SIZE_UM", "find_bin_folder", "read_visium_hd", "hd_lattice"]

#: Bin sizes Space Ranger writes under ``binned_outputs/`` (µm; 10x Visium HD outputs).
HD_BIN_SIZES_UM = (2, 8, 16)
#: Default bin size to pool (µm): 10x's recommended analysis bin; see the module docstring.
DEFAULT_BIN_SIZE_UM = 8
#: Warn / refuse when the bin lattice and ``microns_per_pixel`` disagree by more than these fractions.
SCALE_WARN_FRACTION = 0.05
SCALE_REFUSE_FRACTION = 0.25

_FOLDER = re.compile(r"^square_(\d{3})um$")
_BARCODE = re.compile(r"^s_(\d{3})um_")
_NOT_HD = "for Visium (55 µm spots) use `hescape-data build visium`"


def _bin_dirs(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.is_dir() and _FOLDER.match(p.name)) if base.is_dir() else []


def find_bin_folder(path: str | os.PathLike, bin_size_um: int | None = None) -> Path:
    """The ``square_XXXum`` folder to read: ``path`` itself, or under ``path/binned_outputs/`` or ``path/``.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder, its ``binned_outputs/`` folder, or one bin folder.
    bin_size_um
        2, 8 or 16 µm; ``None`` means 8 µm, or whatever bin folder ``path`` is.

    Raises
    ------
    InputFormatError
        No such directory, no bin folder of that size, or a bin folder of another size than asked for.
    """
    path = Path(path)
    if not path.is_dir():
        msg = (f"expected a Visium HD Space Ranger outs/ folder (or one binned_outputs/square_XXXum folder) at {path}, "
               "found no such directory")
        raise InputFormatError(msg)
    if bin_size_um is not None and int(bin_size_um) not in HD_BIN_SIZES_UM:
        msg = f"Visium HD bin size: expected one of {list(HD_BIN_SIZES_UM)} µm, found {bin_size_um!r}"
        raise InputFormatError(msg)
    m = _FOLDER.match(path.name)
    direct = not (path / "binned_outputs").is_dir() and (path / "spatial" / "tissue_positions.parquet").is_file()
    if m or direct:
        if m and bin_size_um is not None and int(m.group(1)) != int(bin_size_um):
            msg = (f"{path}: expected the {int(bin_size_um)} µm bins (--bin-size {int(bin_size_um)}), found the "
                   f"{int(m.group(1))} µm bin folder; point at square_{int(bin_size_um):03d}um or drop --bin-size")
            raise InputFormatError(msg)
        return path
    base = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
    have = _bin_dirs(base)
    if not have:
        msg = (f"{path}: expected a Visium HD output (binned_outputs/square_008um/ with spatial/"
               f"tissue_positions.parquet), found no bin folder; {_NOT_HD}")
        raise InputFormatError(msg)
    size = DEFAULT_BIN_SIZE_UM if bin_size_um is None else int(bin_size_um)
    folder = base / f"square_{size:03d}um"
    if not folder.is_dir():
        msg = (f"{base}: expected the bin folder square_{size:03d}um, found only {have}; choose one of those with "
               "--bin-size")
        raise InputFormatError(msg)
    return folder


def _positive(sf: dict, key: str, path: Path, required: bool) -> float | None:
    if sf.get(key) is None and not required:
        return None
    return scalefactor(sf, key, path, hint="is this a Visium HD bin folder?")


def _positions_path(spatial: Path) -> Path:
    for name in ("tissue_positions.parquet", "tissue_positions.csv"):
        if (spatial / name).is_file():
            return spatial / name
    msg = (f"expected spatial/tissue_positions.parquet in {spatial.parent}, found none; point at a Visium HD "
           "binned_outputs/square_XXXum folder (or the outs/ folder above it)")
    raise InputFormatError(msg)


def _bin_size(folder: Path, sf_path: Path, sf: dict, pos: SpotPositions) -> float:
    """The bin size (µm): folder name, ``bin_size_um`` and barcodes must agree where present."""
    found: dict[str, float] = {}
    if m := _FOLDER.match(folder.name):
        found["folder name"] = float(m.group(1))
    v = _positive(sf, "bin_size_um", sf_path, required=False)
    if v is not None:
        found["bin_size_um"] = v
    if m := _BARCODE.match(str(pos.barcodes[0])):
        found["barcodes"] = float(m.group(1))
    if not found:
        msg = (f"{sf_path}: expected 'bin_size_um' (or a square_XXXum folder, or s_XXXum_ barcodes), found none; "
               f"is this Visium HD? {_NOT_HD}")
        raise InputFormatError(msg)
    if len(set(found.values())) > 1:
        msg = (f"{folder}: expected one bin size, found {found} (µm); the folder mixes files of different bin "
               "sizes: take the folder unmodified from Space Ranger")
        raise InputFormatError(msg)
    return next(iter(found.values()))


def hd_lattice(pos: SpotPositions, bin_size_um: float) -> LatticeFit:
    """The square bin lattice fitted to ``pos`` (one array step = ``bin_size_um``); refuses any other shape."""
    fit = fit_lattice(pos.array_col, pos.array_row, pos.xy_px, step_um=(bin_size_um, bin_size_um), probe=(1, 1),
                      pitch_um=bin_size_um, where=str(pos.path))
    if abs(math.log(fit.anisotropy)) > math.log(1.10) or abs(fit.skew_deg) > 5:
        msg = (f"{pos.path}: expected Visium HD's square bin lattice (equal steps along array rows and columns), "
               f"found µm/px along rows / across rows = {fit.anisotropy:.3f} and axes skewed by {fit.skew_deg:.1f}°; "
               f"a ratio near 0.577 or 1.73 is Visium's hexagonal spot array ({_NOT_HD}); otherwise the positions "
               "file is damaged")
        raise InputFormatError(msg)
    return fit


def _sample_name(folder: Path) -> str:
    for p in [folder, *folder.parents]:
        if not (_FOLDER.match(p.name) or p.name in ("binned_outputs", "outs", "")):
            return p.name
    return folder.name


def read_visium_hd(path: str | os.PathLike, *, image: str | os.PathLike | None, bin_size_um: int | None = None,
                   matrix: str = "filtered", in_tissue_only: bool = True,
                   allow_non_integer_counts: bool = False) -> SpatialSample:
    """Read one bin size of a Visium HD output: in-tissue bin centres (µm), Gene Expression counts and the image.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder, its ``binned_outputs/`` folder, or one ``square_XXXum`` folder.
    image
        The full-resolution microscope image given to Space Ranger (TIFF read lazily), or ``"hires"`` /
        ``"lowres"`` for the PNGs in the bin folder's ``spatial/``.
    bin_size_um
        2, 8 or 16; default 8 (or the bin folder ``path`` points at).
    matrix
        ``"filtered"`` (bins under tissue) or ``"raw"``.
    in_tissue_only
        Keep only bins with ``in_tissue = 1``.
    allow_non_integer_counts
        Passed to :func:`~hescape.data.readers.tenx.read_10x_matrix` (raw integer counts are required otherwise).

    Returns
    -------
    SpatialSample
        ``kind="bins"``; ``xy_um`` are bin centres in µm (full-resolution px × the lattice's µm/px); metadata
        holds the bin size, both pixel sizes and the lattice fit.

    Raises
    ------
    InputFormatError
        Missing files, inconsistent bin sizes, a lattice that is not square, a pixel size more than 25 % off
        ``microns_per_pixel``, matrix barcodes absent from the positions, no bins under tissue.
    """
    if image is None:
        msg = ("no image given: expected the full-resolution H&E image given to Space Ranger (--image FILE) or "
               "'hires'/'lowres' for the PNGs in spatial/; found none")
        raise InputFormatError(msg)
    folder = find_bin_folder(path, bin_size_um)
    spatial = folder / "spatial"
    sf_path = spatial / "scalefactors_json.json"
    sf = read_json(sf_path, "point at a Visium HD binned_outputs/square_XXXum folder (or the outs/ folder above it)")
    if not isinstance(sf, dict):
        msg = f"{sf_path}: expected a JSON object of scale factors, found a {type(sf).__name__}"
        raise InputFormatError(msg)
    pos = read_positions_file(_positions_path(spatial), visium_hd=True)
    bin_um = _bin_size(folder, sf_path, sf, pos)
    if bin_size_um is not None and float(bin_size_um) != bin_um:
        msg = (f"{folder}: expected {int(bin_size_um)} µm bins (--bin-size {int(bin_size_um)}), found {bin_um:g} µm "
               "bins; point at the matching square_XXXum folder or drop --bin-size")
        raise InputFormatError(msg)
    fit = hd_lattice(pos, bin_um)
    um_per_px = fit.um_per_px
    mpp_file = _positive(sf, "microns_per_pixel", sf_path, required=False)
    meta: dict = {"bin_size_um": bin_um, "bin_folder": str(folder), "um_per_fullres_px": um_per_px,
                  "um_per_fullres_px_source": f"bin lattice ({bin_um:g} µm pitch)", "microns_per_pixel": mpp_file,
                  "lattice": fit.to_dict()}
    if mpp_file is None:
        meta["scale_warning"] = (f"{sf_path}: no 'microns_per_pixel' to cross-check the bin lattice's "
                                 f"{um_per_px:.4g} µm/px; using the lattice")
        warnings.warn(meta["scale_warning"], UserWarning, stacklevel=2)
    else:
        diff = mpp_file / um_per_px - 1.0
        meta["scale_disagreement"] = round(diff, 6)
        if abs(math.log(1 + diff)) > math.log(1 + SCALE_REFUSE_FRACTION):
            msg = (f"{sf_path}: expected microns_per_pixel to match the {bin_um:g} µm bin lattice "
                   f"({um_per_px:.4g} µm/px), found {mpp_file:.4g} ({diff:+.0%}); the scale factors belong to "
                   "another run or bin size: take the bin folder unmodified from Space Ranger")
            raise InputFormatError(msg)
        if abs(diff) > SCALE_WARN_FRACTION:
            meta["scale_warning"] = (f"{sf_path}: the {bin_um:g} µm bin lattice gives {um_per_px:.4g} µm per "
                                     f"full-resolution pixel, microns_per_pixel says {mpp_file:.4g} ({diff:+.1%}); "
                                     "using the lattice")
            warnings.warn(meta["scale_warning"], UserWarning, stacklevel=2)
    fm = read_10x_matrix(_find_matrix(folder, matrix), allow_non_integer=allow_non_integer_counts).gene_expression()
    barcodes = fm.barcodes
    idx, xy_px = spots_of_matrix(folder, barcodes.tolist(), pos, in_tissue_only, "bins")
    img, img_path, um_to_px = open_checked_image(folder, image, sf, um_per_px, xy_px)
    meta.update({"n_bins": int(len(idx)), "image": str(img_path), "scalefactors": sf, "positions": str(pos.path)})
    s = sample_of_matrix(_sample_name(folder.resolve()), fm, idx, xy_px * um_per_px, img, um_to_px, kind="bins",
                         spot_diameter_um=None, metadata=meta)
    return with_known_tissue(s, pos, um_per_px)
