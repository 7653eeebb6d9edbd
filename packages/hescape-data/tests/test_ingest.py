"""End to end: Xenium bundles and the Visium fixture -> Arrow datasets (+ QC figure), and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from hescape.data import PairedSpotDataset, read_manifest, verify_dataset
from hescape.data.arrow import open_shard
from hescape.data.cli import main
from hescape.data.errors import HescapeDataError, InputFormatError, RegistrationError
from hescape.data.geometry import SpotGeometry
from hescape.data.ingest import PatchOptions, SpotOptions, build_visium_dataset, build_xenium_dataset
from hescape.data.panels import load_panel
from hescape.data.synthetic import generate_sample

#: 55 µm discs on a 60 µm hex lattice: dense enough for a dozen spots on the small bundle.
DISC60 = SpotGeometry(shape="disc", diameter_um=55.0, pitch_um=60.0, grid="hex", name="custom")


def test_build_xenium_dataset(xenium_bundle, small_cfg, tmp_path):
    out = build_xenium_dataset(xenium_bundle, tmp_path / "ds", donor="donor_A", progress=False,
                               geometry=DISC60, spots=SpotOptions(min_counts=1))
    m = verify_dataset(out)
    assert m["samples"][0]["name"] == "SYN-D00-S0" and m["samples"][0]["donor"] == "donor_A"
    assert m["samples"][0]["tissue"] == "breast" and m["genes"] == list(load_panel(small_cfg.panel).genes)
    assert m["ingest"]["kind"] == "xenium"
    # each stored spot holds exactly the generator's own cells within 27.5 µm of its recorded centre (brute force)
    smp = generate_sample(small_cfg, 0, 0)
    ds = PairedSpotDataset(out)
    centres = np.concatenate([np.asarray(open_shard(out / sh["file"]).column("cell_coords").to_pylist())
                              for sh in m["shards"]])
    inside = np.linalg.norm(centres[:, None] - smp.cell_xy[None], axis=-1) <= 27.5
    assert len(ds) == len(centres) > 10
    np.testing.assert_allclose(ds.raw_counts(), inside.astype(np.float64) @ smp.cell_counts.toarray(), rtol=1e-6)
    # the lattice: nearest stored neighbours are one 60 µm pitch apart
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 1e9
    assert np.median(d.min(1)) == pytest.approx(60.0)
    item = ds[0]
    assert tuple(item["image"].shape) == (3, 224, 224) and item["donor"] == "donor_A"
    assert (out / "qc" / "SYN-D00-S0.png").stat().st_size > 10_000


def test_dense_tiling_keeps_every_count(xenium_bundle, small_cfg, tmp_path):
    """The default 'hescape' geometry tiles the tissue: every cell lies in exactly one 55 µm hexagon, so the
    dataset's total counts equal the bundle's (no cell lost along the section's edges)."""
    out = build_xenium_dataset(xenium_bundle, tmp_path / "ds", progress=False, qc=False)
    smp = generate_sample(small_cfg, 0, 0)
    assert PairedSpotDataset(out).raw_counts().sum() == pytest.approx(smp.cell_counts.sum(), rel=1e-6)
    assert read_manifest(out)["samples"][0]["n_spots"] >= np.ptp(smp.cell_xy, axis=0).prod() / 1965.0  # 55 µm hexagon area


def test_build_xenium_variant_square_grid(xenium_bundle_variant, tmp_path):
    out = build_xenium_dataset(xenium_bundle_variant, tmp_path / "ds", sample="S1", tissue="lung", progress=False,
                               qc=False, spots=SpotOptions(min_cells=3),
                               geometry=SpotGeometry(shape="disc", diameter_um=55.0, grid="square", pitch_um=100.0,
                                                     fov_um=56.0, um_per_px=0.5))
    m = read_manifest(out)
    assert m["samples"][0]["name"] == "S1" and m["samples"][0]["tissue"] == "lung"
    assert PairedSpotDataset(out)[0]["image"].shape[-1] == 112
    assert not (out / "qc").exists()


def test_build_visium_fixture(visium_outs, tmp_path):
    # lowres is ~14 µm/px: 0.5 µm/px patches would be a 28× upsampling, refused unless allowed
    with pytest.raises(InputFormatError, match="upsampled"):
        build_visium_dataset(visium_outs, tmp_path / "ds", image="lowres", progress=False)
    assert list(tmp_path.iterdir()) == []
    out = build_visium_dataset(visium_outs, tmp_path / "ds", image="lowres", tissue="mouse-brain", donor="m1",
                               progress=False, patch=PatchOptions(max_upsample=40))
    m = verify_dataset(out)
    assert m["n_rows"] == 100 and len(m["genes"]) == 100 and m["samples"][0]["tissue"] == "mouse-brain"
    ds = PairedSpotDataset(out)
    img = ds[0]["image"]
    assert tuple(img.shape) == (3, 224, 224) and img.float().std() > 1.0  # real tissue, not a placeholder
    assert (out / "qc" / "visium-spaceranger-1.0.0.png").is_file()


def test_failed_build_leaves_nothing(visium_outs, tmp_path):
    with pytest.raises(InputFormatError):
        build_visium_dataset(visium_outs, tmp_path / "ds", image="hires", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_build_info_and_errors(xenium_bundle, visium_outs, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["build", "xenium", str(xenium_bundle), "--out", str(out), "--quiet", "--pitch-um", "80"]) == 0
    assert "spots" in capsys.readouterr().out
    assert main(["info", str(out), "--verify"]) == 0
    assert "checksums OK" in capsys.readouterr().out
    # errors: one line on stderr, exit code 2, nothing written
    cases = [
        ["build", "xenium", str(xenium_bundle), "--out", str(out), "--quiet"],  # exists
        ["build", "xenium", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"), "--quiet"],
        ["build", "visium", str(visium_outs), "--image", "hires", "--out", str(tmp_path / "o2"), "--quiet"],
        ["build", "xenium", str(xenium_bundle), "--out", str(tmp_path / "o3"), "--quiet", "--panel", "human-5k"],
        ["info", str(tmp_path / "nothing")],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hescape-data: error: ") and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_transcript_pooling(xenium_bundle_variant, xenium_bundle, tmp_path):
    """Pooling transcripts (QV >= 20) ~ pooling cells: same genes, 2 µm jitter only moves edge molecules."""
    kw = {"progress": False, "qc": False, "geometry": "visium"}
    a = PairedSpotDataset(build_xenium_dataset(xenium_bundle_variant, tmp_path / "cells", **kw)).raw_counts()
    b = PairedSpotDataset(build_xenium_dataset(xenium_bundle_variant, tmp_path / "tx", counts_from="transcripts",
                                               **kw)).raw_counts()
    c = PairedSpotDataset(build_xenium_dataset(xenium_bundle_variant, tmp_path / "tx0", counts_from="transcripts",
                                               min_qv=0.0, **kw)).raw_counts()
    assert a.shape == b.shape
    assert abs(b.sum() / a.sum() - 1) < 0.1 and np.corrcoef(a.sum(1), b.sum(1))[0, 1] > 0.9
    assert c.sum() > b.sum()  # low-QV molecules are excluded by the default threshold
    with pytest.raises(InputFormatError, match="transcripts.parquet"):
        build_xenium_dataset(xenium_bundle, tmp_path / "x", counts_from="transcripts", progress=False)
    assert not (tmp_path / "x").exists()


def _shift_alignment(bundle, dx_morph_px: float) -> None:
    f = next(bundle.glob("*he_imagealignment.csv"))
    m = np.loadtxt(f, delimiter=",")
    m[0, 2] += dx_morph_px  # the H&E frame moves against the tissue: part of it now maps off the image
    np.savetxt(f, m, delimiter=",")


def test_spots_outside_image_error_or_drop(bundle_copy, tmp_path):
    _shift_alignment(bundle_copy, 900.0)
    spots = DISC60
    with pytest.raises(InputFormatError, match="fall outside the H&E image") as e:
        build_xenium_dataset(bundle_copy, tmp_path / "ds", progress=False, qc=False, geometry=spots)
    assert "--outside-spots drop" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no output, not even a temporary directory
    # the spots left on the image are shifted off their tissue too: the registration check refuses that
    with pytest.raises(RegistrationError, match="registration AUROC"):
        build_xenium_dataset(bundle_copy, tmp_path / "ds", progress=False, qc=False, geometry=spots,
                             patch=PatchOptions(outside_spots="drop"))
    out = build_xenium_dataset(bundle_copy, tmp_path / "ds", progress=False, qc=False, geometry=spots,
                               patch=PatchOptions(outside_spots="drop", registration_check=False))
    m = read_manifest(out)
    assert m["filters"]["outside_image"] > 0 and m["filters"]["kept"] == m["n_rows"] > 0
    assert m["registration"]["verdict"] == "skipped by the user (would refuse)"


def test_min_tissue_fraction_filters_edge_spots(xenium_bundle, tmp_path):
    from hescape.data.ingest import tissue_fraction

    assert tissue_fraction(np.full((4, 4, 3), 255, np.uint8)) == 0.0
    assert tissue_fraction(np.full((4, 4, 3), 120, np.uint8)) == 1.0
    spots = DISC60
    everything = read_manifest(build_xenium_dataset(xenium_bundle, tmp_path / "all", progress=False, qc=False,
                                                    geometry=spots))
    strict = read_manifest(build_xenium_dataset(xenium_bundle, tmp_path / "strict", progress=False, qc=False,
                                                geometry=spots, patch=PatchOptions(min_tissue_fraction=0.9)))
    # Spots near the section's edge have patches half on glass: the strict filter drops them.
    assert 0 < strict["n_rows"] < everything["n_rows"]
    assert strict["filters"]["low_tissue"] == everything["n_rows"] - strict["n_rows"]
    with pytest.raises(HescapeDataError, match=r"min-tissue-fraction: expected a finite number in \[0, 1\]"):
        build_xenium_dataset(xenium_bundle, tmp_path / "none", progress=False, qc=False, geometry=spots,
                             patch=PatchOptions(min_tissue_fraction=1.01))
    assert not (tmp_path / "none").exists()


def test_inverted_alignment_is_refused_even_with_drop(bundle_copy, tmp_path):
    """An inverted H&E alignment puts most spots off the image; dropping them would keep a few wrong patches."""
    f = next(bundle_copy.glob("*he_imagealignment.csv"))
    np.savetxt(f, np.linalg.inv(np.loadtxt(f, delimiter=",")), delimiter=",")
    with pytest.raises(InputFormatError, match="alignment is wrong"):
        build_xenium_dataset(bundle_copy, tmp_path / "ds", progress=False, qc=False,
                             patch=PatchOptions(outside_spots="drop"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
