"""Space Ranger spot/bin positions and the pixel size measured from the capture-array lattice.

Positions (Visium ``spatial/tissue_positions.csv`` / ``tissue_positions_list.csv``, Visium HD
``spatial/tissue_positions.parquet``) all have the columns ``barcode, in_tissue, array_row, array_col,
pxl_row_in_fullres, pxl_col_in_fullres`` (formats fact sheet §2 and §5; spatialdata-io checks the same order).
``array_row``/``array_col`` index the capture array; the pixel columns place each spot or bin in the
full-resolution image (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``).

The array is manufactured to a known pitch, so the pixel size of the full-resolution image follows from the
positions themselves (:func:`fit_lattice`): a robust least-squares affine fit ``(array_col, array_row, 1) →
(x_px, y_px)`` whose two axes, divided into the physical length of one array step, give µm per pixel. This
does not depend on ``spot_diameter_fullres`` (which for Visium is the pixel diameter of a *theoretical 65 µm
spot*, and for Visium HD the bin size in pixels) and is the approach HEST-1k takes for Visium
(``find_pixel_size_from_spot_coords``: 100 µm between spots), here fitted over all spots with outlier rejection.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFormatError, brief

__all__ = ["POSITION_COLUMNS", "SpotPositions", "LatticeFit", "read_positions_file", "fit_lattice",
           "HD_BARCODE", "HD_HINT"]

#: Column order of every Space Ranger positions file (Visium and Visium HD).
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")

#: Visium HD bin barcodes, e.g. ``s_008um_00301_00175-1`` (bin size in µm, array row, array column).
HD_BARCODE = re.compile(r"^s_(\d{3})um_(\d+)_(\d+)-\d+$")

#: The fix named by every "this is Visium HD" refusal.
HD_HINT = "use `hescape-data build visium-hd` (bins pooled into pseudo-spots) instead"


@dataclass
class SpotPositions:
    """The rows of a positions file as arrays (one entry per spot or bin)."""

    path: Path
    barcodes: np.ndarray  # (n,) object (str)
    in_tissue: np.ndarray  # (n,) int8, 1 = under tissue
    array_row: np.ndarray  # (n,) int64
    array_col: np.ndarray  # (n,) int64
    pxl_row: np.ndarray  # (n,) float64, y in full-resolution pixels
    pxl_col: np.ndarray  # (n,) float64, x in full-resolution pixels

    def __len__(self) -> int:
        return len(self.barcodes)

    @property
    def xy_px(self) -> np.ndarray:
        """``(n, 2)`` full-resolution pixel positions, x (column) then y (row)."""
        return np.column_stack([self.pxl_col, self.pxl_row])

    def index_of(self, barcodes) -> np.ndarray:
        """Row of each of ``barcodes`` in this table, -1 where absent (``(m,)`` int64)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        idx = pc.index_in(pa.array(list(barcodes), pa.string()), value_set=pa.array(self.barcodes, pa.string()))
        return np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _check_unique(path: Path, barcodes: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(barcodes, pa.string())
    n_unique = pc.count_distinct(arr).as_py()
    if n_unique != len(arr):
        vc = pc.value_counts(arr)
        dup = [v["values"].as_py() for v in vc if v["counts"].as_py() > 1][:3]
        msg = (f"{path}: expected each barcode once, found {len(arr) - n_unique} repeated rows (e.g. {dup}); "
               "the positions file is damaged or concatenated: take it unmodified from the Space Ranger run")
        raise InputFormatError(msg)


def _refuse_hd_barcode(path: Path, barcode: str) -> None:
    if HD_BARCODE.match(barcode):
        msg = (f"{path}: expected Visium spot barcodes (e.g. ACGCCTGACACGCGCT-1), found the Visium HD bin barcode "
               f"{barcode!r}; this is a Visium HD output: {HD_HINT}")
        raise InputFormatError(msg)


def _read_csv(path: Path, visium_hd: bool) -> SpotPositions:
    rows: list[list[str]] = []
    order = list(range(6))  # column of each of POSITION_COLUMNS; a header, when present, names them
    try:
        _read_csv_rows(path, visium_hd, rows, order)
    except (UnicodeDecodeError, csv.Error) as e:
        found = (f"bytes that are not UTF-8 text ({brief(e, 80)})" if isinstance(e, UnicodeDecodeError)
                 else f"malformed CSV ({brief(e, 80)})")
        msg = (f"{path}: expected a UTF-8 CSV file (Space Ranger's positions), found {found}; the file is damaged "
               "or was re-saved in another encoding: take it unmodified from the Space Ranger run")
        raise InputFormatError(msg) from None
    try:
        num = np.array([[float(v) for v in r[1:6]] for r in rows], dtype=np.float64).reshape(-1, 5)
    except ValueError:
        bad = next(i for i, r in enumerate(rows) if not _all_numeric(r[1:6]))
        msg = f"{path}: expected numbers in columns 2–6, found {rows[bad][1:6]}"
        raise InputFormatError(msg) from None
    return _make(path, np.array([r[0].strip() for r in rows], dtype=object), num)


def _read_csv_rows(path: Path, visium_hd: bool, rows: list[list[str]], order: list[int]) -> None:
    """The data rows of a positions CSV into ``rows`` (columns in :data:`POSITION_COLUMNS` order), the header's
    column order into ``order``. A UTF-8 byte-order mark (a file re-saved by a spreadsheet) is skipped."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if i == 0 and row and row[0].strip() == "barcode":
                head = [c.strip() for c in row]
                missing = [c for c in POSITION_COLUMNS if c not in head]
                if missing:
                    msg = (f"{path}: expected the header to name {list(POSITION_COLUMNS)}, missing {missing} "
                           f"(found {head})")
                    raise InputFormatError(msg)
                order[:] = [head.index(c) for c in POSITION_COLUMNS]
                continue
            if not row:
                continue
            if len(row) < 6:
                msg = (f"{path}, line {i + 1}: expected 6 columns (barcode, in_tissue, array_row, array_col, "
                       f"pxl_row_in_fullres, pxl_col_in_fullres), found {len(row)}")
                raise InputFormatError(msg)
            if len(row) <= max(order):
                msg = f"{path}, line {i + 1}: expected {max(order) + 1} columns (as the header), found {len(row)}"
                raise InputFormatError(msg)
            row = [row[k] for k in order]
            rows.append(row)
            if len(rows) == 1 and not visium_hd:
                _refuse_hd_barcode(path, row[0].strip())


def _all_numeric(vals) -> bool:
    try:
        [float(v) for v in vals]
    except ValueError:
        return False
    return True


def _read_parquet(path: Path, visium_hd: bool) -> SpotPositions:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        msg = f"{path}: expected a Parquet table, found unreadable content ({brief(e, 200)})"
        raise InputFormatError(msg) from None
    missing = [c for c in POSITION_COLUMNS if c not in table.column_names]
    if missing:
        msg = f"{path}: expected columns {list(POSITION_COLUMNS)}, missing {missing} (found {table.column_names})"
        raise InputFormatError(msg)
    raw = table.column("barcode")
    if pa.types.is_binary(raw.type) or pa.types.is_large_binary(raw.type):
        barcodes = np.array([b.decode() for b in raw.to_pylist()], dtype=object)
    else:
        barcodes = np.asarray(raw.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    if len(barcodes) and not visium_hd:
        _refuse_hd_barcode(path, str(barcodes[0]))
    try:
        num = np.column_stack([np.asarray(table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False),
                                          dtype=np.float64) for c in POSITION_COLUMNS[1:]])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        msg = f"{path}: expected numeric columns {list(POSITION_COLUMNS[1:])}, found ({brief(e, 200)})"
        raise InputFormatError(msg) from None
    return _make(path, barcodes, num)


def _make(path: Path, barcodes: np.ndarray, num: np.ndarray) -> SpotPositions:
    if len(barcodes) == 0:
        msg = f"{path}: expected one row per spot, found no rows"
        raise InputFormatError(msg)
    if not np.isfinite(num).all():
        msg = f"{path}: expected finite numbers, found {int((~np.isfinite(num)).any(1).sum())} rows with NaN/inf"
        raise InputFormatError(msg)
    ints = num[:, :3]
    if (ints != np.round(ints)).any() or not np.isin(num[:, 0], (0, 1)).all():
        msg = (f"{path}: expected in_tissue 0/1 and integer array_row/array_col, found other values; "
               "is this a Space Ranger positions file?")
        raise InputFormatError(msg)
    _check_unique(path, barcodes)
    return SpotPositions(path=path, barcodes=barcodes, in_tissue=num[:, 0].astype(np.int8),
                         array_row=num[:, 1].astype(np.int64), array_col=num[:, 2].astype(np.int64),
                         pxl_row=num[:, 3].copy(), pxl_col=num[:, 4].copy())


def read_positions_file(path: str | Path, *, visium_hd: bool = False) -> SpotPositions:
    """A ``tissue_positions*.csv`` (with or without header) or ``tissue_positions.parquet`` file.

    ``visium_hd=False`` (the Visium spot readers) refuses Visium HD bin barcodes (``s_008um_…``).

    Raises
    ------
    InputFormatError
        Missing or non-numeric columns, non-integer array indices, a barcode listed twice, no rows, or (unless
        ``visium_hd``) Visium HD bin barcodes.
    """
    path = Path(path)
    return _read_parquet(path, visium_hd) if path.suffix == ".parquet" else _read_csv(path, visium_hd)


@dataclass(frozen=True)
class LatticeFit:
    """Affine fit of pixel positions against capture-array indices, and the pixel size it implies.

    ``matrix`` maps ``(array_col, array_row, 1)`` to full-resolution ``(x, y)`` pixels; ``step_um`` is the
    physical length of one ``array_col`` step and of one ``array_row`` step (µm).
    """

    matrix: np.ndarray  # (2, 3)
    step_um: tuple[float, float]
    pitch_um: float  # centre-to-centre distance of nearest neighbours on the array, µm
    um_per_px: float  # isotropic: sqrt(step_col · step_row / |det|)
    um_per_px_col: float  # along array_col: step_um[0] / |matrix[:, 0]|
    um_per_px_row: float  # along array_row: step_um[1] / |matrix[:, 1]|
    skew_deg: float  # angle between the two array axes in the image, minus 90°
    mirrored: bool  # determinant < 0: the array appears mirrored in the image
    rms_residual_um: float  # over the points kept by the fit
    n_used: int
    n_points: int

    @property
    def anisotropy(self) -> float:
        """``um_per_px_col / um_per_px_row``: 1 for an array of the assumed shape imaged with square pixels."""
        return self.um_per_px_col / self.um_per_px_row

    def to_dict(self) -> dict:
        """JSON-ready summary (goes into the sample metadata and so into ``manifest.json``)."""
        return {"um_per_px": round(float(self.um_per_px), 8),
                "um_per_px_along_array_col": round(float(self.um_per_px_col), 8),
                "um_per_px_along_array_row": round(float(self.um_per_px_row), 8),
                "anisotropy": round(float(self.anisotropy), 6), "skew_deg": round(float(self.skew_deg), 4) + 0.0,
                "mirrored": bool(self.mirrored), "rms_residual_um": round(float(self.rms_residual_um), 4),
                "pitch_um": self.pitch_um, "step_um": list(self.step_um),
                "points_used": int(self.n_used), "points": int(self.n_points),
                "array_to_px": np.round(self.matrix, 6).tolist()}


def _neighbour_steps(col: np.ndarray, row: np.ndarray, xy: np.ndarray, dc: int, dr: int) -> np.ndarray:
    """Pixel displacements ``xy[j] - xy[i]`` of all pairs with ``(col, row)[j] = (col, row)[i] + (dc, dr)``."""
    c0, r0 = int(col.min()), int(row.min())
    width = int(col.max()) - c0 + 1 + abs(dc)
    key = (row - r0) * width + (col - c0)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    target = key + dr * width + dc
    ok = (col + dc >= c0) & (col + dc <= int(col.max()))
    pos = np.clip(np.searchsorted(ks, target), 0, len(ks) - 1)
    hit = ok & (ks[pos] == target)
    return xy[order[pos[hit]]] - xy[hit]


def fit_lattice(array_col: np.ndarray, array_row: np.ndarray, xy_px: np.ndarray, *, step_um: tuple[float, float],
                probe: tuple[int, int], pitch_um: float, where: str) -> LatticeFit:
    """Robust affine fit of pixel positions on the capture-array lattice; µm per full-resolution pixel.

    Parameters
    ----------
    array_col, array_row
        Capture-array indices, ``(n,)`` integers.
    xy_px
        ``(n, 2)`` pixel positions (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``).
    step_um
        Physical length (µm) of one ``array_col`` step and of one ``array_row`` step. Visium (orange-crate hex
        packing, 100 µm between neighbouring spots; 10x spec, HEST ``inter_spot_dist=100.``): ``(50, 50·√3)``,
        because spots two columns apart in one row are 100 µm apart and adjacent rows are 100·√3/2 µm apart.
        Visium HD: ``(bin, bin)``.
    probe
        ``(dc, dr)``: a column step and a row step that both stay on the lattice (Visium ``(2, 2)``, HD
        ``(1, 1)``); neighbour pairs along them give the robust starting point of the fit.
    pitch_um
        Nearest-neighbour distance on the array (µm), to judge residuals: Visium 100, HD the bin size.
    where
        The file named in error messages.

    Method: the median pixel displacement between array neighbours gives a starting affine (robust to any
    minority of bad rows); then least squares on the points within ``max(5·σ, 0.02·pitch)`` of the fit,
    σ = 1.4826 · median residual, repeated until the kept set stops changing.

    Raises
    ------
    InputFormatError
        Too few points, a degenerate lattice, fewer than half the points on one lattice, or a residual above
        10 % of the pitch (positions that do not follow ``array_row/array_col``).
    """
    col = np.asarray(array_col, dtype=np.int64)
    row = np.asarray(array_row, dtype=np.int64)
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if n < 6 or len(np.unique(col)) < 2 or len(np.unique(row)) < 2:
        msg = (f"{where}: expected spots on at least 2 array rows and 2 array columns to measure the pixel size, "
               f"found {n} spots on {len(np.unique(row))} rows and {len(np.unique(col))} columns")
        raise InputFormatError(msg)
    x = np.column_stack([col - col.mean(), row - row.mean(), np.ones(n)])
    dc, dr = probe
    d_col, d_row = _neighbour_steps(col, row, xy, dc, 0), _neighbour_steps(col, row, xy, 0, dr)
    if len(d_col) >= 3 and len(d_row) >= 3:
        a = np.column_stack([np.median(d_col, axis=0) / dc, np.median(d_row, axis=0) / dr])
        t = np.median(xy - x[:, :2] @ a.T, axis=0)
        coef = np.vstack([a.T, t])  # (3, 2): x @ coef -> xy
    else:
        coef = np.linalg.lstsq(x, xy, rcond=None)[0]
    keep = np.ones(n, dtype=bool)
    for _ in range(30):
        lin = coef[:2].T
        if not np.isfinite(coef).all() or abs(np.linalg.det(lin)) < 1e-12:
            break
        mpp = math.sqrt(step_um[0] * step_um[1] / abs(np.linalg.det(lin)))
        res = np.linalg.norm(xy - x @ coef, axis=1)
        sigma = 1.4826 * float(np.median(res[keep] if keep.any() else res))
        new = res <= max(5.0 * sigma, 0.02 * pitch_um / mpp)
        if new.sum() < 6:
            break
        coef = np.linalg.lstsq(x[new], xy[new], rcond=None)[0]
        if np.array_equal(new, keep):
            break
        keep = new
    lin = coef[:2].T  # columns: px per array_col step, px per array_row step
    det = float(np.linalg.det(lin))
    if not np.isfinite(det) or abs(det) < 1e-12:
        msg = (f"{where}: expected pixel positions that spread over the array, found a degenerate layout "
               "(all spots on one line in the image); the pixel columns are damaged")
        raise InputFormatError(msg)
    mpp = math.sqrt(step_um[0] * step_um[1] / abs(det))
    res = np.linalg.norm(xy - x @ coef, axis=1)
    if keep.sum() < 0.5 * n:
        msg = (f"{where}: expected the spots' pixel positions to follow array_row/array_col on one lattice, found "
               f"only {int(keep.sum())} of {n} on the best-fitting one; pixel or array columns are damaged or "
               "mixed up")
        raise InputFormatError(msg)
    rms_um = float(np.sqrt(np.mean(res[keep] ** 2))) * mpp
    if rms_um > 0.1 * pitch_um:
        msg = (f"{where}: expected pixel positions on the array lattice (residual below 10 % of the "
               f"{pitch_um:g} µm pitch), found an RMS residual of {rms_um:.3g} µm; pixel or array columns are "
               "damaged or mixed up")
        raise InputFormatError(msg)
    ncol, nrow = np.linalg.norm(lin[:, 0]), np.linalg.norm(lin[:, 1])
    cos = float(lin[:, 0] @ lin[:, 1]) / (ncol * nrow)
    return LatticeFit(matrix=np.column_stack([lin, coef[2] - lin @ np.array([col.mean(), row.mean()])]),
                      step_um=(float(step_um[0]), float(step_um[1])), pitch_um=float(pitch_um), um_per_px=mpp,
                      um_per_px_col=step_um[0] / ncol, um_per_px_row=step_um[1] / nrow,
                      skew_deg=math.degrees(math.acos(max(-1.0, min(1.0, cos)))) - 90.0, mirrored=det < 0,
                      rms_residual_um=rms_um, n_used=int(keep.sum()), n_points=n)
