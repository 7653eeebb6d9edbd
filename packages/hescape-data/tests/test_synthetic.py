"""The synthetic generator: deterministic, biologically shaped, with donor batch effects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hescape.data import SyntheticConfig, generate_sample, load_panel
from hescape.data.synthetic import CELL_TYPES

TINY = SyntheticConfig(sample_size_um=400.0, pixel_size_um=1.0)


@pytest.fixture(scope="module")
def sample():
    return generate_sample(TINY, 0, 0)


def test_deterministic(sample):
    again = generate_sample(TINY, 0, 0)
    np.testing.assert_array_equal(sample.spot_counts, again.spot_counts)
    np.testing.assert_array_equal(sample.image, again.image)
    other = generate_sample(dataclasses.replace(TINY, seed=1), 0, 0)
    assert not np.array_equal(sample.spot_counts, other.spot_counts)


def test_shapes_and_panel(sample):
    panel = load_panel(TINY.panel)
    assert sample.cell_counts.shape == (len(sample.cell_xy), panel.n_genes)
    assert sample.spot_counts.shape == (len(sample.spot_xy), panel.n_genes)
    assert sample.image.shape == (400, 400, 3) and sample.image.dtype == np.uint8
    # Spots keep half a patch away from the edge, so every patch lies inside the image.
    half = TINY.patch_fov_um / 2
    assert (sample.spot_xy >= half - 1e-9).all() and (sample.spot_xy <= TINY.sample_size_um - half + 1e-9).all()
    # Sum pooling: each spot's counts equal the sum over the cells inside its disc.
    d = np.linalg.norm(sample.spot_xy[:, None] - sample.cell_xy[None], axis=-1) <= TINY.spot_diameter_um / 2
    np.testing.assert_allclose(sample.spot_counts, d.astype(np.float32) @ sample.cell_counts.toarray(), rtol=1e-6)


def test_marker_genes_follow_cell_types(sample):
    """Each type's canonical markers are expressed higher in that type's cells than in the others."""
    panel = load_panel(TINY.panel)
    index = {g: i for i, g in enumerate(panel.genes)}
    x = sample.cell_counts.toarray()
    checked = 0
    for t, (markers, *_rest) in enumerate(CELL_TYPES.values()):
        cols = [index[m] for m in markers if m in index]
        mine = sample.cell_type == t
        if not cols or mine.sum() < 10:
            continue
        # Markers get +2..3 log-fold-change in their own type: well over 3x the mean count elsewhere.
        assert x[mine][:, cols].mean() > 3.0 * x[~mine][:, cols].mean()
        checked += 1
    assert checked >= 4


def test_library_size_matches_panel(sample):
    panel = load_panel(TINY.panel)
    per_spot = sample.spot_counts.sum(1).mean()
    # The panel's mean counts per 55 µm spot, within a factor of 2 (cell density and donor factor vary).
    assert 0.5 < per_spot / panel.mean_counts.sum() < 2.0


def test_donor_batch_effect_in_both_modalities():
    a, b = generate_sample(TINY, 0, 0), generate_sample(TINY, 1, 0)
    la = np.log1p(a.cell_counts.toarray()).mean(0)
    lb = np.log1p(b.cell_counts.toarray()).mean(0)
    assert np.abs(la - lb).mean() > 0.05
    assert np.abs(a.image.reshape(-1, 3).mean(0) - b.image.reshape(-1, 3).mean(0)).max() > 1.0


def test_image_shows_cell_density(sample):
    """Strongly stained pixels (low green: both stains absorb it) are more frequent where more cells sit."""
    green = sample.image[..., 1]
    px = TINY.pixel_size_um
    dark, dens = [], []
    for (x, y), n in zip(sample.spot_xy, sample.spot_n_cells, strict=True):
        r0, c0 = int(y / px) - 27, int(x / px) - 27
        dark.append((green[r0 : r0 + 55, c0 : c0 + 55] < 80).mean())
        dens.append(n)
    assert np.corrcoef(dark, dens)[0, 1] > 0.4
