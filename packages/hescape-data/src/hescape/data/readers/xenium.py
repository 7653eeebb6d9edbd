"""Read a Xenium Onboard Analysis (XOA) output bundle with its post-Xenium H&E image.

Files used (see the formats fact sheet): ``experiment.xenium`` (``pixel_size``: µm per morphology pixel),
``cells.parquet`` or ``cells.csv.gz`` (``cell_id``, ``x_centroid``, ``y_centroid`` in µm; integer or string
ids), ``cell_feature_matrix.h5`` or the MEX folder ``cell_feature_matrix/`` (Gene Expression features only),
``<prefix>_he_image.ome.tif`` and ``<prefix>_he_imagealignment.csv``.

The alignment matrix ``M`` maps H&E pixels ``(x, y, 1)`` to morphology pixels. Tissue µm go to H&E pixels by
``M⁻¹ · diag(1/pixel_size, 1/pixel_size, 1)``. The Xenium Explorer keypoint CSV (header with ``fixedX``,
``fixedY``, ``alignmentX``, ``alignmentY``) is accepted too: an affine is fitted by least squares from the
alignment (H&E) points to the fixed (morphology) points; the units of those columns are UNVERIFIED (assumed
pixels, as HEST does).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import AlignmentError, InputFormatError, brief
from ..patches import check_affine, scale_matrix
from .image import SlideImage, TiffImage, check_not_blank
from .tenx import read_10x_h5, read_10x_mex, read_json

__all__ = ["SpatialSample", "read_xenium", "read_alignment", "find_he_files", "read_transcripts"]


@dataclass
class SpatialSample:
    """Observations (cells or spots) with positions in µm, counts, and the image that goes with them."""

    name: str
    obs_ids: np.ndarray  # (n,) str: cell ids or spot barcodes
    xy_um: np.ndarray  # (n, 2) float64, x and y in µm
    counts: sp.csr_matrix  # (n, n_genes) float32 raw counts, Gene Expression only
    genes: list[str]
    gene_ids: list[str]
    image: SlideImage | None
    um_to_px: np.ndarray | None  # 3×3 affine: µm (x, y) -> level-0 image px (x, y)
    kind: str = "cells"  # "cells" (Xenium) or "spots" (Visium)
    spot_diameter_um: float | None = None
    metadata: dict = field(default_factory=dict)
    #: (m, 2) µm positions known to be off the tissue (Visium ``in_tissue = 0`` spots) and (k, 2) known to be on
    #: it (``in_tissue = 1``, also spots absent from the matrix), for the registration check
    #: (:mod:`hescape.data.registration`); None when unknown.
    background_um: np.ndarray | None = None
    tissue_um: np.ndarray | None = None

    def close(self) -> None:
        if self.image is not None:
            self.image.close()


def _read_experiment(bundle: Path) -> dict:
    f = bundle / "experiment.xenium"
    exp = read_json(f, "point at the XOA output folder (the one holding experiment.xenium and cells.parquet)")
    ps = exp.get("pixel_size")
    if isinstance(ps, bool) or not isinstance(ps, (int, float)) or not np.isfinite(ps) or ps <= 0:
        msg = f"{f}: expected a positive number 'pixel_size' (µm per morphology pixel, e.g. 0.2125), found {ps!r}"
        raise InputFormatError(msg)
    return exp


def _read_cells(bundle: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = ["cell_id", "x_centroid", "y_centroid"]
    if (bundle / "cells.parquet").is_file():
        path = bundle / "cells.parquet"
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            msg = f"{path}: expected a Parquet table, found unreadable content ({brief(e, 200)})"
            raise InputFormatError(msg) from None
    elif (bundle / "cells.csv.gz").is_file():
        path = bundle / "cells.csv.gz"
        try:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={"cell_id": pa.string()}))
        except (pa.ArrowInvalid, OSError) as e:
            msg = f"{path}: expected a gzipped CSV table, found unreadable content ({brief(e, 200)})"
            raise InputFormatError(msg) from None
    else:
        msg = f"expected cells.parquet or cells.csv.gz in {bundle}, found neither; is this an XOA output folder?"
        raise InputFormatError(msg)
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        msg = f"{path}: expected columns {cols}, missing {missing} (found {table.column_names})"
        raise InputFormatError(msg)
    for c in cols[1:]:
        t = table.column(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
            msg = (f"{path}: expected numeric µm values in column {c!r}, found type {t}; the table is damaged: "
                   "take cells.parquet / cells.csv.gz from the original XOA output")
            raise InputFormatError(msg)
    if table.column("cell_id").null_count:
        msg = f"{path}: expected a cell_id in every row, found {table.column('cell_id').null_count} empty ones"
        raise InputFormatError(msg)
    raw = table.column("cell_id").to_pylist()
    ids = np.array([v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in raw], dtype=object)
    xy = np.column_stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                          for c in cols[1:]])
    if not np.isfinite(xy).all():
        msg = f"{path}: expected finite cell centroids, found {int((~np.isfinite(xy)).any(1).sum())} cells with NaN/inf"
        raise InputFormatError(msg)
    if len(set(ids.tolist())) != len(ids):
        msg = f"{path}: expected unique cell ids, found {len(ids) - len(set(ids.tolist()))} duplicates"
        raise InputFormatError(msg)
    return path, ids, xy


def _read_matrix(bundle: Path, allow_non_integer: bool = False):
    if (bundle / "cell_feature_matrix.h5").is_file():
        return read_10x_h5(bundle / "cell_feature_matrix.h5", allow_non_integer=allow_non_integer).gene_expression()
    if (bundle / "cell_feature_matrix").is_dir():
        return read_10x_mex(bundle / "cell_feature_matrix", allow_non_integer=allow_non_integer).gene_expression()
    msg = (f"expected cell_feature_matrix.h5 or the MEX folder cell_feature_matrix/ in {bundle}, found neither; "
           "is this an XOA output folder?")
    raise InputFormatError(msg)


def read_alignment(path: str | os.PathLike) -> np.ndarray:
    """The 3×3 H&E px → morphology px affine from an ``*_he_imagealignment.csv`` (matrix or keypoints)."""
    path = Path(path)
    if not path.is_file():
        msg = f"expected an H&E alignment CSV at {path}, found no such file"
        raise AlignmentError(msg)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        msg = f"{path}: expected a CSV text file (3×3 matrix or keypoints), found unreadable content ({brief(e, 80)})"
        raise AlignmentError(msg) from None
    if rows and "fixedX" in [c.strip() for c in rows[0]]:
        head = [c.strip() for c in rows[0]]
        need = ["fixedX", "fixedY", "alignmentX", "alignmentY"]
        if not set(need) <= set(head):
            msg = f"{path}: keypoint CSV expected columns {need}, found {head}"
            raise AlignmentError(msg)
        try:
            pts = np.array([[float(r[head.index(k)]) for k in need] for r in rows[1:]])
        except (ValueError, IndexError):
            msg = f"{path}: keypoint CSV has non-numeric or short rows"
            raise AlignmentError(msg) from None
        if len(pts) < 3:
            msg = f"{path}: expected at least 3 keypoints to fit an affine, found {len(pts)}"
            raise AlignmentError(msg)
        src = np.column_stack([pts[:, 2:4], np.ones(len(pts))])
        sol, *_ = np.linalg.lstsq(src, pts[:, 0:2], rcond=None)
        m = np.vstack([sol.T, [0.0, 0.0, 1.0]])
    else:
        try:
            m = np.array([[float(c) for c in r] for r in rows])
        except ValueError:
            msg = f"{path}: expected a headerless 3×3 numeric matrix, found non-numeric values"
            raise AlignmentError(msg) from None
        if m.shape != (3, 3):
            msg = f"{path}: expected a 3×3 matrix (3 rows of 3 numbers), found {len(rows)} rows"
            raise AlignmentError(msg)
    return check_affine(m, f"alignment matrix {path.name}")


def find_he_files(bundle: Path) -> tuple[Path | None, Path | None]:
    """The bundle's ``*he_image.ome.tif`` and matching ``*he_imagealignment.csv`` (None when absent)."""
    images = sorted(bundle.glob("*he_image.ome.tif")) + sorted(bundle.glob("*he_image.ome.tiff"))
    if len(images) > 1:
        msg = (f"expected one H&E image in {bundle}, found {[p.name for p in images]}; "
               "choose one with --he-image (and --alignment)")
        raise InputFormatError(msg)
    if not images:
        return None, None
    img = images[0]
    stem = img.name[: img.name.index("he_image")]
    aln = bundle / f"{stem}he_imagealignment.csv"
    return img, (aln if aln.is_file() else None)


def read_xenium(bundle: str | os.PathLike, *, he_image: str | os.PathLike | None = None,
                alignment: str | os.PathLike | None = None, require_image: bool = True,
                allow_non_integer_counts: bool = False) -> SpatialSample:
    """Read an XOA bundle: cells, Gene Expression counts (rows in cells-table order) and the aligned H&E image.

    ``he_image`` / ``alignment`` override the files found in the bundle. Without an H&E image an
    :class:`InputFormatError` is raised unless ``require_image=False`` (then ``image`` and ``um_to_px`` are None).
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        msg = f"expected a Xenium output folder at {bundle}, found no such directory"
        raise InputFormatError(msg)
    exp = _read_experiment(bundle)
    pixel_size = float(exp["pixel_size"])
    cells_path, ids, xy = _read_cells(bundle)
    fm = _read_matrix(bundle, allow_non_integer_counts)
    index = {b: i for i, b in enumerate(fm.barcodes.tolist())}
    if len(index) != len(fm.barcodes):
        msg = f"{bundle}: the count matrix has duplicated cell barcodes; the file is corrupt"
        raise InputFormatError(msg)
    rows = np.array([index.get(c, -1) for c in ids.tolist()], dtype=np.int64)
    missing = ids[rows < 0]
    extra = len(index) - int((rows >= 0).sum())
    if len(missing) or extra:
        msg = (f"{bundle}: expected the same cell ids in {cells_path.name} and the count matrix; found "
               f"{len(missing)} cells absent from the matrix (e.g. {missing[:3].tolist()}) and {extra} matrix "
               f"barcodes absent from the cells table (e.g. {[b for b in fm.barcodes[:50] if b not in set(ids.tolist())][:3]}); "
               "cells and matrix must come from the same XOA run")
        raise InputFormatError(msg)
    counts = fm.counts[rows]
    meta = {k: exp.get(k) for k in ("run_name", "region_name", "preservation_method", "panel_name",
                                    "panel_organism", "panel_tissue_type", "analysis_sw_version")}
    meta["pixel_size"] = pixel_size
    sample = SpatialSample(name=str(exp.get("region_name") or exp.get("run_name") or bundle.name), obs_ids=ids,
                           xy_um=xy, counts=counts, genes=fm.feature_names.tolist(),
                           gene_ids=fm.feature_ids.tolist(), image=None, um_to_px=None, kind="cells", metadata=meta)

    img_path, aln_path = find_he_files(bundle)
    if he_image is not None:
        img_path = Path(he_image)
        sibling = img_path.parent / img_path.name.replace("he_image.ome.tif", "he_imagealignment.csv")
        aln_path = sibling if sibling != img_path and sibling.is_file() else None
    aln_path = Path(alignment) if alignment is not None else aln_path
    if img_path is None:
        if require_image:
            msg = (f"{bundle}: expected a post-Xenium H&E image (<prefix>_he_image.ome.tif with "
                   "<prefix>_he_imagealignment.csv), found none; pass the image with --he-image FILE "
                   "and its alignment with --alignment CSV")
            raise InputFormatError(msg)
        return sample
    if aln_path is None:
        msg = (f"{bundle}: found the H&E image {img_path.name} but no alignment CSV "
               f"({img_path.name.replace('he_image.ome.tif', 'he_imagealignment.csv')}); export it from "
               "Xenium Explorer and pass it with --alignment CSV")
        raise InputFormatError(msg)
    he_to_morph = read_alignment(aln_path)
    sample.image = TiffImage(img_path)
    sample.um_to_px = np.linalg.inv(he_to_morph) @ scale_matrix(1.0 / pixel_size)
    try:
        check_not_blank(sample.image, img_path)
        check_cell_extent(sample, pixel_size, bundle / "experiment.xenium")
    except InputFormatError:
        sample.close()
        raise
    sample.metadata.update(he_image=str(img_path), alignment=str(aln_path),
                           he_um_per_px=float(pixel_size * np.sqrt(abs(np.linalg.det(he_to_morph[:2, :2])))))
    return sample


#: The cells must span at least this fraction of the H&E image's width or height (see :func:`check_cell_extent`).
MIN_CELL_EXTENT = 0.15
#: At least this fraction of the cells must fall inside the H&E image.
MIN_CELLS_INSIDE = 0.10


def check_cell_extent(sample: SpatialSample, pixel_size: float, where: Path) -> None:
    """Refuse a ``pixel_size`` (or alignment) under which the cells cannot lie on the H&E image as a section does.

    A post-Xenium H&E image is a scan of the section, so the cells span most of it (typically 50–95 % of each
    side; the synthetic bundles about 90 %). A wrong ``pixel_size`` scales the cells' extent on the image by
    (true / stated): a section spanning less than :data:`MIN_CELL_EXTENT` (15 %) of both the width and the height
    means a pixel size off by about 5× or more (nm written as µm, the pixel size of another pyramid level, ...),
    while a genuinely small section on a large scan rarely spans less than that of both sides. The opposite
    error spreads the cells beyond the image: fewer than :data:`MIN_CELLS_INSIDE` (10 %) of them inside it is
    refused too (partial H&E coverage is fine above that).
    """
    h, w = sample.image.shape
    px = (sample.um_to_px @ np.column_stack([sample.xy_um, np.ones(len(sample.xy_um))]).T)[:2].T
    if not len(px):
        return
    span = px.max(0) - px.min(0)
    frac = max(span[0] / w, span[1] / h)
    inside = float(((px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)).mean())
    if frac < MIN_CELL_EXTENT:
        msg = (f"{where}: expected the cells to span a section-sized part of the {w}×{h} px H&E image (at least "
               f"{MIN_CELL_EXTENT:.0%} of its width or height), found {frac:.1%} with pixel_size {pixel_size:g} µm; "
               "pixel_size (µm per morphology pixel, 0.2125 for Xenium) or the alignment CSV is wrong: fix it")
        raise InputFormatError(msg)
    if inside < MIN_CELLS_INSIDE:
        msg = (f"{where}: expected the H&E image to cover the cells, found {inside:.1%} of them on the {w}×{h} px "
               f"image with pixel_size {pixel_size:g} µm; pixel_size (µm per morphology pixel, 0.2125 for Xenium) "
               "or the alignment CSV is wrong: fix it")
        raise InputFormatError(msg)


def read_transcripts(bundle: str | os.PathLike, genes: list[str], *, min_qv: float = 20.0):
    """Positions (µm, ``(n, 2)``) and gene column indices of the transcripts of ``genes`` with ``qv >= min_qv``.

    Reads ``transcripts.parquet`` (columns ``feature_name``, ``x_location``, ``y_location``, ``qv``); features
    not in ``genes`` (negative controls, codewords) are dropped. QV ≥ 20 is the threshold XOA uses for its
    count matrices.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(bundle) / "transcripts.parquet"
    if not path.is_file():
        msg = f"expected {path} to pool transcripts, found no such file; use counts_from='cells' instead"
        raise InputFormatError(msg)
    cols = ["feature_name", "x_location", "y_location", "qv"]
    try:
        have = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        msg = f"{path}: expected a Parquet table with columns {cols}, found unreadable content ({brief(e, 200)})"
        raise InputFormatError(msg) from None
    missing = [c for c in cols if c not in have]
    if missing:
        msg = (f"{path}: expected the XOA transcript columns {cols}, missing {missing} (found {have[:12]}); take "
               "transcripts.parquet unmodified from the XOA output, or use counts_from='cells'")
        raise InputFormatError(msg)
    try:
        t = pq.read_table(path, columns=cols)
        numeric = [c for c in cols[1:] if not (pa.types.is_integer(t.schema.field(c).type)
                                               or pa.types.is_floating(t.schema.field(c).type))]
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        msg = f"{path}: expected a Parquet table with columns {cols}, found unreadable content ({brief(e, 200)})"
        raise InputFormatError(msg) from None
    if numeric:
        msg = (f"{path}: expected numeric columns {cols[1:]}, found {[f'{c}: {t.schema.field(c).type}' for c in numeric]}"
               "; take transcripts.parquet unmodified from the XOA output")
        raise InputFormatError(msg)
    t = t.filter(pc.greater_equal(t.column("qv"), min_qv))
    names = t.column("feature_name")
    if pa.types.is_binary(names.type) or pa.types.is_large_binary(names.type):
        names = pc.cast(names, pa.string())
    idx = pc.fill_null(pc.index_in(names, value_set=pa.array(genes, pa.string())), -1)
    gene_col = np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)
    keep = gene_col >= 0
    xy = np.column_stack([t.column("x_location").to_numpy(), t.column("y_location").to_numpy()]).astype(np.float64)
    if not np.isfinite(xy[keep]).all():
        msg = f"{path}: expected finite transcript locations, found NaN/inf"
        raise InputFormatError(msg)
    return xy[keep], gene_col[keep]
