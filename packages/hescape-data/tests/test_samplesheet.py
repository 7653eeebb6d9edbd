"""Samplesheet builds (many samples -> one dataset, parallel, resumable) and ``hescape-data merge``.

Truth: each sample built alone by the single-sample builder (``build_xenium_dataset``) with the same options; the
merged / samplesheet dataset must hold exactly those rows (gexp, image bytes, coordinates, spot ids). Bad inputs
are hand-written samplesheets, each with one known fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hescape.data import (
    DatasetWriter,
    SpotRecords,
    build_from_samplesheet,
    build_xenium_dataset,
    merge_datasets,
    read_manifest,
    verify_dataset,
)
from hescape.data.arrow import index_arrow_shards, open_shard
from hescape.data.cli import main
from hescape.data.errors import DatasetFormatError, InputFormatError, PanelMismatchError, SplitLeakageError
from hescape.data.geometry import get_geometry
from hescape.data.samplesheet import parts_dir, read_samplesheet
from hescape.data.xenium_bundle import XeniumBundleOptions, small_bundle_config, write_xenium_bundle

#: 240 × 240 µm sections at 0.5 µm/px: ~25 pseudo-spots each, about a second per build.
CFG = small_bundle_config(240.0, pixel_size_um=0.5)
HEADER = "technology,path,sample,donor,tissue,panel,split,options\n"
COLS = ["name", "gexp", "cell_coords", "spot_id", "n_cells", "donor", "tissue", "source"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ss_bundles")
    return [write_xenium_bundle(root / f"b{d}", CFG, XeniumBundleOptions(), donor=d) for d in range(3)]


@pytest.fixture(scope="module")
def reference(bundles, tmp_path_factory) -> dict[str, Path]:
    """Each sample built alone, with the options the samplesheet below gives it."""
    root = tmp_path_factory.mktemp("ss_ref")
    refs = {}
    for i, b in enumerate(bundles):
        refs[f"S{i}"] = build_xenium_dataset(b, root / f"S{i}", sample=f"S{i}", donor=f"D{i}", tissue="breast",
                                             panel="human-breast-panel", progress=False, qc=False)
    return refs


def _sheet(path: Path, bundles, rows=None) -> Path:
    """Row i reads bundle i."""
    rows = rows or [("S0", "D0", "train", ""), ("S1", "D1", "val", ""), ("S2", "D2", "test", "")]
    lines = [HEADER] + [f"xenium,{bundles[i]},{s},{d},breast,human-breast-panel,{sp},{o}\n"
                        for i, (s, d, sp, o) in enumerate(rows)]
    path.write_text("".join(lines))
    return path


def _table(ds: Path) -> pa.Table:
    m = read_manifest(ds)
    return pa.concat_tables([open_shard(ds / s["file"], s["rows"]) for s in m["shards"]])


def _rows(t: pa.Table, name: str) -> dict:
    t = t.filter(pa.compute.equal(t.column("name"), name))
    out = {c: t.column(c).to_pylist() for c in COLS}
    out["image"] = [im["bytes"] for im in t.column("image").to_pylist()]
    return out


def _shard_hashes(ds: Path) -> list[str]:
    return [s["sha256"] for s in read_manifest(ds)["shards"]]


@pytest.fixture(scope="module")
def built(bundles, tmp_path_factory) -> tuple[Path, Path, list[str], list[dict]]:
    """The three bundles built from one samplesheet with --jobs 1 (in this process); its shard hashes and samples
    as built (later tests re-split and rebuild it)."""
    root = tmp_path_factory.mktemp("ss_built")
    sheet = _sheet(root / "samples.csv", bundles)
    res = build_from_samplesheet(sheet, root / "ds", jobs=1, qc=False, progress=False)
    assert [s.status for s in res.samples] == ["built"] * 3 and not res.failed
    return sheet, res.out, _shard_hashes(res.out), read_manifest(res.out)["samples"]


def test_samplesheet_equals_single_sample_builds(built, reference):
    _, ds, hashes, _ = built
    assert hashes == [h for name in ("S0", "S1", "S2") for h in _shard_hashes(reference[name])]
    m = verify_dataset(ds)
    assert [(s["name"], s["donor"], s["split"], s["tissue"]) for s in m["samples"]] == [
        ("S0", "D0", "train", "breast"), ("S1", "D1", "val", "breast"), ("S2", "D2", "test", "breast")]
    assert m["geometry"] == read_manifest(reference["S0"])["geometry"]
    t = _table(ds)
    for name, ref in reference.items():
        want, got = _rows(_table(ref), name), _rows(t, name)
        assert len(got["gexp"]) == read_manifest(ref)["n_rows"] > 5
        assert got == want, name
    assert m["genes"] == read_manifest(reference["S0"])["genes"]
    # splits by donor and from the rows work on the assembled dataset as on any other
    assert main(["split", str(ds), "--by", "donor", "--val", "1", "--test", "1", "--seed", "3"]) == 0
    assert sorted(s["split"] for s in read_manifest(ds)["samples"]) == ["test", "train", "val"]


def test_rerun_skips_finished_and_changed_option_rebuilds(built, bundles, tmp_path):
    sheet, ds, _, _ = built
    parts = parts_dir(ds)
    part_files = {p.name: p for p in parts.iterdir()}
    assert len(part_files) == 3
    mtimes = {p: (p / "manifest.json").stat().st_mtime_ns for p in part_files.values()}
    ds_mtime = (ds / "manifest.json").stat().st_mtime_ns
    # the same command again: nothing to do, the dataset is left as it is
    res = build_from_samplesheet(sheet, ds, jobs=1, qc=False, progress=False)
    assert [s.status for s in res.samples] == ["up to date"] * 3
    assert (ds / "manifest.json").stat().st_mtime_ns == ds_mtime
    # a changed option on one row: only that sample is built again (--overwrite: the dataset was complete)
    sheet2 = _sheet(tmp_path / "changed.csv", bundles,
                    [("S0", "D0", "train", ""), ("S1", "D1", "val", "min_counts=40"), ("S2", "D2", "test", "")])
    with pytest.raises(FileExistsError):
        build_from_samplesheet(sheet2, ds, jobs=1, qc=False, progress=False)
    res = build_from_samplesheet(sheet2, ds, jobs=1, qc=False, progress=False, overwrite=True)
    assert [s.status for s in res.samples] == ["skipped", "built", "skipped"]
    for p, t in mtimes.items():
        if p.name.startswith(("S0-", "S2-")):
            assert (p / "manifest.json").stat().st_mtime_ns == t  # not rebuilt
        else:
            assert not p.exists()  # the part of the old fingerprint is gone
    t = _table(ds)
    g1 = np.asarray(_rows(t, "S1")["gexp"])
    assert g1.sum(1).min() >= 40 and len(g1) < res.samples[0].n_spots * 2
    # a split change needs no build: the fingerprint leaves the split out
    sheet3 = _sheet(tmp_path / "split.csv", bundles,
                    [("S0", "D0", "val", ""), ("S1", "D1", "train", "min_counts=40"), ("S2", "D2", "test", "")])
    res = build_from_samplesheet(sheet3, ds, jobs=1, qc=False, progress=False, overwrite=True)
    assert [s.status for s in res.samples] == ["skipped"] * 3
    assert [s["split"] for s in read_manifest(ds)["samples"]] == ["val", "train", "test"]


def test_failed_sample_keeps_the_others_and_rerun_retries(bundles, reference, tmp_path, capsys):
    broken = Path(shutil.copytree(bundles[1], tmp_path / "broken"))
    good = (broken / "cells.parquet").read_bytes()
    (broken / "cells.parquet").write_bytes(b"not a parquet file")
    sheet = tmp_path / "s.csv"
    sheet.write_text(HEADER + f"xenium,{bundles[0]},S0,D0,breast,human-breast-panel,train,\n"
                     f"xenium,{broken},S1,D1,breast,human-breast-panel,val,\n"
                     f"xenium,{bundles[2]},S2,D2,breast,human-breast-panel,test,\n")
    out = tmp_path / "ds"
    argv = ["build", "--samplesheet", str(sheet), "--out", str(out), "--quiet", "--no-qc"]
    assert main(argv) == 2
    cap = capsys.readouterr()
    line = next(ln for ln in cap.out.splitlines() if ln.startswith("S1 "))
    assert "failed" in line and "cells.parquet" in line and "expected" in line
    assert "1 of 3 samples failed (S1" in cap.err and "holds the other 2" in cap.err
    m = verify_dataset(out)
    assert [s["name"] for s in m["samples"]] == ["S0", "S2"]
    assert set(m["samplesheet"]["failed"]) == {"S1"}
    t = _table(out)
    assert _rows(t, "S2") == _rows(_table(reference["S2"]), "S2")
    parts = {p.name.split("-")[0]: p for p in parts_dir(out).iterdir()}
    assert set(parts) == {"S0", "S2"}  # a failed sample leaves no part
    before = {k: (p / "manifest.json").stat().st_mtime_ns for k, p in parts.items()}
    # fixed input, same command, no --overwrite: the incomplete dataset is completed; S0 and S2 are not rebuilt
    (broken / "cells.parquet").write_bytes(good)
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert [ln.split()[2] for ln in cap.out.splitlines()[1:4]] == ["skipped", "built", "skipped"]
    assert {k: (p / "manifest.json").stat().st_mtime_ns for k, p in parts.items()} == before
    m = verify_dataset(out)
    assert [s["name"] for s in m["samples"]] == ["S0", "S1", "S2"] and m["samplesheet"]["failed"] == {}
    assert _rows(_table(out), "S1") == _rows(_table(reference["S1"]), "S1")


KILL_HOOK = '''
import os, shutil, signal


def run(task):
    """Kill the worker on sample SK; for the others, copy the reference part the test left in REF_<sample>."""
    if task["sample"] == "SK":
        os.kill(os.getpid(), signal.SIGKILL)
    tmp = task["part"] + ".copying"  # whole or not at all, as the real builder writes a part
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.environ["REF_" + task["sample"]], tmp)
    os.replace(tmp, task["part"])
    return {"sample": task["sample"], "status": "built", "n_spots": 1, "seconds": 0.0}
'''


@pytest.mark.slow
def test_killed_worker_fails_only_its_sample(bundles, reference, tmp_path, monkeypatch):
    """A worker killed by a signal (as the out-of-memory killer does) fails its sample; the other is kept.

    Slow: every spawned worker imports hescape.data (and so torch), and a broken pool is followed by fresh
    one-worker pools."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "ss_kill_hook.py").write_text(KILL_HOOK)
    monkeypatch.syspath_prepend(str(hook_dir))  # spawned workers get this process's sys.path
    monkeypatch.setenv("REF_S0", str(reference["S0"]))
    import importlib

    hook = importlib.import_module("ss_kill_hook")
    sheet = _sheet(tmp_path / "s.csv", bundles, [("S0", "D0", "train", ""), ("SK", "D1", "val", "")])
    res = build_from_samplesheet(sheet, tmp_path / "ds", jobs=2, qc=False, progress=False, _run=hook.run)
    assert {s.sample: s.status for s in res.samples} == {"S0": "built", "SK": "failed"}
    assert "terminated abruptly" in res.failed[0].error
    m = read_manifest(res.out)
    assert [s["name"] for s in m["samples"]] == ["S0"] and set(m["samplesheet"]["failed"]) == {"SK"}
    assert _shard_hashes(res.out) == _shard_hashes(reference["S0"])


@pytest.mark.slow
def test_jobs_2_gives_the_same_dataset_as_jobs_1(built, tmp_path):
    """Two spawned worker processes build bit-identical shards (slow: each worker imports torch)."""
    sheet, _, hashes_1, samples_1 = built
    res = build_from_samplesheet(sheet, tmp_path / "ds2", jobs=2, qc=False, progress=False)
    assert [s.status for s in res.samples] == ["built"] * 3  # another --out: its own parts, all built
    assert _shard_hashes(res.out) == hashes_1
    assert read_manifest(res.out)["samples"] == samples_1


# ------------------------------------------------------------------------------------------------ bad input


def _bad_cases(bundles, tmp_path) -> dict[str, tuple[str, str]]:
    b0, b1 = bundles[0], bundles[1]
    ok = f"xenium,{b0},S0,D0,breast,human-breast-panel,train,\n"
    return {
        "missing column": ("technology,path,sample,tissue,panel,split\n"
                           f"xenium,{b0},S0,breast,human-breast-panel,train\n", "no 'donor' column"),
        "duplicate sample": (HEADER + ok + f"xenium,{b1},S0,D1,breast,human-breast-panel,val,\n",
                             "expected a unique sample id, found 'S0' again (first on line 2)"),
        "missing path": (HEADER + ok + f"xenium,{tmp_path / 'nope'},S1,D1,breast,human-breast-panel,val,\n",
                         "found no such path"),
        "donor in two splits": (HEADER + ok + f"xenium,{b1},S1,D0,breast,human-breast-panel,test,\n",
                                "donor leakage: expected each donor in exactly one split, found D0"),
        "unknown technology": (HEADER + ok.replace("xenium,", "merfish,"), "technology: expected one of xenium"),
        "bad option": (HEADER + ok.replace(",train,", ",train,min_count=3"), "expected option keys among"),
        "option out of range": (HEADER + ok.replace(",train,", ",train,max_missing=2"),
                                "max_missing: expected a finite number in [0, 1], found 2.0"),
        "bad split": (HEADER + ok.replace(",train,", ",Train,"), "split: expected one of train, val, test"),
        "two panels": (HEADER + ok + f"xenium,{b1},S1,D1,breast,human-5k-panel,val,\n",
                       "expected one panel for all samples"),
        "two geometries": (HEADER + ok + f"xenium,{b1},S1,D1,breast,human-breast-panel,val,geometry=hest\n",
                           "expected one spot geometry for all samples"),
        "visium without image": (HEADER + f"visium,{b0},S0,D0,breast,,train,\n", "he_image: expected the full"),
    }


def test_bad_samplesheets_one_line_exit_2_nothing_written(bundles, tmp_path, capsys):
    for i, (case, (text, needle)) in enumerate(_bad_cases(bundles, tmp_path).items()):
        sheet = tmp_path / f"bad{i}.csv"
        sheet.write_text(text)
        out = tmp_path / f"out{i}"
        rc = main(["build", "--samplesheet", str(sheet), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, case
        assert err.startswith("hescape-data: error: ") and "\n" not in err and "Traceback" not in err, (case, err)
        assert needle in err and "expected" in err and "found" in err, (case, err)
        assert not out.exists() and not parts_dir(out).exists(), case
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("bad")) == []


def test_read_samplesheet_reports_every_faulty_row(bundles, tmp_path):
    sheet = tmp_path / "s.csv"
    sheet.write_text(HEADER + f"xenium,{tmp_path / 'a'},S0,D0,breast,,train,\n"
                     f"xenium,{bundles[0]},S1,D1,breast,,val,min_counts=-1\n"
                     f"xenium,{bundles[1]},S2,D2,breast,,test,outside_spots=drop;min_cells=2\n")
    with pytest.raises(InputFormatError) as e:
        read_samplesheet(sheet)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "line 2" in lines[0] and "line 3" in lines[1] and "min_counts" in lines[1]
    # relative paths are read from the samplesheet's folder; JSON options; key=value options typed
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "s.csv").write_text(HEADER + f"xenium,{os.path.relpath(bundles[0], rel)},S0,D0,,,train,"
                               '"{""min_cells"": 3, ""outside_spots"": ""drop""}"\n'
                               f"xenium,{os.path.relpath(bundles[1], rel)},S1,D1,,,val,min_qv=25;counts_from=cells\n")
    rows = read_samplesheet(rel / "s.csv")
    assert rows[0].path == bundles[0] and rows[0].options["min_cells"] == 3 and rows[0].tissue is None
    assert rows[0].options["outside_spots"] == "drop" and rows[1].options["min_qv"] == 25.0
    with pytest.raises(SplitLeakageError):
        read_samplesheet(_sheet(tmp_path / "leak.csv", bundles, [("S0", "D0", "train", ""),
                                                                  ("S1", "D0", "val", "")]))


# ------------------------------------------------------------------------------------------------ merge


def _tiny(out: Path, genes, samples, geometry="hescape", spot_ids=None) -> Path:
    """A small dataset written directly: one sample per entry of ``samples`` ((name, donor, split, rows))."""
    rng = np.random.default_rng(len(samples))
    png = [bytes([i]) * 16 for i in range(8)]
    extra = {"geometry": get_geometry(geometry).to_dict()} if geometry else {}
    with DatasetWriter(out, genes=list(genes), gene_ids=[""] * len(genes), rows_per_shard=5, extra=extra) as w:
        for name, donor, split, n in samples:
            w.add(SpotRecords(name=name, donor=donor, tissue="t", source="s", images=png[:n] if n <= 8 else png * 2,
                              gexp=rng.poisson(2.0, (n, len(genes))).astype(np.float32),
                              coords_um=rng.uniform(0, 100, (n, 2)), n_cells=np.ones(n),
                              spot_ids=None if spot_ids is None else spot_ids[:n]), split=split)
    return out


def test_merge_reuses_shards_and_keeps_rows(reference, tmp_path, capsys):
    ins = [reference["S0"], reference["S2"]]
    before = {p: [(f.name, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
                  for f in sorted(p.iterdir()) if f.is_file()] for p in ins}
    out = tmp_path / "merged"
    assert main(["merge", *map(str, ins), "--out", str(out)]) == 0
    assert "2 samples" in capsys.readouterr().out
    m = verify_dataset(out)
    assert [s["name"] for s in m["samples"]] == ["S0", "S2"]
    assert _shard_hashes(out) == _shard_hashes(ins[0]) + _shard_hashes(ins[1])  # shard files taken as they are
    t = _table(out)
    for name, p in zip(["S0", "S2"], ins, strict=True):
        assert _rows(t, name) == _rows(_table(p), name)
    assert [r["samples"] for r in m["merged_from"]] == [["S0"], ["S2"]]
    assert all(r["ingest"]["kind"] == "xenium" for r in m["merged_from"])
    assert before == {p: [(f.name, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
                          for f in sorted(p.iterdir()) if f.is_file()] for p in ins}  # inputs untouched
    # the merged dataset splits by donor as any other
    assert main(["split", str(out), "--by", "donor", "--val", "0", "--test", "1"]) == 0
    capsys.readouterr()
    # refused: --out exists; an input given twice
    assert main(["merge", *map(str, ins), "--out", str(out)]) == 2
    assert main(["merge", str(ins[0]), str(ins[0]), "--out", str(tmp_path / "twice")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_merge_refuses_mixed_panels_geometries_and_names(tmp_path, capsys):
    a = _tiny(tmp_path / "a", ["G1", "G2", "G3"], [("A1", "d1", "train", 4)])
    b_genes = _tiny(tmp_path / "b", ["G1", "G3", "G2"], [("B1", "d2", "train", 3)])
    c_geom = _tiny(tmp_path / "c", ["G1", "G2", "G3"], [("C1", "d3", "train", 3)], geometry="hest")
    d_name = _tiny(tmp_path / "d", ["G1", "G2", "G3"], [("A1", "d4", "train", 3)])
    e_leak = _tiny(tmp_path / "e", ["G1", "G2", "G3"], [("E1", "d1", "test", 3)])
    cases = [(b_genes, PanelMismatchError, ["same genes in the same order", str(a), str(b_genes), "'G2' vs 'G3'"]),
             (c_geom, PanelMismatchError, ["one spot geometry", "hexagon 55 µm", "square 100 µm", str(c_geom)]),
             (d_name, DatasetFormatError, ["sample 'A1' in both", str(d_name)]),
             (e_leak, SplitLeakageError, ["donor leakage", "d1"])]
    for other, err, needles in cases:
        with pytest.raises(err) as e:
            merge_datasets([a, other], tmp_path / "m")
        assert all(n in str(e.value) for n in needles), str(e.value)
        assert main(["merge", str(a), str(other), "--out", str(tmp_path / "m")]) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("hescape-data: error: ") and "\n" not in msg
        assert not (tmp_path / "m").exists()


def test_merge_carries_spot_ids_and_fills_them_in_old_shards(tmp_path):
    ids = [f"cell-{k:03d}x" for k in range(7)]
    a = _tiny(tmp_path / "a", ["G1", "G2"], [("A1", "d1", "train", 7)], spot_ids=ids)
    # an older dataset: shards without the spot_id column (indexed from its shards)
    old = tmp_path / "old"
    old.mkdir()
    t = _table(_tiny(tmp_path / "src", ["G1", "G2"], [("O1", "d2", "val", 3), ("O2", "d2", "val", 4)]))
    t = t.drop_columns(["spot_id"]).replace_schema_metadata(None)
    for k, (lo, hi) in enumerate([(0, 2), (2, 7)]):  # O1's rows split across two shards; IPC file, then stream
        new = pa.ipc.new_file if k == 0 else pa.ipc.new_stream
        with pa.OSFile(str(old / f"part{k}.arrow"), "wb") as sink, new(sink, t.schema) as w:
            w.write_table(t.slice(lo, hi - lo))
    index_arrow_shards(old, genes=["G1", "G2"], split="val")
    man = json.loads((old / "manifest.json").read_text())
    man["geometry"] = get_geometry("hescape").to_dict()
    (old / "manifest.json").write_text(json.dumps(man))
    out = merge_datasets([a, old], tmp_path / "m")
    verify_dataset(out)
    t = _table(out)
    got = list(zip(t.column("name").to_pylist(), t.column("spot_id").to_pylist(), strict=True))
    assert got == [("A1", i) for i in ids] + [("O1", "0"), ("O1", "1"), ("O1", "2"), ("O2", "0"), ("O2", "1"),
                                               ("O2", "2"), ("O2", "3")]
    assert _rows(t, "O2")["gexp"] == _rows(_table(tmp_path / "src"), "O2")["gexp"]


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("spawned workers and hard links are tested on POSIX")


def test_one_input_under_two_sample_names_is_refused(tmp_path):
    from hescape.data.errors import HescapeDataError
    from hescape.data.samplesheet import read_samplesheet

    bundle = tmp_path / "b"
    bundle.mkdir()
    sheet = tmp_path / "s.csv"
    sheet.write_text("technology,path,sample,donor,tissue,panel,split\n"
                     f"xenium,{bundle},S1,P1,breast,human-breast-panel,train\n"
                     f"xenium,{bundle}/,S2,P2,breast,human-breast-panel,test\n")
    with pytest.raises(HescapeDataError, match="expected each input once"):
        read_samplesheet(sheet)
