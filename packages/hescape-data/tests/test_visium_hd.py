"""Visium HD: bins pooled into pseudo-spots like Xenium cells (issue 7, fault 2), tested against physical truth.

Truth comes from the synthetic Space Ranger output (``_spaceranger_synth.py``): every bin's centre in image
pixels and its counts, the image's true µm per pixel, and dark discs of exactly 55 µm painted in the image.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hescape.data.arrow import gexp_matrix, pyarrow_dataset, read_manifest
from hescape.data.cli import main
from hescape.data.errors import InputFormatError
from hescape.data.geometry import GEOMETRY_PRESETS
from hescape.data.ingest import build_visium_hd_dataset
from hescape.data.readers.visium_hd import read_visium_hd
from matplotlib.path import Path as PolyPath
from PIL import Image
from scipy.spatial import cKDTree

HESCAPE = GEOMETRY_PRESETS["hescape"]  # 55 µm pointy-top hexagons, centres 55·√3/2 = 47.63 µm apart


def _table(out: Path):
    t = pyarrow_dataset(out).to_table()
    m = read_manifest(out)
    return m, np.asarray(t.column("cell_coords").to_pylist()), gexp_matrix(t.column("gexp"), len(m["genes"])), \
        np.asarray(t.column("n_cells").to_pylist()), t.column("image").to_pylist()


def _true_um(coords_um: np.ndarray, m: dict, true_mpp: float) -> np.ndarray:
    """Stored spot centres in true tissue µm: back to image pixels with the dataset's own µm/px, then × truth."""
    return coords_um / m["samples"][0]["source_um_per_px"] * true_mpp


@pytest.fixture
def hd8(synth, tmp_path) -> dict:
    return synth.write_visium_hd_outs(tmp_path / "run" / "outs", bin_um=8, mpp_error=0.03)


@pytest.mark.parametrize("bin_um", [8, 2])
def test_pooled_counts_are_the_bins_inside_each_spot(synth, bin_um, tmp_path):
    truth = synth.write_visium_hd_outs(tmp_path / "outs", bin_um=bin_um, n_bins=320 // bin_um, n_genes=5)
    out = build_visium_hd_dataset(tmp_path / "outs", tmp_path / "ds", image=truth["image"], bin_size_um=bin_um,
                                  progress=False, qc=False)
    m, coords, gexp, n_bins, _ = _table(out)
    assert m["ingest"]["kind"] == "visium-hd" and m["geometry"]["name"] == "hescape"
    assert m["ingest"]["metadata"]["bin_size_um"] == bin_um
    # brute force: a 55 µm pointy-top hexagon (vertices at 27.5 µm) around each stored centre, in true µm
    centres = _true_um(coords, m, truth["um_per_px"])
    bins = truth["bin_px"] * truth["um_per_px"]
    r = 27.5
    hexagon = np.array([(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in range(30, 390, 60)])
    counts = truth["counts"].toarray()
    for c, g, n in zip(centres, gexp, n_bins, strict=True):
        inside = PolyPath(hexagon + c).contains_points(bins, radius=1e-9)
        assert inside.sum() == n > 0
        np.testing.assert_array_equal(g, counts[inside].sum(0))
    # tiling: no bin is counted twice, and only spots at the tissue edge miss bins
    assert n_bins.sum() <= len(bins) and gexp.sum() <= counts.sum()


def test_spots_on_the_hescape_lattice(hd8, tmp_path):
    out = build_visium_hd_dataset(hd8["outs"], tmp_path / "ds", image=hd8["image"], progress=False, qc=False)
    m, coords, _, _, _ = _table(out)
    xy = _true_um(coords, m, hd8["um_per_px"])
    d, _ = cKDTree(xy).query(xy, k=7)
    assert len(xy) > 30
    np.testing.assert_allclose(d[:, 1], HESCAPE.pitch_um, atol=0.3)  # nearest neighbour: 47.63 µm
    interior = (d[:, 6] < HESCAPE.pitch_um * 1.01)  # spots with all six hex neighbours at one pitch
    assert interior.sum() >= 10
    np.testing.assert_allclose(d[interior, 1:], HESCAPE.pitch_um, atol=0.3)


def test_55um_disc_measures_55um(synth, hd8, tmp_path):
    out = build_visium_hd_dataset(hd8["outs"], tmp_path / "ds", image=hd8["image"], progress=False, qc=False)
    m, coords, _, _, images = _table(out)
    assert m["samples"][0]["source_um_per_px"] == pytest.approx(hd8["um_per_px"], rel=1e-6)  # not the +3 % file
    px = coords / m["samples"][0]["source_um_per_px"]
    for disc in hd8["discs_px"]:
        k = int(np.argmin(np.linalg.norm(px - disc, axis=1)))  # the spot whose patch holds this disc
        patch = np.asarray(Image.open(io.BytesIO(images[k]["bytes"])).convert("RGB"))
        assert synth.dark_disc_diameter_um(patch, 0.5) == pytest.approx(55.0, abs=2.0)


def test_microns_per_pixel_cross_check(synth, tmp_path):
    truth = synth.write_visium_hd_outs(tmp_path / "a" / "outs", mpp_error=0.08)
    with pytest.warns(UserWarning, match="bin lattice gives"):
        out = build_visium_hd_dataset(truth["outs"], tmp_path / "ds", image=truth["image"], progress=False,
                                      qc=False)
    m, coords, _, _, _ = _table(out)
    assert m["ingest"]["metadata"]["scale_disagreement"] == pytest.approx(0.08, abs=1e-6)
    xy = _true_um(coords, m, truth["um_per_px"])
    np.testing.assert_allclose(cKDTree(xy).query(xy, k=2)[0][:, 1], HESCAPE.pitch_um, atol=0.3)
    bad = synth.write_visium_hd_outs(tmp_path / "b" / "outs", mpp_error=0.5)
    with pytest.raises(InputFormatError, match="microns_per_pixel"):
        read_visium_hd(bad["outs"], image=bad["image"])


def test_bin_folder_or_outs_and_bin_size(hd8, tmp_path):
    a = read_visium_hd(hd8["outs"], image=hd8["image"])
    b = read_visium_hd(hd8["folder"], image=hd8["image"])  # the bin folder itself
    c = read_visium_hd(hd8["outs"] / "binned_outputs", image=hd8["image"], bin_size_um=8)
    for s in (a, b, c):
        s.close()
    np.testing.assert_array_equal(a.xy_um, b.xy_um)
    np.testing.assert_array_equal(a.xy_um, c.xy_um)
    assert a.name == "run" and a.kind == "bins" and a.metadata["n_bins"] == a.counts.shape[0]
    with pytest.raises(InputFormatError, match=r"found only \['square_008um'\]"):
        read_visium_hd(hd8["outs"], image=hd8["image"], bin_size_um=16)
    with pytest.raises(InputFormatError, match="16 µm bins"):
        read_visium_hd(hd8["folder"], image=hd8["image"], bin_size_um=16)
    f = hd8["folder"] / "spatial" / "scalefactors_json.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "bin_size_um": 2.0}))
    with pytest.raises(InputFormatError, match="one bin size"):
        read_visium_hd(hd8["outs"], image=hd8["image"])


def test_visium_spot_output_refused_by_hd_reader(synth, tmp_path):
    vis = synth.write_visium_outs(tmp_path / "outs")
    with pytest.raises(InputFormatError, match="hescape-data build visium`"):
        read_visium_hd(vis["outs"], image=vis["image"])


def test_cli_build_visium_hd(synth, hd8, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["build", "visium-hd", str(hd8["outs"]), "--image", str(hd8["image"]), "--out", str(out),
                 "--quiet", "--no-qc"]) == 0
    assert "spots" in capsys.readouterr().out
    assert read_manifest(out)["samples"][0]["source"] == "visium-hd"
    # the same output through the Visium (55 µm spot) builder: one line naming Visium HD, nothing written
    assert main(["build", "visium", str(hd8["outs"]), "--image", str(hd8["image"]), "--out",
                 str(tmp_path / "ds2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hescape-data: error: ") and "\n" not in err
    assert "Visium HD" in err and "hescape-data build visium-hd" in err
    assert not (tmp_path / "ds2").exists()
    # a coarse bin for a 55 µm spot is allowed with a warning (the pooled area is quantised to whole bins)
    truth16 = synth.write_visium_hd_outs(tmp_path / "r16" / "outs", bin_um=16, n_bins=20)
    assert main(["build", "visium-hd", str(truth16["outs"]), "--bin-size", "16", "--image", str(truth16["image"]),
                 "--out", str(tmp_path / "ds16"), "--quiet", "--no-qc"]) == 0
    assert "hescape-data: warning:" in capsys.readouterr().err


def test_bins_off_tissue_are_the_registration_background(hd8):
    """Space Ranger flags every bin of the capture area in_tissue 0/1 (tissue_positions.parquet): the 0 bins are
    the registration check's known background and the 1 bins its positives, in µm (8 µm bins: neighbours 8 µm
    apart)."""
    import pyarrow.parquet as pq
    from scipy.spatial import cKDTree

    s = read_visium_hd(hd8["outs"], image=hd8["image"])
    s.close()
    flags = pq.read_table(hd8["folder"] / "spatial" / "tissue_positions.parquet").column("in_tissue").to_numpy()
    assert 0 < len(s.background_um) == int((flags == 0).sum())
    assert len(s.tissue_um) == int((flags == 1).sum())
    for pts in (s.background_um, s.tissue_um):
        d, _ = cKDTree(pts).query(pts, k=2)
        np.testing.assert_allclose(np.median(d[:, 1]), 8.0, rtol=0.05)  # mpp_error=0.03 in the file: lattice wins
