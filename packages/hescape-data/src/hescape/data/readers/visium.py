"""Read a Space Ranger (Visium) ``outs/`` folder.

Files used (see the formats fact sheet §2): ``filtered_feature_bc_matrix.h5`` (or ``raw_…``, or the MEX folder),
``spatial/tissue_positions.csv`` (Space Ranger ≥ 2, with a header) or ``spatial/tissue_positions_list.csv``
(< 2, no header); both are ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``;
``spatial/scalefactors_json.json`` and an image.

Pixel size: measured from the spot lattice. Visium spots are 55 µm discs 100 µm centre to centre on a hexagonal
("orange crate") array: in one ``array_row``, spots two ``array_col`` apart are 100 µm apart, and adjacent rows
are 100·√3/2 µm apart (10x Visium spec; HEST ``inter_spot_dist=100.``). A robust affine fit of the pixel
positions against ``(array_col, array_row)`` (:func:`~hescape.data.readers.spaceranger.fit_lattice`, over every
row of the positions file) gives µm per full-resolution pixel. ``spot_diameter_fullres`` is *not* the 55 µm
spot: Space Ranger defines it as the pixel diameter of a theoretical 65 µm spot, so ``65 / spot_diameter_fullres``
is only recorded as a cross-check (a warning above 5 % disagreement; real outputs disagree by a few per cent).
The old rule ``55 / spot_diameter_fullres`` was 18 % too small (65/55). Readers of spots without array indices
(AnnData, HEST-1k) measure the same pitch from the spots' nearest-neighbour spacing instead, under one acceptance
rule (:func:`visium_um_per_px_from_spots`: at least 7 spots, 80 % of them with their nearest neighbour within 5 %
of the median spacing).

Tissue µm are full-resolution pixels times that size, with x = ``pxl_col_in_fullres`` and
y = ``pxl_row_in_fullres``. The image is the user's full-resolution image (not part of ``outs/``), or the
``hires`` / ``lowres`` PNG with ``tissue_{hires,lowres}_scalef`` (full-res px → that image's px).

Visium HD outputs (bins, not spots) are refused here with a pointer to ``hescape-data build visium-hd``
(:mod:`hescape.data.readers.visium_hd`): a ``binned_outputs/`` folder, ``tissue_positions.parquet``,
``bin_size_um``/``microns_per_pixel`` in the scale factors, ``s_008um_…`` barcodes, or a square lattice.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFormatError
from ..patches import scale_matrix
from .image import ArrayImage, SlideImage, open_image
from .spaceranger import HD_HINT, LatticeFit, SpotPositions, fit_lattice, read_positions_file
from .tenx import read_10x_matrix, read_json
from .xenium import SpatialSample

__all__ = ["VISIUM_SPOT_DIAMETER_UM", "VISIUM_PITCH_UM", "SPOT_DIAMETER_FULLRES_UM", "read_visium",
           "read_positions", "read_scalefactors", "scalefactor", "IMAGE_SCALEFACTORS", "visium_lattice",
           "fit_visium_lattice", "SpotScale", "spacing_px",
           "visium_um_per_px_from_spots", "SPACING_MIN_SPOTS", "SPACING_REGULAR_FRACTION", "SPACING_TOLERANCE"]

#: Diameter of a Visium capture spot, µm (10x Visium spec; HEST ``spot_diameter=55.``).
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Centre-to-centre distance of neighbouring Visium spots, µm (10x Visium spec; HEST ``inter_spot_dist=100.``).
VISIUM_PITCH_UM = 100.0
#: The spot that ``spot_diameter_fullres`` measures: "a theoretical 65 µm spot" (Space Ranger output docs).
SPOT_DIAMETER_FULLRES_UM = 65.0
#: Warn when the lattice and ``65 / spot_diameter_fullres`` disagree by more than this fraction.
SCALE_WARN_FRACTION = 0.05
#: Refuse when they disagree by more than this fraction (pitch nowhere near 100 µm: bins, or another run's files).
SCALE_REFUSE_FRACTION = 0.25
#: Refuse when µm/px along array columns and across rows differ by more than this fraction (not a hex lattice).
ANISOTROPY_REFUSE_FRACTION = 0.10
#: Fewest spots whose nearest-neighbour spacing is taken as the 100 µm pitch: one spot and its full ring of six
#: neighbours, the smallest patch of the hexagonal array (with 3-6 points the regularity test below is met by any
#: near-equilateral handful, e.g. three cells 10 µm apart).
SPACING_MIN_SPOTS = 7
#: A spot's nearest neighbour is "at the pitch" when its distance is within this fraction of the median spacing.
SPACING_TOLERANCE = 0.05
#: At least this fraction of the spots must have their nearest neighbour at the pitch (edge and missing spots of a
#: real array have theirs at the pitch too; cells or random points do not).
SPACING_REGULAR_FRACTION = 0.8


def _hd_refusal(where, found: str) -> InputFormatError:
    return InputFormatError(f"{where}: expected a Visium (55 µm spot) Space Ranger output, found {found}, "
                            f"which is Visium HD: {HD_HINT}")


def refuse_visium_hd(outs: Path) -> None:
    """Refuse a Visium HD output (or one converted from it) given to the Visium spot reader, in one line."""
    spatial = outs / "spatial"
    if (outs / "binned_outputs").is_dir():
        raise _hd_refusal(outs, "a binned_outputs/ folder")
    if outs.name.startswith("square_") and outs.name.endswith("um"):
        raise _hd_refusal(outs, f"a bin folder ({outs.name})")
    if (spatial / "tissue_positions.parquet").is_file():
        raise _hd_refusal(outs, "spatial/tissue_positions.parquet")
    sf_path = spatial / "scalefactors_json.json"
    if sf_path.is_file():
        sf = read_json(sf_path, "point at the Space Ranger outs/ folder")
        hd_keys = [k for k in ("bin_size_um", "microns_per_pixel") if isinstance(sf, dict) and k in sf]
        if hd_keys:
            raise _hd_refusal(sf_path, f"the bin keys {hd_keys}")


def read_positions(spatial: Path) -> tuple[Path, SpotPositions]:
    """The positions file in ``spatial/`` (``tissue_positions.csv`` or ``tissue_positions_list.csv``) as arrays.

    Every column is kept (``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``);
    a barcode listed twice is refused.
    """
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            break
    else:
        msg = (f"expected spatial/tissue_positions.csv or spatial/tissue_positions_list.csv in {spatial.parent}, "
               "found neither; point at the Space Ranger outs/ folder")
        raise InputFormatError(msg)
    return path, read_positions_file(path)


#: Scale factors that must be positive numbers wherever they are present (Space Ranger writes JSON numbers).
IMAGE_SCALEFACTORS = ("tissue_hires_scalef", "tissue_lowres_scalef")


def scalefactor(sf: dict, key: str, path: Path, *, required: bool = True, hint: str = "") -> float | None:
    """``sf[key]`` as a positive finite float; None when absent and not ``required``.

    Space Ranger writes every scale factor as a JSON number; a string, ``null``, a boolean, zero, a negative or a
    non-finite value means the file was edited or damaged, and would place every spot wrongly (or crash later).

    Raises
    ------
    InputFormatError
        The value is absent (``required``) or not a positive finite number; ``hint`` ends the message.
    """
    v = sf.get(key)
    if v is None and key not in sf and not required:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not v > 0:
        found = "none" if key not in sf else f"{v!r} ({type(v).__name__})"
        msg = (f"{path}: expected {key!r} to be a positive number (a JSON number, as Space Ranger writes it), "
               f"found {found}; {hint or 'take scalefactors_json.json unmodified from the Space Ranger run'}")
        raise InputFormatError(msg)
    return float(v)


def read_scalefactors(spatial: Path) -> dict:
    """``spatial/scalefactors_json.json``; ``spot_diameter_fullres`` and the image scale factors present must be
    positive numbers (:func:`scalefactor`)."""
    path = spatial / "scalefactors_json.json"
    sf = read_json(path, "point at the Space Ranger outs/ folder")
    if not isinstance(sf, dict):
        msg = f"{path}: expected a JSON object of scale factors, found a {type(sf).__name__}"
        raise InputFormatError(msg)
    scalefactor(sf, "spot_diameter_fullres", path)
    for key in IMAGE_SCALEFACTORS:
        scalefactor(sf, key, path, required=False)
    return sf


def fit_visium_lattice(array_col: np.ndarray, array_row: np.ndarray, xy_px: np.ndarray,
                       where) -> tuple[LatticeFit, str | None]:
    """Fit the Visium spot array to pixel positions and say what, if anything, is wrong with its shape.

    Parameters
    ----------
    array_col, array_row
        ``(n,)`` integer capture-array indices.
    xy_px
        ``(n, 2)`` spot centres, x then y, in pixels.
    where
        Named in :func:`~hescape.data.readers.spaceranger.fit_lattice`'s errors.

    Returns
    -------
    tuple
        The fit (:func:`~hescape.data.readers.spaceranger.fit_lattice` with Visium's steps: 50 µm per
        ``array_col``, 50·√3 µm per ``array_row``, i.e. neighbours :data:`VISIUM_PITCH_UM` = 100 µm apart) and
        ``None`` when it is Visium's hexagonal array, ``"shape"`` when it is not (µm/px along columns and rows
        differ by more than :data:`ANISOTROPY_REFUSE_FRACTION`, or the axes are skewed by more than 5°: a square
        lattice, Visium HD bins, damaged columns), or ``"transposed"`` when the array appears mirrored with
        ``array_col`` running down the image (x and y pixel columns swapped). Each reader words its own refusal.

    Raises
    ------
    InputFormatError
        From :func:`~hescape.data.readers.spaceranger.fit_lattice`: too few spots, a degenerate layout, positions
        that do not follow the array indices.
    """
    fit = fit_lattice(array_col, array_row, xy_px,
                      step_um=(VISIUM_PITCH_UM / 2, VISIUM_PITCH_UM * math.sqrt(3) / 2), probe=(2, 2),
                      pitch_um=VISIUM_PITCH_UM, where=str(where))
    a = fit.matrix[:, :2]
    if abs(math.log(fit.anisotropy)) > math.log(1 + ANISOTROPY_REFUSE_FRACTION) or abs(fit.skew_deg) > 5:
        return fit, "shape"
    if fit.mirrored and abs(a[1, 0]) > abs(a[0, 0]):
        return fit, "transposed"
    return fit, None


def visium_lattice(pos: SpotPositions) -> LatticeFit:
    """The Visium spot lattice fitted to ``pos``; refuses lattices that are not Visium's.

    Raises
    ------
    InputFormatError
        Swapped pixel columns (the array appears transposed: mirrored, with ``array_col`` running down the
        image), a square lattice (Visium HD bins) or any other shape than the 100 µm hexagonal array.
    """
    where = pos.path
    fit, problem = fit_visium_lattice(pos.array_col, pos.array_row, pos.xy_px, where)
    if problem == "shape":
        shape = ("a square lattice, as Visium HD bins" if abs(fit.anisotropy - math.sqrt(3)) < 0.15 * math.sqrt(3)
                 else "another lattice")
        msg = (f"{where}: expected Visium's hexagonal spot array (100 µm between neighbours in a row and across "
               f"rows), found {shape} (µm/px along rows / across rows = {fit.anisotropy:.3f}, axes skewed by "
               f"{fit.skew_deg:.1f}°); if this is Visium HD, {HD_HINT}; otherwise the positions file is damaged")
        raise InputFormatError(msg)
    if problem == "transposed":
        msg = (f"{where}: expected pxl_row_in_fullres in column 5 and pxl_col_in_fullres in column 6, found them "
               "swapped (array_col runs down the image and the array appears mirrored, i.e. transposed); put the "
               "columns back in Space Ranger's order (or, if the image really is transposed, transpose the image)")
        raise InputFormatError(msg)
    return fit


def spacing_px(xy_px: np.ndarray) -> tuple[float, float]:
    """Median nearest-neighbour distance of points and how regular it is.

    Parameters
    ----------
    xy_px
        ``(n, 2)`` positions (any one unit, e.g. full-resolution pixels).

    Returns
    -------
    tuple of float
        The median distance from each point to its nearest other point (same unit as ``xy_px``; NaN for fewer
        than 3 points) and the fraction of points whose nearest-neighbour distance is within
        :data:`SPACING_TOLERANCE` (5 %) of that median (0 for fewer than 3 points or coincident ones).
    """
    from scipy.spatial import cKDTree

    if len(xy_px) < 3:
        return float("nan"), 0.0
    d, _ = cKDTree(xy_px).query(xy_px, k=2)
    nn = d[:, 1]
    med = float(np.median(nn))
    return med, float(np.mean(np.abs(nn / med - 1.0) < SPACING_TOLERANCE)) if med > 0 else 0.0


@dataclass(frozen=True)
class SpotScale:
    """µm per pixel measured from Visium spot positions (:func:`visium_um_per_px_from_spots`).

    ``method`` is ``"lattice"`` (the affine fit on ``array_row``/``array_col``) or ``"spacing"`` (the median
    nearest-neighbour distance); ``regular_fraction`` is the fraction of spots whose nearest neighbour lies at the
    median spacing (``"spacing"`` only, else None).
    """

    um_per_px: float
    method: str
    spots: int
    regular_fraction: float | None = None


def visium_um_per_px_from_spots(xy_px: np.ndarray, lattice: LatticeFit | None = None, *, where: object = "spots",
                                required: bool = True) -> SpotScale | None:
    """µm per pixel of Visium spot positions: from the spot lattice, else from the spots' nearest-neighbour spacing.

    Visium spots lie on a hexagonal array 100 µm centre to centre (:data:`VISIUM_PITCH_UM`; 10x Visium spec,
    OSTA "Spots are 55 µm in diameter and spaced 100 µm center-to-center"; HEST
    ``_find_pixel_size_from_spot_coords(inter_spot_dist=100.)``), so the pixel distance between neighbouring spots
    gives the pixel size.

    Parameters
    ----------
    xy_px
        ``(n, 2)`` spot centres, x then y, in pixels of the image they refer to (float; finite).
    lattice
        The Visium lattice fitted to these spots' ``array_col``/``array_row`` (:func:`visium_lattice`, or
        :func:`hescape.data.readers.anndata.visium_lattice_from_obs`), already checked to be Visium's hexagonal
        array; None when the array indices are unknown. When given, its ``um_per_px`` is the answer (the fit uses
        every spot and rejects outliers: the better measurement).
    where
        Named in error messages (a file, a sample).
    required
        False: return None instead of raising when the spacing cannot be measured (callers that have other
        sources of the pixel size, e.g. scale factors or metadata).

    Returns
    -------
    SpotScale or None
        ``um_per_px`` in µm per pixel of ``xy_px``. Without ``lattice`` it is ``100 / median nearest-neighbour
        distance (px)``, accepted when there are at least :data:`SPACING_MIN_SPOTS` (7) spots, at distinct
        positions, and at least :data:`SPACING_REGULAR_FRACTION` (80 %) of them have their nearest neighbour within
        :data:`SPACING_TOLERANCE` (5 %) of the median (a lattice, not scattered cells). None only when
        ``required`` is False and that rule fails.

    Raises
    ------
    InputFormatError
        ``xy_px`` is not a finite ``(n, 2)`` array; or (``required`` only, no ``lattice``) fewer than 7 spots,
        coincident spot centres, or spacing that is not regular enough to be the 100 µm array.
    """
    xy = np.asarray(xy_px, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        msg = f"{where}: expected spot centres as a finite (n, 2) array of x, y pixels, found shape {xy.shape}"
        if xy.ndim == 2 and xy.shape[1] == 2:
            msg += f" with {int((~np.isfinite(xy)).any(1).sum())} NaN/inf rows"
        raise InputFormatError(msg)
    n = len(xy)
    if lattice is not None:
        return SpotScale(float(lattice.um_per_px), "lattice", n)
    fix = "give the spots' array_row/array_col (the spot lattice) or the image's µm per pixel"
    if n < SPACING_MIN_SPOTS:
        msg = (f"{where}: expected at least {SPACING_MIN_SPOTS} Visium spots (a spot and its ring of six neighbours) "
               f"to measure µm per pixel from their spacing, found {n}; {fix}")
    else:
        med, frac = spacing_px(xy)
        if not med > 0:
            msg = (f"{where}: expected distinct Visium spot centres to measure µm per pixel from their spacing, found "
                   f"coincident ones (median nearest-neighbour distance {med:g} px); {fix}")
        elif frac < SPACING_REGULAR_FRACTION:
            msg = (f"{where}: expected Visium spots on the 100 µm array (at least {SPACING_REGULAR_FRACTION:.0%} with "
                   f"their nearest neighbour within {SPACING_TOLERANCE:.0%} of the median spacing), found "
                   f"{frac:.0%} (median {med:.4g} px): these are not Visium spots, or {fix}")
        else:
            return SpotScale(VISIUM_PITCH_UM / med, "spacing", n, frac)
    if not required:
        return None
    raise InputFormatError(msg)


def visium_um_per_px(fit: LatticeFit, sf: dict, where) -> tuple[float, dict]:
    """µm per full-resolution pixel (the lattice's) and the cross-check record; warns or refuses on disagreement.

    The record holds ``um_per_fullres_px`` (lattice), ``um_per_fullres_px_spot_diameter`` (65 /
    ``spot_diameter_fullres``), their relative difference and, when it exceeds 5 %, the warning text.
    """
    check = SPOT_DIAMETER_FULLRES_UM / float(sf["spot_diameter_fullres"])
    diff = check / fit.um_per_px - 1.0
    rec = {"um_per_fullres_px": fit.um_per_px, "um_per_fullres_px_source": "spot lattice (100 µm pitch)",
           "um_per_fullres_px_spot_diameter": check, "scale_disagreement": round(diff, 6),
           "lattice": fit.to_dict()}
    if abs(math.log(1 + diff)) > math.log(1 + SCALE_REFUSE_FRACTION):
        msg = (f"{where}: expected spots 100 µm apart at 65 µm per spot_diameter_fullres "
               f"({float(sf['spot_diameter_fullres']):.4g} px), found them {VISIUM_PITCH_UM * (1 + diff):.0f} µm "
               f"apart at that scale (lattice {fit.um_per_px:.4g} µm/px vs {check:.4g}); scale factors and positions "
               f"come from different runs, or this is Visium HD: {HD_HINT}")
        raise InputFormatError(msg)
    if abs(diff) > SCALE_WARN_FRACTION:
        rec["scale_warning"] = (
            f"{where}: the spot lattice gives {fit.um_per_px:.4g} µm per full-resolution pixel, 65 / "
            f"spot_diameter_fullres gives {check:.4g} ({diff:+.1%}); using the lattice (spots are 100 µm apart by "
            "design)")
        warnings.warn(rec["scale_warning"], UserWarning, stacklevel=3)
    return fit.um_per_px, rec


def _find_matrix(outs: Path, which: str) -> Path:
    for cand in (f"{which}_feature_bc_matrix.h5", f"{which}_feature_bc_matrix"):
        if (outs / cand).exists():
            return outs / cand
    msg = (f"expected {which}_feature_bc_matrix.h5 (or the MEX folder) in {outs}, found neither; "
           "point at the Space Ranger outs/ folder")
    raise InputFormatError(msg)


def _load_image(outs: Path, image: str | os.PathLike, sf: dict, um_per_fullres_px: float):
    """The image and its µm → px affine."""
    if str(image) in ("hires", "lowres"):
        key = f"tissue_{image}_scalef"
        path = outs / "spatial" / f"tissue_{image}_image.png"
        scale = scalefactor(sf, key, outs / "spatial" / "scalefactors_json.json",
                            hint=f"it maps full-resolution pixels onto the {image} image: take the file unmodified "
                                 "from the Space Ranger run, or pass the full-resolution image")
        img: SlideImage = ArrayImage.from_file(path)
    else:
        path = Path(image)
        img = open_image(path)
        scale = 1.0
    return img, scale_matrix(scale / um_per_fullres_px), path


def check_fullres_extent(img: SlideImage, path: Path, xy_px: np.ndarray) -> None:
    """Refuse a downsampled image passed as the full-resolution one (spot positions beyond its extent)."""
    h, w = img.shape
    if xy_px[:, 0].max() > w * 1.02 or xy_px[:, 1].max() > h * 1.02:
        img.close()
        msg = (f"{path}: expected the full-resolution image (spots reach x={xy_px[:, 0].max():.0f}, "
               f"y={xy_px[:, 1].max():.0f} px), found a {w}×{h} image; pass the image given to Space Ranger, "
               "or --image hires/lowres")
        raise InputFormatError(msg)


def _check_not_blank(img: SlideImage, path: Path) -> None:
    thumb, _ = img.thumbnail(256)
    if thumb.size and int(thumb.max()) - int(thumb.min()) < 3:
        img.close()
        msg = (f"{path}: expected a tissue image, found a uniform one (all pixels ≈ {int(thumb.mean())}); "
               "it is a placeholder or unreadable: pass another image (e.g. --image lowres or the full-resolution scan)")
        raise InputFormatError(msg)


def spots_of_matrix(where: Path, barcodes: list[str], positions, in_tissue_only: bool, what: str):
    """Rows of the matrix to keep (``(k,)`` int64) and their full-resolution pixel positions (``(k, 2)`` x, y).

    Every matrix barcode must be in the positions file (same run); with ``in_tissue_only`` only spots or bins
    flagged ``in_tissue = 1`` are kept, and at least one must be.
    """
    row_of = positions.index_of(barcodes)
    if (row_of < 0).any():
        unknown = [b for b, r in zip(barcodes, row_of.tolist(), strict=True) if r < 0]
        msg = (f"{where}: expected every matrix barcode in {positions.path.name}, found {len(unknown)} missing "
               f"(e.g. {unknown[:3]}); matrix and spatial/ must come from the same Space Ranger run")
        raise InputFormatError(msg)
    keep = positions.in_tissue[row_of] == 1 if in_tissue_only else np.ones(len(barcodes), dtype=bool)
    if not keep.any():
        msg = f"{where}: expected in-tissue {what} (in_tissue = 1) among the matrix barcodes, found none"
        raise InputFormatError(msg)
    idx = np.flatnonzero(keep)
    return idx, positions.xy_px[row_of[idx]]


def open_checked_image(where: Path, image, sf: dict, um_per_px: float, xy_px: np.ndarray):
    """The image (full resolution, or ``hires``/``lowres``), its path and µm → px affine; a full-resolution image
    must cover the spots (:func:`check_fullres_extent`) and no image may be blank."""
    img, um_to_px, img_path = _load_image(where, image, sf, um_per_px)
    if str(image) not in ("hires", "lowres"):
        check_fullres_extent(img, img_path, xy_px)
    _check_not_blank(img, img_path)
    return img, img_path, um_to_px


def read_visium(outs: str | os.PathLike, *, image: str | os.PathLike | None, matrix: str = "filtered",
                in_tissue_only: bool = True, allow_non_integer_counts: bool = False) -> SpatialSample:
    """Read a Space Ranger ``outs/`` folder: in-tissue spots (µm), Gene Expression counts and the image.

    ``image``: a full-resolution image file (TIFF read lazily; PNG/JPEG in memory), or ``"hires"`` /
    ``"lowres"`` for the downsampled PNGs in ``spatial/``. Spots whose positions would fall outside a
    full-resolution image are refused (a sign that a downsampled image was passed as full resolution).
    """
    outs = Path(outs)
    if not outs.is_dir():
        msg = f"expected a Space Ranger outs/ folder at {outs}, found no such directory"
        raise InputFormatError(msg)
    if image is None:
        msg = ("no image given: expected the full-resolution H&E image (--image FILE) or 'hires'/'lowres' "
               "for the PNGs in spatial/; found none")
        raise InputFormatError(msg)
    refuse_visium_hd(outs)
    spatial = outs / "spatial"
    pos_path, positions = read_positions(spatial)
    sf = read_scalefactors(spatial)
    um_per_px, scale = visium_um_per_px(visium_lattice(positions), sf, pos_path)
    fm = read_10x_matrix(_find_matrix(outs, matrix), allow_non_integer=allow_non_integer_counts).gene_expression()
    barcodes = fm.barcodes.tolist()
    idx, xy_px = spots_of_matrix(outs, barcodes, positions, in_tissue_only, "spots")
    img, img_path, um_to_px = open_checked_image(outs, image, sf, um_per_px, xy_px)
    s = sample_of_matrix(outs.name if outs.name != "outs" else outs.parent.name, fm, idx, xy_px * um_per_px,
                         img, um_to_px, kind="spots", spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
                         metadata={**scale, "image": str(img_path), "scalefactors": sf, "positions": str(pos_path)})
    return with_known_tissue(s, positions, um_per_px)


def with_known_tissue(sample: SpatialSample, positions, um_per_px: float) -> SpatialSample:
    """``sample`` with the positions file's spots or bins flagged ``in_tissue = 0`` (Space Ranger: not under
    tissue) as ``background_um`` and those flagged 1 as ``tissue_um`` (µm), for the registration check
    (:mod:`hescape.data.registration`); returns ``sample``."""
    sample.background_um = positions.xy_px[positions.in_tissue == 0] * um_per_px
    sample.tissue_um = positions.xy_px[positions.in_tissue == 1] * um_per_px
    return sample


def sample_of_matrix(name: str, fm, idx: np.ndarray, xy_um: np.ndarray, image: SlideImage, um_to_px: np.ndarray, *,
                     kind: str, spot_diameter_um: float | None, metadata: dict) -> SpatialSample:
    """The :class:`SpatialSample` of rows ``idx`` of a Space Ranger matrix (Visium spots or Visium HD bins).

    Parameters
    ----------
    fm
        The Gene Expression :class:`~hescape.data.readers.tenx.FeatureMatrix`.
    idx
        ``(k,)`` matrix rows kept (:func:`spots_of_matrix`); their barcodes become ``obs_ids``.
    xy_um
        ``(k, 2)`` their centres in µm (x, y).
    image, um_to_px
        The image and its µm → level-0 pixel affine (3×3).
    """
    return SpatialSample(name=name, obs_ids=np.asarray(fm.barcodes, dtype=object)[idx], xy_um=xy_um,
                         counts=fm.counts[idx].tocsr(), genes=fm.feature_names.tolist(),
                         gene_ids=fm.feature_ids.tolist(), image=image, um_to_px=um_to_px, kind=kind,
                         spot_diameter_um=spot_diameter_um, metadata=metadata)
