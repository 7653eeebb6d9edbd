"""SpotGeometry: lattices and spot shapes against brute-force geometry, presets, and the manifest record."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hescape.data import read_manifest
from hescape.data.errors import HescapeDataError
from hescape.data.geometry import GEOMETRY_PRESETS, SpotGeometry, get_geometry
from hescape.data.ingest import build_xenium_dataset
from scipy.spatial import cKDTree


def _inside_brute(shape: str, d: float, off: np.ndarray) -> np.ndarray:
    """Membership from first principles: a disc is a distance, a square two half-widths, a pointy-top
    regular hexagon the intersection of three strips of half-width = apothem (normals at 0°, 60°, 120°)."""
    r = d / 2
    if shape == "disc":
        return np.hypot(off[:, 0], off[:, 1]) <= r
    if shape == "square":
        return (np.abs(off) <= r).all(1)
    apothem = r * math.sqrt(3) / 2
    normals = np.array([[math.cos(a), math.sin(a)] for a in np.deg2rad([0.0, 60.0, 120.0])])
    return (np.abs(off @ normals.T) <= apothem).all(1)


@pytest.mark.parametrize("g", [*GEOMETRY_PRESETS.values(),
                               SpotGeometry(shape="hexagon", diameter_um=30.0, pitch_um=40.0, grid="square"),
                               SpotGeometry(shape="disc", diameter_um=80.0, pitch_um=50.0, grid="hex")],
                         ids=lambda g: f"{g.name}-{g.shape}-{g.grid}")
def test_membership_matches_brute_force(g):
    rng = np.random.default_rng(1)
    centres = g.centres((0, 0, 600, 600))
    pts = rng.uniform(-50, 650, size=(6000, 2))
    m = g.assign(pts, centres).toarray().astype(bool)
    brute = np.stack([_inside_brute(g.shape, g.diameter_um, pts - c) for c in centres])
    np.testing.assert_array_equal(m, brute)  # random points fall on an edge with probability 0
    assert brute.any(0).sum() > 500  # the check covers many points inside spots


def test_hex_lattice_neighbours_are_one_pitch_apart():
    for name in ("hescape", "visium"):
        g = get_geometry(name)
        c = g.centres((0, 0, 2000, 2000))
        dist, _ = cKDTree(c).query(c, k=7)
        interior = ((c > 300) & (c < 1700)).all(1)
        # six nearest neighbours of an interior spot, all exactly one pitch away (Visium: 100 µm)
        np.testing.assert_allclose(dist[interior, 1:], g.pitch_um, rtol=1e-9)
    assert get_geometry("visium").pitch_um == 100.0 and get_geometry("visium").diameter_um == 55.0


def test_hescape_hexagons_tile_the_plane_and_hest_squares_too():
    """Each interior point lies in exactly one spot: the dense 55 µm tiling of the published dataset."""
    rng = np.random.default_rng(0)
    for name in ("hescape", "hest"):
        g = get_geometry(name)
        c = g.centres((0, 0, 1500, 1500))
        pts = rng.uniform(200, 1300, size=(20000, 2))
        per_point = np.asarray(g.assign(pts, c).sum(0)).ravel()
        assert (per_point == 1).mean() > 0.999
    g = get_geometry("hescape")
    # a regular hexagon of circumradius 27.5 µm has area 3√3/2 · 27.5² = 1964.8 µm²
    assert g.area_um2 == pytest.approx(1.5 * math.sqrt(3) * 27.5**2)
    assert g.patch_px == 224 and g.fov_um == 112.0


@pytest.mark.parametrize(("kw", "match"), [
    ({"diameter_um": -55.0}, "diameter_um"), ({"pitch_um": 0.0}, "pitch_um"), ({"shape": "circle"}, "shape"),
    ({"grid": "triangular"}, "grid"), ({"um_per_px": 1e-4}, "patch size"), ({"fov_um": float("nan")}, "fov_um"),
])
def test_bad_geometry_is_refused(kw, match):
    with pytest.raises(HescapeDataError, match=match):
        SpotGeometry(**kw)
    with pytest.raises(HescapeDataError, match="expected one of"):
        get_geometry("visium-hd")


def test_round_trip_and_custom_name():
    g = get_geometry("hest").with_(pitch_um=80.0)
    assert g.name == "hest+custom" and SpotGeometry.from_dict(g.to_dict()) == g
    assert get_geometry("hest").with_(fov_um=224.0, um_per_px=1.0).name == "hest"  # patch size only


def test_xenium_build_records_geometry_and_spot_spacing(xenium_bundle, tmp_path):
    """Default Xenium build: the 'hescape' geometry, recorded in the manifest; stored spot centres sit on its
    lattice (nearest neighbours 47.63 µm apart, = 55 µm · √3/2)."""
    out = build_xenium_dataset(xenium_bundle, tmp_path / "ds", progress=False, qc=False)
    m = read_manifest(out)
    assert m["geometry"] == get_geometry("hescape").to_dict()
    from hescape.data import PairedSpotDataset
    from hescape.data.arrow import open_shard

    xy = np.concatenate([np.asarray(open_shard(out / s["file"]).column("cell_coords").to_pylist())
                         for s in m["shards"]])
    d, _ = cKDTree(xy).query(xy, k=2)
    assert np.median(d[:, 1]) == pytest.approx(55.0 * math.sqrt(3) / 2, abs=1e-6)
    from hescape.data.xenium_bundle import XeniumBundleOptions

    # the H&E pixel size the bundle was written with (not the morphology's 0.2125)
    assert m["samples"][0]["source_um_per_px"] == pytest.approx(XeniumBundleOptions().he_um_per_px, rel=1e-4)
    assert len(PairedSpotDataset(out)) == m["n_rows"]


@pytest.mark.parametrize("name", ["hest", "hescape"])
def test_points_on_shared_edges_are_counted_once(name):
    """Visium HD 2 µm bin centres on an axis-aligned grid land exactly on the edges of 100 µm squares (and of
    hexagons, along their vertical edges): in a tiling each bin must go to one spot, so counts are conserved."""
    g = get_geometry(name)
    xs = np.arange(0.0, 600.0 + 1e-9, 2.0)
    pts = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    c = g.centres((0, 0, 600 + g.pitch_um, 600 + g.pitch_um))
    per_point = np.asarray(g.assign(pts, c).sum(0)).ravel()
    assert per_point.max() == 1 and per_point.min() == 1  # every bin in exactly one spot, none twice
    if name == "hest":
        per_spot = np.asarray(g.assign(pts, c).sum(1)).ravel()
        assert per_spot.max() == 2500  # a 100 µm square holds 50 × 50 bins of 2 µm, not 51 × 51
