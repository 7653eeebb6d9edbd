"""Synthetic Space Ranger outputs (Visium and Visium HD) in the real file formats, with known physical truth.

Test helper, loaded by path (under ``--import-mode=importlib`` the tests folder is not on ``sys.path``).

* :func:`write_visium_outs`: ``outs/`` with ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.csv``
  (``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``), ``spatial/
  scalefactors_json.json`` whose ``spot_diameter_fullres`` is a 65 µm spot in pixels times ``1 + sd_error``
  (Space Ranger's definition, with a few per cent error as in real outputs), and a full-resolution RGB TIFF at a
  known µm/px with a dark disc of exactly 55 µm painted at every spot centre of the hexagonal array (100 µm pitch).
* :func:`write_visium_hd_outs`: ``outs/binned_outputs/square_XXXum/`` with the matrix,
  ``spatial/tissue_positions.parquet``, ``spatial/scalefactors_json.json`` (``bin_size_um``,
  ``microns_per_pixel``, ``spot_diameter_fullres`` = bin size in px), ``s_008um_RRRRR_CCCCC-1`` barcodes, and a
  full-resolution TIFF with dark 55 µm discs at given tissue positions.

Pixels follow hescape's convention: pixel ``(r, c)`` covers ``[c, c+1) × [r, r+1)``, so its centre is at
``(c + 0.5, r + 0.5)``; discs are painted with exact area coverage (16 × 16 sub-samples per pixel).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp

BACKGROUND = (232.0, 196.0, 218.0)  # eosin-pink tissue
DISC = (70.0, 38.0, 112.0)  # haematoxylin-dark
#: Dark-pixel threshold (mean of RGB) halfway between the disc and the tissue background.
DARK_THRESHOLD = (sum(BACKGROUND) + sum(DISC)) / 6


def write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes, gene_ids, gene_names) -> None:
    """10x v3 HDF5 matrix (group ``matrix``: CSC features × barcodes, integer ``data``), Gene Expression only."""
    import h5py

    m = sp.csr_matrix(counts)  # barcodes × features CSR is features × barcodes CSC
    m.sort_indices()
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(list(barcodes), dtype="S")
        g["data"] = m.data.astype(np.uint32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array([m.shape[1], m.shape[0]], dtype=np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array(list(gene_ids), dtype="S")
        ft["name"] = np.array(list(gene_names), dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * m.shape[1], dtype="S")
        ft["genome"] = np.array(["GRCh38"] * m.shape[1], dtype="S")
        ft["_all_tag_keys"] = np.array(["genome"], dtype="S")


def he_image(shape_hw: tuple[int, int], discs_px: np.ndarray, diameter_px: float, seed: int = 0) -> np.ndarray:
    """H&E-like RGB uint8 image: pink tissue with mild noise and dark discs of ``diameter_px`` at ``discs_px``."""
    rng = np.random.default_rng(seed)
    h, w = shape_hw
    img = np.empty((h, w, 3), np.float32)
    img[:] = BACKGROUND
    img += rng.normal(0.0, 4.0, size=(h, w, 1)).astype(np.float32)
    r = diameter_px / 2
    sub = (np.arange(16) + 0.5) / 16
    for cx, cy in np.asarray(discs_px, dtype=np.float64).reshape(-1, 2):
        c0, c1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, w)
        r0, r1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, h)
        if c1 <= c0 or r1 <= r0:
            continue
        xs = (np.arange(c0, c1)[:, None] + sub[None, :]).ravel()  # sub-sample x positions
        ys = (np.arange(r0, r1)[:, None] + sub[None, :]).ravel()
        inside = ((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) <= r * r
        cov = inside.reshape(r1 - r0, 16, c1 - c0, 16).mean(axis=(1, 3)).astype(np.float32)[..., None]
        img[r0:r1, c0:c1] = img[r0:r1, c0:c1] * (1 - cov) + np.array(DISC, np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_tiff(path: Path, img: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, img, photometric="rgb", compression="zlib")


def _rotation(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def _barcode(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("ACGT"), 16)) + "-1"


def write_visium_outs(root: Path, *, um_per_px: float = 0.8, n_rows: int = 6, n_cols: int = 12,
                      sd_error: float = 0.03, rotation_deg: float = 2.0, n_genes: int = 6, seed: int = 0,
                      swap_pixel_columns: bool = False, header: bool = True) -> dict:
    """A synthetic Visium ``outs/`` at ``root`` plus ``root/fullres.tif``; returns the physical truth.

    Spots: ``array_row`` 0..n_rows-1, ``array_col`` 0..n_cols-1 with ``array_row + array_col`` even (the
    orange-crate layout of the real array), tissue position ``(50·col, 50·√3·row)`` µm + a margin, i.e.
    neighbours exactly 100 µm apart; image pixels = rotation(µm) / ``um_per_px``. Spots in the first array
    row are outside the tissue (``in_tissue = 0``, absent from the filtered matrix).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "spatial").mkdir(exist_ok=True)
    margin = 130.0
    rc = np.array([(r, c) for r in range(n_rows) for c in range(n_cols) if (r + c) % 2 == 0])
    um = np.column_stack([50.0 * rc[:, 1], 50.0 * math.sqrt(3) * rc[:, 0]]) + margin
    rot = _rotation(rotation_deg)
    px = (um - margin) @ rot.T / um_per_px + margin / um_per_px  # rotate about the first spot
    span = px.max(0) + margin / um_per_px
    shape = (int(math.ceil(span[1])), int(math.ceil(span[0])))
    _write_tiff(root / "fullres.tif", he_image(shape, px, 55.0 / um_per_px, seed))
    barcodes = [_barcode(rng) for _ in range(len(rc))]
    in_tissue = (rc[:, 0] > 0).astype(int)
    cols = (px[:, 1], px[:, 0]) if not swap_pixel_columns else (px[:, 0], px[:, 1])
    lines = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"] if header else []
    lines += [f"{b},{t},{r},{c},{y:.3f},{x:.3f}" for b, t, (r, c), y, x in
              zip(barcodes, in_tissue, rc, cols[0], cols[1], strict=True)]
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    (root / "spatial" / name).write_text("\n".join(lines) + "\n")
    sf = {"spot_diameter_fullres": 65.0 / um_per_px * (1 + sd_error), "tissue_hires_scalef": 0.2,
          "fiducial_diameter_fullres": 65.0 / um_per_px * 1.6, "tissue_lowres_scalef": 0.06}
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=4))
    keep = np.flatnonzero(in_tissue == 1)
    counts = sp.csr_matrix(rng.poisson(6.0, size=(len(keep), n_genes)).astype(np.int64))
    genes = [f"GENE{i}" for i in range(n_genes)]
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", counts, [barcodes[i] for i in keep],
                 [f"ENSG{i:011d}" for i in range(n_genes)], genes)
    return {"outs": root, "image": root / "fullres.tif", "um_per_px": um_per_px, "barcodes": barcodes, "px": px,
            "in_tissue": in_tissue, "array_rc": rc, "counts": counts, "genes": genes}


def write_visium_hd_outs(root: Path, *, bin_um: int = 8, n_bins: int = 40, um_per_px: float = 0.5,
                         mpp_error: float = 0.0, rotation_deg: float = 1.5, n_genes: int = 8, seed: int = 0,
                         discs_um=((100.0, 100.0), (260.0, 250.0)), origin_um: float = 80.0,
                         parquet: bool = True) -> dict:
    """A synthetic Visium HD ``outs/`` at ``root`` (one bin size) plus ``root/fullres.tif``; returns the truth.

    Bins: ``n_bins × n_bins`` squares of ``bin_um`` µm; bin ``(array_row, array_col)`` has its centre at tissue
    ``(origin + (col + ½)·bin, origin + (row + ½)·bin)`` µm; image pixels = rotation(µm) / ``um_per_px``. Bins
    outside a disc-shaped tissue region are ``in_tissue = 0`` and absent from the filtered matrix. Dark discs of
    exactly 55 µm are painted at ``discs_um`` (tissue µm, relative to the capture-area origin like the bins).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder = root / "binned_outputs" / f"square_{bin_um:03d}um"
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    (root / "spatial").mkdir(exist_ok=True)
    rr, cc = np.meshgrid(np.arange(n_bins), np.arange(n_bins), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    um = origin_um + np.column_stack([(cc + 0.5) * bin_um, (rr + 0.5) * bin_um])
    rot = _rotation(rotation_deg)
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]]) * (2 * origin_um + n_bins * bin_um) @ rot.T / um_per_px
    shift = -corners.min(0)  # keeps the rotated capture area (with its margin) inside the image

    def to_px(u: np.ndarray) -> np.ndarray:
        return np.asarray(u, dtype=np.float64).reshape(-1, 2) @ rot.T / um_per_px + shift

    px = to_px(um)
    discs_px = to_px(np.asarray(discs_um, dtype=np.float64) + origin_um) if len(discs_um) else np.zeros((0, 2))
    extent = corners + shift
    shape = (int(math.ceil(extent[:, 1].max())), int(math.ceil(extent[:, 0].max())))
    _write_tiff(root / "fullres.tif", he_image(shape, discs_px, 55.0 / um_per_px, seed))
    centre = origin_um + n_bins * bin_um / 2
    in_tissue = (np.hypot(um[:, 0] - centre, um[:, 1] - centre) <= 0.48 * n_bins * bin_um).astype(np.int8)
    barcodes = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rr, cc, strict=True)]
    table = pa.table({"barcode": pa.array(barcodes, pa.string()), "in_tissue": pa.array(in_tissue, pa.int32()),
                      "array_row": pa.array(rr, pa.int32()), "array_col": pa.array(cc, pa.int32()),
                      "pxl_row_in_fullres": pa.array(px[:, 1]), "pxl_col_in_fullres": pa.array(px[:, 0])})
    if parquet:
        pq.write_table(table, folder / "spatial" / "tissue_positions.parquet")
    else:
        lines = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]
        lines += [f"{b},{t},{r},{c},{y:.6f},{x:.6f}" for b, t, r, c, y, x in
                  zip(barcodes, in_tissue, rr, cc, px[:, 1], px[:, 0], strict=True)]
        (folder / "spatial" / "tissue_positions.csv").write_text("\n".join(lines) + "\n")
    mpp_file = um_per_px * (1 + mpp_error)
    sf = {"spot_diameter_fullres": bin_um / mpp_file, "bin_size_um": float(bin_um), "microns_per_pixel": mpp_file,
          "regist_target_img_scalef": 0.25, "tissue_lowres_scalef": 0.025,
          "fiducial_diameter_fullres": 700.0 / mpp_file, "tissue_hires_scalef": 0.25}
    for d in (folder / "spatial", root / "spatial"):
        (d / "scalefactors_json.json").write_text(json.dumps(sf, indent=4))
    keep = np.flatnonzero(in_tissue == 1)
    counts = sp.csr_matrix(rng.poisson(0.7, size=(len(keep), n_genes)).astype(np.int64))
    genes = [f"GENE{i}" for i in range(n_genes)]
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, [barcodes[i] for i in keep],
                 [f"ENSG{i:011d}" for i in range(n_genes)], genes)
    return {"outs": root, "folder": folder, "image": root / "fullres.tif", "um_per_px": um_per_px,
            "bin_um": bin_um, "bin_px": px[keep], "counts": counts, "genes": genes, "discs_px": discs_px,
            "rotation_deg": rotation_deg}


def dark_disc_diameter_um(patch: np.ndarray, um_per_px: float) -> float:
    """Equivalent diameter (µm) of the dark pixels of an RGB patch: ``2·sqrt(n_dark · px² / π)``."""
    dark = patch[..., :3].astype(np.float64).mean(-1) < DARK_THRESHOLD
    return 2.0 * math.sqrt(dark.sum() * um_per_px**2 / math.pi)
