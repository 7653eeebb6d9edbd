"""Read a Space Ranger (Visium) ``outs/`` folder.

Files used (see the formats fact sheet): ``filtered_feature_bc_matrix.h5`` (or ``raw_…``, or the MEX folder),
``spatial/tissue_positions.csv`` (Space Ranger ≥ 2, with a header) or ``spatial/tissue_positions_list.csv``
(< 2, no header); both are ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``;
``spatial/scalefactors_json.json`` and an image.

Coordinates: the full-resolution pixel size is ``55 µm / spot_diameter_fullres`` (Visium spots are 55 µm
across). Tissue µm are full-resolution pixels times that size, with x = ``pxl_col_in_fullres`` and
y = ``pxl_row_in_fullres``. The image is the user's full-resolution image (not part of ``outs/``), or the
``hires`` / ``lowres`` PNG with ``tissue_{hires,lowres}_scalef`` (full-res px → that image's px).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..errors import InputFormatError
from ..patches import scale_matrix
from .image import ArrayImage, SlideImage, open_image
from .tenx import read_10x_matrix, read_json
from .xenium import SpatialSample

__all__ = ["VISIUM_SPOT_DIAMETER_UM", "read_visium", "read_positions", "read_scalefactors"]

VISIUM_SPOT_DIAMETER_UM = 55.0


def read_positions(spatial: Path) -> tuple[Path, dict[str, tuple[int, float, float]]]:
    """``barcode -> (in_tissue, pxl_col, pxl_row)`` from ``tissue_positions.csv`` or ``tissue_positions_list.csv``."""
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            break
    else:
        msg = (f"expected spatial/tissue_positions.csv or spatial/tissue_positions_list.csv in {spatial.parent}, "
               "found neither; point at the Space Ranger outs/ folder")
        raise InputFormatError(msg)
    out: dict[str, tuple[int, float, float]] = {}
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or (i == 0 and row[0].strip() == "barcode"):
                continue
            if len(row) < 6:
                msg = (f"{path}, line {i + 1}: expected 6 columns (barcode, in_tissue, array_row, array_col, "
                       f"pxl_row_in_fullres, pxl_col_in_fullres), found {len(row)}")
                raise InputFormatError(msg)
            try:
                out[row[0]] = (int(row[1]), float(row[5]), float(row[4]))
            except ValueError:
                msg = f"{path}, line {i + 1}: expected numbers in columns 2–6, found {row[1:6]}"
                raise InputFormatError(msg) from None
    return path, out


def read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    sf = read_json(path, "point at the Space Ranger outs/ folder")
    d = sf.get("spot_diameter_fullres")
    if not isinstance(d, (int, float)) or not d > 0:
        msg = f"{path}: expected a positive 'spot_diameter_fullres', found {d!r}"
        raise InputFormatError(msg)
    return sf


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
        if key not in sf:
            msg = f"{outs}/spatial/scalefactors_json.json: expected {key!r} to use the {image} image, found none"
            raise InputFormatError(msg)
        img: SlideImage = ArrayImage.from_file(path)
        scale = float(sf[key])
    else:
        path = Path(image)
        img = open_image(path)
        scale = 1.0
    return img, scale_matrix(scale / um_per_fullres_px), path


def _check_not_blank(img: SlideImage, path: Path) -> None:
    thumb, _ = img.thumbnail(256)
    if thumb.size and int(thumb.max()) - int(thumb.min()) < 3:
        img.close()
        msg = (f"{path}: expected a tissue image, found a uniform one (all pixels ≈ {int(thumb.mean())}); "
               "it is a placeholder or unreadable: pass another image (e.g. --image lowres or the full-resolution scan)")
        raise InputFormatError(msg)


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
    spatial = outs / "spatial"
    pos_path, positions = read_positions(spatial)
    sf = read_scalefactors(spatial)
    um_per_px = VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
    fm = read_10x_matrix(_find_matrix(outs, matrix), allow_non_integer=allow_non_integer_counts).gene_expression()
    barcodes = fm.barcodes.tolist()
    unknown = [b for b in barcodes if b not in positions]
    if unknown:
        msg = (f"{outs}: expected every matrix barcode in {pos_path.name}, found {len(unknown)} missing "
               f"(e.g. {unknown[:3]}); matrix and spatial/ must come from the same Space Ranger run")
        raise InputFormatError(msg)
    keep = np.array([positions[b][0] == 1 for b in barcodes], dtype=bool) if in_tissue_only else \
        np.ones(len(barcodes), dtype=bool)
    if not keep.any():
        msg = f"{outs}: expected in-tissue spots (in_tissue = 1) among the matrix barcodes, found none"
        raise InputFormatError(msg)
    idx = np.flatnonzero(keep)
    xy_px = np.array([positions[barcodes[i]][1:] for i in idx], dtype=np.float64)
    img, um_to_px, img_path = _load_image(outs, image, sf, um_per_px)
    if str(image) not in ("hires", "lowres"):
        h, w = img.shape
        if xy_px[:, 0].max() > w * 1.02 or xy_px[:, 1].max() > h * 1.02:
            img.close()
            msg = (f"{img_path}: expected the full-resolution image (spots reach x={xy_px[:, 0].max():.0f}, "
                   f"y={xy_px[:, 1].max():.0f} px), found a {w}×{h} image; pass the image given to Space Ranger, "
                   "or --image hires/lowres")
            raise InputFormatError(msg)
    _check_not_blank(img, img_path)
    return SpatialSample(
        name=outs.name if outs.name != "outs" else outs.parent.name,
        obs_ids=np.asarray(barcodes, dtype=object)[idx],
        xy_um=xy_px * um_per_px,
        counts=fm.counts[idx].tocsr(),
        genes=fm.feature_names.tolist(),
        gene_ids=fm.feature_ids.tolist(),
        image=img,
        um_to_px=um_to_px,
        kind="spots",
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        metadata={"um_per_fullres_px": um_per_px, "image": str(img_path), "scalefactors": sf,
                  "positions": str(pos_path)},
    )
