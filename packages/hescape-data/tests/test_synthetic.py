"""The synthetic generator: deterministic, biologically shaped, with donor batch effects."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hescape.data import SyntheticConfig, generate_sample, load_panel
from hescape.data.geometry import SpotGeometry
from hescape.data.synthetic import CELL_TYPES, DEMO_GEOMETRY
from scipy import ndimage
from scipy.spatial import cKDTree

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
    half = TINY.geometry.fov_um / 2
    assert (sample.spot_xy >= half - 1e-9).all() and (sample.spot_xy <= TINY.sample_size_um - half + 1e-9).all()
    # The demo geometry: HESCAPE's 55 µm pointy-top hexagons, centres 55·√3/2 µm apart, 64 µm patches of 64 px.
    geo = TINY.geometry
    assert (geo.shape, geo.diameter_um, geo.grid, geo.fov_um, geo.patch_px) == ("hexagon", 55.0, "hex", 64.0, 64)
    nn = np.sort(np.linalg.norm(sample.spot_xy[:, None] - sample.spot_xy[None], axis=-1), axis=1)[:, 1]
    np.testing.assert_allclose(nn, 55.0 * math.sqrt(3) / 2, rtol=1e-9)
    # Sum pooling: each spot's counts equal the sum over the cells inside its hexagon, written here as the
    # intersection of three slabs: |offset · n| <= inradius (55·√3/4 µm) for edge normals at 0°, 60° and 120°.
    off = sample.cell_xy[None] - sample.spot_xy[:, None]  # (spots, cells, 2)
    inside = np.ones(off.shape[:2], dtype=bool)
    for deg in (0.0, 60.0, 120.0):
        normal = np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])
        inside &= np.abs(off @ normal) <= 55.0 * math.sqrt(3) / 4 + 1e-9
    assert inside.sum(0).max() == 1  # hexagons tile: no cell is pooled twice
    np.testing.assert_allclose(sample.spot_counts, inside.astype(np.float32) @ sample.cell_counts.toarray(),
                               rtol=1e-6)
    np.testing.assert_array_equal(sample.spot_n_cells, inside.sum(1))


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
        # Markers get +2..3 log-fold-change (7-20x) in their own type. A marker may also sit in a state program,
        # which raises it in every type, so the typical (median) marker is checked: well over 3x elsewhere.
        ratio = x[mine][:, cols].mean(0) / np.maximum(x[~mine][:, cols].mean(0), 1e-9)
        assert np.median(ratio) > 3.0, (t, ratio)
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


def test_geometry_is_a_spot_geometry():
    with pytest.raises(Exception, match="SpotGeometry"):
        SyntheticConfig(geometry={"shape": "hexagon"})
    custom = SyntheticConfig(sample_size_um=400.0, geometry=SpotGeometry(shape="disc", pitch_um=100.0, fov_um=56.0,
                                                                         um_per_px=1.0, name="custom"))
    smp = generate_sample(custom, 0, 0)
    assert len(smp.spot_xy) < len(generate_sample(TINY, 0, 0).spot_xy)  # a coarser lattice: fewer spots
    assert DEMO_GEOMETRY.patch_px == 64 and DEMO_GEOMETRY.um_per_px == TINY.pixel_size_um


def _nucleus_diameter(image: np.ndarray, centre_xy, px: float) -> float:
    """Median equivalent diameter (µm) of the dark blobs in a 40 µm square around a point. A blob is a
    connected set of pixels darker than half-way between the window's background (its 90th-percentile red)
    and its darkest red (haematoxylin absorbs red light, eosin hardly does), holes filled, specks under 4 µm²
    dropped."""
    r0, c0 = int((centre_xy[1] - 20) / px), int((centre_xy[0] - 20) / px)
    red = image[r0 : r0 + int(40 / px), c0 : c0 + int(40 / px), 0].astype(float)
    lab, n = ndimage.label(ndimage.binary_fill_holes(red < (np.percentile(red, 90) + red.min()) / 2))
    areas = np.bincount(lab.ravel())[1:] * px * px
    areas = areas[areas >= 4.0]  # not noise specks
    return float(np.median(2 * np.sqrt(areas / np.pi))) if len(areas) else float("nan")


def test_nuclei_show_cell_type_morphology():
    """Where lymphocytes dominate, nuclei are small; where tumour cells dominate, they are large.
    Truth (standard histology): a lymphocyte nucleus is at most ~7 µm across, a carcinoma nucleus 1.5-3 times
    that."""
    cfg = SyntheticConfig(sample_size_um=700.0, stain_sd=0.0, seed=3)
    smp = generate_sample(cfg, 0, 0)
    names = list(CELL_TYPES)
    diam = {}
    tree = cKDTree(smp.cell_xy)
    for t in ("t_cell", "tumour_epithelial"):
        mine = smp.cell_type == names.index(t)
        # cells whose neighbours within 20 µm are at least 70 % of type t, away from the section's edge
        frac = np.array([mine[j].mean() for j in tree.query_ball_point(smp.cell_xy, 20.0)])
        ok = (frac > 0.7) & mine & (smp.cell_xy > 25).all(1) & (smp.cell_xy < cfg.sample_size_um - 25).all(1)
        pts = smp.cell_xy[ok][:: max(1, int(ok.sum()) // 30)]
        assert len(pts) >= 4, t
        diam[t] = np.nanmedian([_nucleus_diameter(smp.image, p, cfg.pixel_size_um) for p in pts])
    assert 2.5 < diam["t_cell"] <= 7.0
    assert 1.5 * diam["t_cell"] < diam["tumour_epithelial"] < 3.0 * diam["t_cell"]


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
