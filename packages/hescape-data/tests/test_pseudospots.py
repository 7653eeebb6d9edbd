"""Pseudo-spot grids and sum pooling against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hescape.data import HescapeDataError, assign_cells, pool_counts, spot_grid


def test_hex_grid_geometry():
    g = spot_grid((0, 0, 1000, 1000), pitch_um=100, kind="hex")
    d = np.linalg.norm(g[:, None] - g[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(1), 100.0, rtol=1e-9)  # every spot's nearest neighbour is one pitch away
    assert (np.sort(d, axis=1)[:, :6] < 100.0 + 1e-6).sum(1).max() == 6  # six neighbours inside the lattice
    sq = spot_grid((0, 0, 330, 330), pitch_um=55, kind="square", margin_um=56)
    assert sq.min() >= 56 and sq.max() <= 330 - 56
    with pytest.raises(HescapeDataError, match="hex"):
        spot_grid((0, 0, 1, 1), kind="round")


@pytest.mark.parametrize("n_cells", [0, 1, 997])
def test_assign_and_pool_match_brute_force(n_cells):
    rng = np.random.default_rng(n_cells)
    cells = rng.uniform(0, 400, (n_cells, 2))
    spots = spot_grid((0, 0, 400, 400), pitch_um=50, kind="hex")
    a = assign_cells(cells, spots, diameter_um=55)
    brute = np.linalg.norm(spots[:, None] - cells[None], axis=-1) <= 27.5
    np.testing.assert_array_equal(a.toarray() > 0, brute)
    counts = sp.random(n_cells, 13, density=0.3, random_state=1, format="csr") * 10
    np.testing.assert_allclose(pool_counts(a, counts), brute.astype(np.float64) @ counts.toarray(), rtol=1e-5)
    with pytest.raises(HescapeDataError, match="rows"):
        pool_counts(a, sp.csr_matrix((n_cells + 1, 13)))
