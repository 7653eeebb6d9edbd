"""Pool single cells into Visium-like pseudo-spots (sum of counts, as in the HESCAPE paper)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .errors import HescapeDataError
from .geometry import SpotGeometry

__all__ = ["spot_grid", "assign_cells", "pool_counts"]


def spot_grid(
    extent_um: tuple[float, float, float, float],
    *,
    pitch_um: float = 100.0,
    kind: str = "hex",
    margin_um: float = 0.0,
) -> np.ndarray:
    """Spot centres (µm, shape ``(n, 2)`` as x, y) on a grid covering an extent.

    A shorthand for :meth:`hescape.data.geometry.SpotGeometry.centres` (the one lattice of the package).

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
    return SpotGeometry(shape="disc", pitch_um=pitch_um, grid=kind, name="custom").centres(extent_um,
                                                                                         margin_um=margin_um)


def assign_cells(cell_xy: np.ndarray, spot_xy: np.ndarray, *, diameter_um: float = 55.0) -> sp.csr_matrix:
    """Spot × cell membership matrix ``(n_spots, n_cells)``: 1 where a cell centroid lies inside a spot disc.

    A shorthand for :meth:`hescape.data.geometry.SpotGeometry.assign` with disc-shaped spots. A cell may belong
    to several spots when spots overlap (pitch < diameter).
    """
    return SpotGeometry(shape="disc", diameter_um=diameter_um, name="custom").assign(cell_xy, spot_xy)


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
