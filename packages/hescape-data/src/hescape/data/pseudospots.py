"""Pool single cells into Visium-like pseudo-spots (sum of counts, as in the HESCAPE paper)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .errors import HescapeDataError

__all__ = ["spot_grid", "assign_cells", "pool_counts"]


def spot_grid(
    extent_um: tuple[float, float, float, float],
    *,
    pitch_um: float = 100.0,
    kind: str = "hex",
    margin_um: float = 0.0,
) -> np.ndarray:
    """Spot centres (µm, shape ``(n, 2)`` as x, y) on a grid covering an extent.

    Parameters
    ----------
    extent_um
        ``(x_min, y_min, x_max, y_max)`` in µm.
    pitch_um
        Centre-to-centre distance of neighbouring spots (Visium: 100 µm).
    kind
        ``"hex"`` (rows ``pitch·√3/2`` apart, every other row shifted by half a pitch, like Visium)
        or ``"square"``.
    margin_um
        Keep only centres at least this far inside the extent (e.g. half the patch field of view).
    """
    if pitch_um <= 0:
        msg = f"pitch_um must be > 0, found {pitch_um}"
        raise HescapeDataError(msg)
    x0, y0, x1, y1 = (float(v) for v in extent_um)
    x0, y0, x1, y1 = x0 + margin_um, y0 + margin_um, x1 - margin_um, y1 - margin_um
    if x1 < x0 or y1 < y0:
        return np.zeros((0, 2))
    if kind == "hex":
        dy = pitch_um * np.sqrt(3) / 2
    elif kind == "square":
        dy = pitch_um
    else:
        msg = f"grid kind must be 'hex' or 'square', found {kind!r}"
        raise HescapeDataError(msg)
    ys = np.arange(y0, y1 + 1e-9, dy)
    pts = []
    for i, y in enumerate(ys):
        shift = pitch_um / 2 if (kind == "hex" and i % 2) else 0.0
        xs = np.arange(x0 + shift, x1 + 1e-9, pitch_um)
        pts.append(np.column_stack([xs, np.full_like(xs, y)]))
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def assign_cells(cell_xy: np.ndarray, spot_xy: np.ndarray, *, diameter_um: float = 55.0) -> sp.csr_matrix:
    """Spot × cell membership matrix: 1 where a cell centroid lies inside a spot disc.

    A cell may belong to several spots when spots overlap (pitch < diameter).
    """
    cell_xy = np.asarray(cell_xy, dtype=np.float64)
    spot_xy = np.asarray(spot_xy, dtype=np.float64)
    n_spots, n_cells = len(spot_xy), len(cell_xy)
    if n_spots == 0 or n_cells == 0:
        return sp.csr_matrix((n_spots, n_cells), dtype=np.float32)
    # All (spot, cell) pairs within the radius, found in C by the KD-trees: no Python loop over cells.
    pairs = cKDTree(spot_xy).sparse_distance_matrix(cKDTree(cell_xy), diameter_um / 2, output_type="ndarray")
    data = np.ones(len(pairs), dtype=np.float32)
    m = sp.csr_matrix((data, (pairs["i"], pairs["j"])), shape=(n_spots, n_cells))
    m.sort_indices()
    return m


def pool_counts(assignment: sp.spmatrix, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Sum cell counts into spots: ``assignment (spots × cells) @ counts (cells × genes)``, dense float32."""
    if assignment.shape[1] != counts.shape[0]:
        msg = (
            f"assignment has {assignment.shape[1]} cells but the count matrix has {counts.shape[0]} rows; "
            "build both from the same cell table"
        )
        raise HescapeDataError(msg)
    out = assignment @ counts
    out = out.toarray() if sp.issparse(out) else np.asarray(out)
    return out.astype(np.float32, copy=False)
