"""Write synthetic Xenium Onboard Analysis bundles in the real file formats, from :func:`generate_sample`.

A bundle holds ``experiment.xenium`` (JSON), ``cells.parquet`` (or ``cells.csv.gz``), ``cell_feature_matrix.h5``
and/or the MEX folder ``cell_feature_matrix/`` (Gene Expression plus a few ``Negative Control Probe`` and
``Unassigned Codeword`` features, as in real files), optionally ``transcripts.parquet``, and a post-Xenium H&E
image ``<prefix>_he_image.ome.tif`` (tiled pyramidal OME-TIFF) with ``<prefix>_he_imagealignment.csv``.

The alignment matrix maps H&E pixels to morphology pixels (0.2125 µm/px), like the files Xenium Explorer
exports. It is a non-trivial rotation + scale + translation, and the H&E image is rendered accordingly: the
generator's µm-frame image is resampled into the H&E pixel frame, so a reader that inverts the matrix finds
every cell where it belongs. Used by tests and demos; real bundles are read by :mod:`hescape.data.readers.xenium`.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp
from scipy import ndimage

from .errors import HescapeDataError
from .panels import load_panel
from .synthetic import SyntheticConfig, generate_sample

__all__ = ["XeniumBundleOptions", "MORPHOLOGY_UM_PER_PX", "write_xenium_bundle", "encode_cell_id", "he_alignment",
           "small_bundle_config"]

MORPHOLOGY_UM_PER_PX = 0.2125
_SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class XeniumBundleOptions:
    """What to write (all lengths in µm, angles in degrees)."""

    prefix: str = "Xenium_Synthetic_S1"  # file prefix of the H&E image and alignment
    string_cell_ids: bool = False  # XOA >= 1.3 style ids ("aaaabaep-1") instead of integers
    cells_format: str = "parquet"  # "parquet", "csv.gz" or "both"
    matrix_format: str = "h5"  # "h5", "mex" or "both"
    n_negative_controls: int = 3  # "Negative Control Probe" features (dropped by readers)
    transcripts: bool = False  # also write transcripts.parquet (with qv)
    he_image: bool = True  # write the H&E OME-TIFF and its alignment CSV
    he_um_per_px: float = 0.3638  # H&E pixel size (differs from the morphology 0.2125)
    he_rotation_deg: float = 23.0  # rotation of the H&E scan relative to the morphology image
    he_flip: bool = False  # mirror the H&E scan (determinant < 0)
    he_margin_px: int = 40  # white margin around the tissue in the H&E image
    he_axes: str = "YXS"  # "YXS" (interleaved RGB, like 10x) or "CYX" (planar)
    he_tile: int = 128  # TIFF tile size (multiple of 16)
    he_compression: str = "zlib"  # tifffile compression: "zlib", "jpeg", "none"


def encode_cell_id(i: int, suffix: int = 1) -> str:
    """XOA >= 1.3 cell id: the 8 hex nibbles of a uint32 mapped to letters a–p, then ``-suffix``."""
    return "".join(chr(ord("a") + int(h, 16)) for h in f"{int(i):08x}") + f"-{suffix}"


def he_alignment(extent_um: float, opts: XeniumBundleOptions) -> tuple[np.ndarray, tuple[int, int]]:
    """The H&E px → morphology px matrix and the H&E image shape ``(H, W)`` for a square section."""
    s = opts.he_um_per_px / MORPHOLOGY_UM_PER_PX  # morphology px per H&E px
    t = np.deg2rad(opts.he_rotation_deg)
    lin = s * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if opts.he_flip:
        lin = lin @ np.diag([-1.0, 1.0])
    m0 = np.eye(3)
    m0[:2, :2] = lin
    side = extent_um / MORPHOLOGY_UM_PER_PX
    corners = np.array([[0, side, 0, side], [0, 0, side, side], [1, 1, 1, 1]], dtype=np.float64)
    he = np.linalg.inv(m0) @ corners
    off = he[:2].min(axis=1) - opts.he_margin_px
    m = m0.copy()
    m[:2, 2] = lin @ off  # morph = lin @ (he + off)
    size = np.ceil(he[:2].max(axis=1) - off + opts.he_margin_px).astype(int)
    return m, (int(size[1]), int(size[0]))


def _render_he(image_um: np.ndarray, src_um_per_px: float, he_to_morph: np.ndarray, shape: tuple[int, int]):
    """Resample the generator's µm-frame image (pixel (r, c) = (y, x) / src_um_per_px) into the H&E frame."""
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    to_src = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    xy = to_src @ np.diag([MORPHOLOGY_UM_PER_PX / src_um_per_px] * 2 + [1.0]) @ he_to_morph @ half
    m = _SWAP @ xy @ _SWAP
    out = np.empty((*shape, 3), dtype=np.uint8)
    for ch in range(3):
        res = ndimage.affine_transform(image_um[..., ch].astype(np.float32), m, output_shape=shape, order=1,
                                       mode="constant", cval=255.0, prefilter=False)
        out[..., ch] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return out


def _write_ome_pyramid(path: Path, rgb: np.ndarray, um_per_px: float, opts: XeniumBundleOptions) -> None:
    import tifffile

    levels = [rgb]
    while max(levels[-1].shape[:2]) > 2 * opts.he_tile:
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        levels.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    planar = opts.he_axes == "CYX"
    if opts.he_axes not in ("YXS", "CYX"):
        msg = f"he_axes must be 'YXS' or 'CYX', found {opts.he_axes!r}"
        raise HescapeDataError(msg)
    comp = None if opts.he_compression == "none" else opts.he_compression
    kw = {"tile": (opts.he_tile, opts.he_tile), "compression": comp,
          "photometric": "minisblack" if planar else "rgb"}
    with tifffile.TiffWriter(path, ome=True, bigtiff=False) as tw:
        for i, lvl in enumerate(levels):
            data = np.ascontiguousarray(np.moveaxis(lvl, -1, 0) if planar else lvl)
            if i == 0:
                meta = {"axes": opts.he_axes, "PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px,
                        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
                tw.write(data, subifds=len(levels) - 1, metadata=meta, **kw)
            else:
                tw.write(data, subfiletype=1, metadata=None, **kw)


def _write_h5(path: Path, counts: sp.csr_matrix, barcodes, ids, names, types) -> None:
    import h5py

    csc_like = counts.tocsr()  # barcodes × features CSR == features × barcodes CSC
    csc_like.sort_indices()
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=csc_like.data.astype(np.uint32), compression="gzip")
        g.create_dataset("indices", data=csc_like.indices.astype(np.uint32), compression="gzip")
        g.create_dataset("indptr", data=csc_like.indptr.astype(np.uint32))
        g.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.uint64))
        ft = g.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))
        ft.create_dataset("feature_type", data=np.array(types, dtype="S"))
        ft.create_dataset("genome", data=np.array(["Unknown"] * len(ids), dtype="S"))
        ft.create_dataset("id", data=np.array(ids, dtype="S"))
        ft.create_dataset("name", data=np.array(names, dtype="S"))
        f.attrs["filetype"] = "matrix"
        f.attrs["software_version"] = "xenium-synthetic"


def _write_mex(folder: Path, counts: sp.csr_matrix, barcodes, ids, names, types) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in barcodes)
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{n}\t{t}\n" for i, n, t in zip(ids, names, types, strict=True))
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(counts.T.astype(np.int64)), field="integer")


def write_xenium_bundle(out: str | os.PathLike, cfg: SyntheticConfig | None = None,
                        opts: XeniumBundleOptions = XeniumBundleOptions(), *, donor: int = 0,
                        sample: int = 0) -> Path:
    """Generate one synthetic section (``generate_sample(cfg, donor, sample)``) and write it as a Xenium bundle.

    ``cfg`` defaults to a small 300 × 300 µm section at 0.25 µm/px. Returns the bundle directory.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cfg = cfg or SyntheticConfig(sample_size_um=300.0, pixel_size_um=0.25)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    panel = load_panel(cfg.panel)
    smp = generate_sample(cfg, donor, sample, panel)
    n_cells = len(smp.cell_xy)
    rng = np.random.default_rng([cfg.seed, 7, donor, sample])

    ids = [encode_cell_id(i + 1) for i in range(n_cells)] if opts.string_cell_ids else list(range(1, n_cells + 1))
    counts = smp.cell_counts.tocsr().astype(np.float32)
    gene_total = np.asarray(counts.sum(1)).ravel()
    neg = sp.csr_matrix(rng.poisson(0.02, size=(n_cells, opts.n_negative_controls)).astype(np.float32))
    unassigned = sp.csr_matrix(rng.poisson(0.01, size=(n_cells, 1)).astype(np.float32))
    full = sp.hstack([counts, neg, unassigned]).tocsr()
    f_ids = [*panel.gene_ids, *(f"NegControlProbe_{k:05d}" for k in range(opts.n_negative_controls)), "BLANK_0001"]
    f_names = [*panel.genes, *(f"NegControlProbe_{k:05d}" for k in range(opts.n_negative_controls)), "BLANK_0001"]
    f_types = (["Gene Expression"] * panel.n_genes + ["Negative Control Probe"] * opts.n_negative_controls
               + ["Unassigned Codeword"])
    barcodes = [str(i) for i in ids]

    # experiment.xenium
    version = "xenium-2.0.0.10" if opts.string_cell_ids else "xenium-1.9.0.0"
    experiment = {
        "major_version": 5, "minor_version": 0, "patch_version": 0,
        "run_name": f"synthetic-run-{donor}", "run_start_time": "2024-01-01T00:00:00Z",
        "region_name": smp.name, "preservation_method": "FFPE", "num_cells": n_cells,
        "transcripts_per_cell": float(np.median(gene_total)) if n_cells else 0.0,
        "panel_design_id": "synthetic", "panel_name": cfg.panel, "panel_organism": "Human",
        "panel_tissue_type": "breast", "panel_num_targets_predesigned": panel.n_genes,
        "panel_num_targets_custom": 0, "pixel_size": MORPHOLOGY_UM_PER_PX, "z_step_size": 3.0,
        "analysis_sw_version": version, "instrument_sw_version": "synthetic",
        "images": {"morphology_filepath": "morphology.ome.tif",
                   "morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"},
        "hescape_synthetic": {"donor": smp.donor, "seed": cfg.seed},
    }
    (out / "experiment.xenium").write_text(json.dumps(experiment, indent=2))

    # cells
    r_cell = rng.uniform(5.0, 9.0, size=n_cells)
    cells = pa.table({
        "cell_id": pa.array(ids, pa.string() if opts.string_cell_ids else pa.int64()),
        "x_centroid": pa.array(smp.cell_xy[:, 0], pa.float64()),
        "y_centroid": pa.array(smp.cell_xy[:, 1], pa.float64()),
        "transcript_counts": pa.array(gene_total.astype(np.int64)),
        "control_probe_counts": pa.array(np.asarray(neg.sum(1)).ravel().astype(np.int64)),
        "control_codeword_counts": pa.array(np.zeros(n_cells, np.int64)),
        "unassigned_codeword_counts": pa.array(np.asarray(unassigned.sum(1)).ravel().astype(np.int64)),
        "deprecated_codeword_counts": pa.array(np.zeros(n_cells, np.int64)),
        "total_counts": pa.array(np.asarray(full.sum(1)).ravel().astype(np.int64)),
        "cell_area": pa.array(np.pi * r_cell**2),
        "nucleus_area": pa.array(np.pi * (0.55 * r_cell) ** 2),
    })
    if opts.cells_format not in ("parquet", "csv.gz", "both"):
        msg = f"cells_format must be 'parquet', 'csv.gz' or 'both', found {opts.cells_format!r}"
        raise HescapeDataError(msg)
    if opts.cells_format in ("parquet", "both"):
        pq.write_table(cells, out / "cells.parquet")
    if opts.cells_format in ("csv.gz", "both"):
        with pa.CompressedOutputStream(str(out / "cells.csv.gz"), "gzip") as sink:
            pacsv.write_csv(cells, sink)

    # matrix
    if opts.matrix_format not in ("h5", "mex", "both"):
        msg = f"matrix_format must be 'h5', 'mex' or 'both', found {opts.matrix_format!r}"
        raise HescapeDataError(msg)
    if opts.matrix_format in ("h5", "both"):
        _write_h5(out / "cell_feature_matrix.h5", full, barcodes, f_ids, f_names, f_types)
    if opts.matrix_format in ("mex", "both"):
        _write_mex(out / "cell_feature_matrix", full, barcodes, f_ids, f_names, f_types)

    # transcripts: one row per counted molecule (qv >= 20) plus low-quality ones the matrix does not count
    if opts.transcripts:
        coo = counts.tocoo()
        reps = coo.data.astype(np.int64)
        cell_idx, gene_idx = np.repeat(coo.row, reps), np.repeat(coo.col, reps)
        n_low = len(cell_idx) // 20
        low_cell, low_gene = rng.integers(0, max(n_cells, 1), n_low), rng.integers(0, panel.n_genes, n_low)
        cell_idx, gene_idx = np.concatenate([cell_idx, low_cell]), np.concatenate([gene_idx, low_gene])
        qv = np.concatenate([rng.uniform(20, 40, len(cell_idx) - n_low), rng.uniform(0, 19.9, n_low)])
        xy = smp.cell_xy[cell_idx] + rng.normal(0, 2.0, size=(len(cell_idx), 2))
        tx = pa.table({
            "transcript_id": pa.array(np.arange(len(cell_idx), dtype=np.uint64) + 281474976710656),
            "cell_id": pa.array([barcodes[i] for i in cell_idx.tolist()], pa.string()),
            "overlaps_nucleus": pa.array(rng.integers(0, 2, len(cell_idx)).astype(np.uint8)),
            "feature_name": pa.array(np.asarray(panel.genes, dtype=object)[gene_idx].tolist(), pa.string()),
            "x_location": pa.array(xy[:, 0].astype(np.float32)),
            "y_location": pa.array(xy[:, 1].astype(np.float32)),
            "z_location": pa.array(rng.uniform(10, 20, len(cell_idx)).astype(np.float32)),
            "qv": pa.array(qv.astype(np.float32)),
        })
        pq.write_table(tx, out / "transcripts.parquet")

    # H&E image + alignment
    if opts.he_image:
        he_to_morph, shape = he_alignment(cfg.sample_size_um, opts)
        rgb = _render_he(smp.image, cfg.pixel_size_um, he_to_morph, shape)
        _write_ome_pyramid(out / f"{opts.prefix}_he_image.ome.tif", rgb, opts.he_um_per_px, opts)
        np.savetxt(out / f"{opts.prefix}_he_imagealignment.csv", he_to_morph, delimiter=",", fmt="%.10g")
    return out


def small_bundle_config(size_um: float = 300.0, **kw) -> SyntheticConfig:
    """A small, fast config for tests and demos (``size_um`` square at 0.25 µm/px)."""
    return replace(SyntheticConfig(sample_size_um=size_um, pixel_size_um=0.25), **kw)
