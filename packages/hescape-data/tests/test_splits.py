"""Re-splitting a dataset: by donor at random or by a reference preset; manifest-only, atomic, leakage-checked."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hescape.data import (
    DatasetWriter,
    HescapeDataError,
    PairedSpotDataset,
    SplitLeakageError,
    SpotRecords,
    list_panels,
    load_split_preset,
    read_manifest,
)
from hescape.data.arrow import encode_png, write_manifest
from hescape.data.cli import main
from hescape.data.splits import apply_splits, donor_split_assignment, preset_donors, preset_split_assignment


def _rec(name, donor, seed):
    rng = np.random.default_rng(seed)
    return SpotRecords(name=name, donor=donor, tissue="t", source="s",
                       images=[encode_png(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)) for _ in range(3)],
                       gexp=rng.poisson(2, (3, 5)).astype(np.float32), coords_um=np.zeros((3, 2)),
                       n_cells=np.ones(3))


def _write(path, samples):
    genes = [f"G{i}" for i in range(5)]
    with DatasetWriter(path, genes=genes, gene_ids=genes) as w:
        for i, (name, donor) in enumerate(samples):
            w.add(_rec(name, donor, i), split="train")
    return path


@pytest.fixture
def breast(tmp_path):
    # the five breast-panel reference samples; TENX94 and TENX95 share a donor here on purpose
    return _write(tmp_path / "breast", [("TENX99", "p1"), ("TENX95", "p2"), ("TENX94", "p2"), ("NCBI785", "p4"),
                                        ("NCBI783", "p5")])


def _shard_bytes(path):
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path)) if f.endswith(".arrow")}


def test_preset_split_rewrites_manifest_only(breast, capsys):
    before = _shard_bytes(breast)
    assert main(["split", str(breast), "--preset", "human-breast-panel"]) == 0
    m = read_manifest(breast)
    assert {s["name"]: s["split"] for s in m["samples"]} == {
        "TENX99": "train", "TENX95": "train", "TENX94": "train", "NCBI785": "val", "NCBI783": "test"}
    assert _shard_bytes(breast) == before
    assert [f for f in os.listdir(breast) if f.startswith(".")] == []  # no temporary file left
    assert len(PairedSpotDataset(breast, "test")) == 3 and PairedSpotDataset(breast, "test").samples[0] == "NCBI783"
    assert "test=3" in capsys.readouterr().out


def test_preset_unmatched_ids_are_listed(tmp_path):
    ds = _write(tmp_path / "d", [("TENX99", "a"), ("TENX_95", "b"), ("foo", "c")])
    with pytest.raises(HescapeDataError, match=r"2 unmatched: 'TENX_95' \(close: 'TENX95'\), 'foo'"):
        preset_split_assignment(read_manifest(ds)["samples"], "human-breast-panel")
    assert main(["split", str(ds), "--preset", "human-breast-panel"]) == 2
    assert {s["split"] for s in read_manifest(ds)["samples"]} == {"train"}


def test_preset_by_donor_column_and_absent_ids(tmp_path):
    ds = _write(tmp_path / "d", [("s1", "TENX99"), ("s2", "NCBI783"), ("s3", "NCBI785")])
    assignment, absent = preset_split_assignment(read_manifest(ds)["samples"], "human-breast-panel", match="donor")
    assert assignment == {"s1": "train", "s2": "test", "s3": "val"}
    assert absent == ["TENX94", "TENX95"]


def test_leaking_preset_is_refused_atomically(tmp_path):
    # one donor holds a train sample and the test sample of the preset: refused, manifest untouched
    ds = _write(tmp_path / "d", [("TENX99", "p1"), ("TENX95", "p2"), ("NCBI785", "p3"), ("NCBI783", "p1")])
    text = (ds / "manifest.json").read_text()
    assert main(["split", str(ds), "--preset", "human-breast-panel", "--keep-donors"]) == 2
    assert (ds / "manifest.json").read_text() == text
    with pytest.raises(SplitLeakageError, match="p1 in"):
        apply_splits(ds, preset_split_assignment(read_manifest(ds)["samples"], "human-breast-panel")[0])
    # A dataset whose donors leak cannot be opened for training either.
    with pytest.raises(SplitLeakageError, match="p1 in"):
        m = read_manifest(ds)
        m["samples"][0]["split"] = "test"
        write_manifest(ds, m)
        PairedSpotDataset(ds, split="train")


def test_preset_patient_column_gives_the_donors(tmp_path):
    """The reference CSVs name each sample's patient: TENX99 (patient 1) and NCBI783 (patient 5 of another study)
    are different people, so the preset split applies once donors come from that column (the default)."""
    ds = _write(tmp_path / "d", [("TENX99", "p1"), ("TENX95", "p2"), ("NCBI785", "p3"), ("NCBI783", "p1")])
    assert main(["split", str(ds), "--preset", "human-breast-panel"]) == 0
    donors = {s["name"]: s["donor"] for s in read_manifest(ds)["samples"]}
    assert donors["TENX99"].endswith("patient 1") and donors["NCBI783"].endswith("patient 5")
    assert len(set(donors.values())) == 4
    # Three colon sections of one study's "Patient 1" are one donor; unnamed patients stay per sample.
    colon = preset_donors("human-colon-panel")
    assert colon["TENX147"] == colon["TENX148"] == colon["TENX149"] and colon["TENX111"] == "TENX111"
    # "patient 2" of two different studies are two donors
    multi = preset_donors("human-multi-tissue-panel")
    assert multi["TENX124"] != multi["TENX116"]


@pytest.mark.parametrize("panel", list_panels())
def test_every_reference_preset_applies(tmp_path, panel):
    rows = load_split_preset(panel)
    ids = sorted({r["id"] for split in rows.values() for r in split})
    ds = _write(tmp_path / "d", [(i, i) for i in ids])
    samples = read_manifest(ds)["samples"]
    try:
        assignment, absent = preset_split_assignment(samples, panel)
    except HescapeDataError as e:  # only the skin preset lists an id twice
        assert panel == "human-skin-panel" and "TENX117 in ['val', 'test']" in str(e)
        assignment, absent = preset_split_assignment(samples, panel, conflict="test")
    assert absent == []
    m = apply_splits(ds, assignment)
    expected = {r["id"]: split for split in ("train", "val", "test") for r in rows[split]}
    if panel == "human-skin-panel":
        expected["TENX117"] = "test"
    assert {s["name"]: s["split"] for s in m["samples"]} == expected


def test_by_donor_is_seeded_and_donor_level(tmp_path):
    ds = _write(tmp_path / "d", [(f"s{i}", f"d{i // 2}") for i in range(12)])  # 6 donors, 2 samples each
    samples = read_manifest(ds)["samples"]
    a = donor_split_assignment(samples, n_val=2, n_test=1, seed=3)
    assert a == donor_split_assignment(list(reversed(samples)), n_val=2, n_test=1, seed=3)
    assert any(donor_split_assignment(samples, n_val=2, n_test=1, seed=s) != a for s in range(4, 10))
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        assert len({s["donor"] for s in samples if a[s["name"]] == split}) == n
    assert main(["split", str(ds), "--by", "donor", "--val", "2", "--test", "1", "--seed", "3"]) == 0
    assert {s["name"]: s["split"] for s in read_manifest(ds)["samples"]} == a
    with pytest.raises(HescapeDataError, match="expected at least 7 donors"):
        donor_split_assignment(samples, n_val=3, n_test=3)


def test_apply_splits_validates(breast):
    names = [s["name"] for s in read_manifest(breast)["samples"]]
    with pytest.raises(HescapeDataError, match="found none for"):
        apply_splits(breast, {names[0]: "train"})
    with pytest.raises(HescapeDataError, match="expected split names"):
        apply_splits(breast, dict.fromkeys(names, "holdout"))
    m = json.loads((breast / "manifest.json").read_text())
    assert {s["split"] for s in m["samples"]} == {"train"}
