"""The frozen-trunk feature cache: cached and uncached training agree, a changed fingerprint rebuilds, writes are
atomic, and a cached run never decodes a patch of a cached tower."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hescape.data import PairedSpotDataset
from hescape.models import create_model
from hescape.train import load_config, main
from hescape.train.checkpoint import read_checkpoint
from hescape.train.errors import HescapeConfigError
from hescape.train.feature_cache import FeatureSource, cached_features, plan_cache


def _args(dataset, out, name, *extra):
    return [f"data.path={dataset}", f"out_dir={out}", f"run_name={name}", "epochs=2", "batch_size=8",
            "model.image_finetune=frozen", "model.gene_finetune=frozen", "data.augment=false", "log_every=1",
            "recall_ks=1,5", "probe=false", "progress=false", *extra]


def test_cached_and_uncached_training_agree(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HESCAPE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(_args(tiny_dataset, tmp_path, "plain", "data.feature_cache=off")) == 0
    assert main(_args(tiny_dataset, tmp_path, "cached", "data.feature_cache=on")) == 0
    caches = sorted((tmp_path / "cache" / "features").iterdir())
    assert len(caches) == 6  # 2 towers × 3 splits
    a, b = read_checkpoint(tmp_path / "plain", "last"), read_checkpoint(tmp_path / "cached", "last")
    assert a["step"] == b["step"] > 0
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-5, rtol=1e-4), k
    sa = [json.loads(x) for x in (tmp_path / "plain" / "steps.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (tmp_path / "cached" / "steps.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in sa] == pytest.approx([r["loss"] for r in sb], abs=1e-5)
    ea, eb = np.load(tmp_path / "plain" / "embeddings" / "test.npz"), np.load(tmp_path / "cached" / "embeddings" /
                                                                              "test.npz")
    assert np.abs(ea["image"] - eb["image"]).max() < 1e-4 and np.abs(ea["gene"] - eb["gene"]).max() < 1e-4
    # a second run finds the caches (nothing recomputed: their files are untouched)
    stamps = {p: (p / "features.npy").stat().st_mtime_ns for p in caches}
    capsys.readouterr()
    assert main(_args(tiny_dataset, tmp_path, "again", "data.feature_cache=on", "progress=true")) == 0
    printed = capsys.readouterr().out
    assert printed.count("rows read from") == 6 and "computed into" not in printed
    assert {p: (p / "features.npy").stat().st_mtime_ns for p in caches} == stamps


def test_plan_refusals_and_choices(tiny_dataset):
    genes = PairedSpotDataset(tiny_dataset, "train").genes

    def plan(*over):
        cfg = load_config(None, list(over))
        m = create_model("vit_mlp_nano", panel=genes, image={"finetune": cfg.model.image_finetune or "full"},
                         gene={"finetune": cfg.model.gene_finetune or "full"},
                         projection=cfg.model.projection)
        return plan_cache(m, cfg)

    assert plan() == []  # the demo trains both trunks
    assert plan("model.gene_finetune=frozen") == ["gene"]
    assert plan("model.gene_finetune=frozen", "model.image_finetune=frozen") == ["gene"]  # augmented images
    assert plan("model.image_finetune=frozen", "data.augment=false") == ["image"]
    assert plan("model.gene_finetune=frozen", "data.feature_cache=off") == []
    with pytest.raises(HescapeConfigError, match="no tower can be cached.*image tower: its trunk trains"):
        plan("data.feature_cache=on")


def test_fingerprint_follows_weights_rows_and_contract(tiny_dataset, tmp_path):
    train = PairedSpotDataset(tiny_dataset, "train")
    test = PairedSpotDataset(tiny_dataset, "test")
    torch.manual_seed(0)
    m = create_model("vit_mlp_nano", panel=train.genes, gene={"finetune": "frozen"})
    cpu = torch.device("cpu")
    feats, folder, made = cached_features(m, "gene", train, cpu, root=tmp_path)
    assert made and feats.shape == (len(train), m.gene_encoder.out_dim)
    # the features are the trunk's output (computed here independently, row by row)
    m.eval()
    with torch.no_grad():
        direct = torch.cat([m.gene_features(train[i]["gexp"][None]) for i in range(len(train))]).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    again, folder2, made2 = cached_features(m, "gene", train, cpu, root=tmp_path)
    assert not made2 and folder2 == folder
    # another split, changed weights, another contract option: each its own cache
    _, f_test, made_test = cached_features(m, "gene", test, cpu, root=tmp_path)
    w0 = next(m.gene_encoder.parameters()).detach().clone()
    with torch.no_grad():
        next(m.gene_encoder.parameters()).add_(1e-3)
    _, f_w, made_w = cached_features(m, "gene", train, cpu, root=tmp_path)
    _, f_amp, made_amp = cached_features(m, "gene", train, cpu, torch.bfloat16, root=tmp_path)
    assert made_test and made_w and made_amp and len({folder, f_test, f_w, f_amp}) == 4
    # a damaged cache is rebuilt, and leftovers of a killed build never count
    expected = np.array(feats)
    del feats, again  # unmap before the file is damaged in place
    (folder / "features.npy").write_bytes(b"garbage")
    (folder / ".features.npy.tmp-123").write_bytes(b"partial")
    with torch.no_grad():
        next(m.gene_encoder.parameters()).copy_(w0)
    with pytest.warns(UserWarning, match="does not match its record"):
        rebuilt, _, made3 = cached_features(m, "gene", train, cpu, root=tmp_path)
    assert made3 and np.array_equal(np.asarray(rebuilt), expected)


def test_feature_source_batches_without_decoding(tiny_dataset, monkeypatch):
    ds = PairedSpotDataset(tiny_dataset, "train")
    feats = np.arange(len(ds) * 3, dtype=np.float32).reshape(len(ds), 3)
    src = FeatureSource(ds, image_feat=feats)
    monkeypatch.setattr(type(ds), "__getitem__", lambda *a: pytest.fail("a cached tower's patch was decoded"))
    b = src.__getitems__([4, 1, 2])
    assert torch.equal(b["image_feat"], torch.from_numpy(feats[[4, 1, 2]]))
    monkeypatch.undo()
    assert torch.equal(b["gexp"], torch.stack([ds[i]["gexp"] for i in (4, 1, 2)]))


def test_changed_cache_file_is_rebuilt_and_unwritable_folder_is_one_line(tiny_dataset, tmp_path):
    train = PairedSpotDataset(tiny_dataset, "train")
    torch.manual_seed(0)
    m = create_model("vit_mlp_nano", panel=train.genes, gene={"finetune": "frozen"})
    cpu = torch.device("cpu")
    feats, folder, _ = cached_features(m, "gene", train, cpu, root=tmp_path)
    expected = np.array(feats)
    del feats
    # same header and shape, other numbers (a changed file): refused by its checksum, rebuilt with a warning
    arr = np.load(folder / "features.npy", mmap_mode="r+")
    arr[:] = 7.0
    arr.flush()
    del arr
    with pytest.warns(UserWarning, match="does not match its record"):
        again, _, made = cached_features(m, "gene", train, cpu, root=tmp_path)
    assert made and np.array_equal(np.asarray(again), expected)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(HescapeConfigError, match="feature cache: cannot write .*writable folder"):
        cached_features(m, "gene", train, cpu, root=blocker)


_WRITER = """
import sys
import torch
from hescape.data import PairedSpotDataset
from hescape.models import create_model
from hescape.train.feature_cache import cached_features

ds = PairedSpotDataset(sys.argv[1], "train")
torch.manual_seed(0)
m = create_model("vit_mlp_nano", panel=ds.genes, gene={"finetune": "frozen"})
cached_features(m, "gene", ds, torch.device("cpu"), root=sys.argv[2])
"""


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tiny_dataset, tmp_path):
    """A writer stopped inside its cache write (hescape.train.faults) is a live process writing the same cache folder
    as this one (two ranks, or two runs of a sweep): its temporary file is left alone while it lives, and removed by
    the next use of the folder once it has been killed with SIGKILL (no clean-up of its own can run)."""
    root, marker = tmp_path / "cache", tmp_path / "marker"
    env = {**os.environ, "HESCAPE_TRAIN_FAULT": "feature_cache_write:1", "HESCAPE_TRAIN_FAULT_MARKER": str(marker),
           "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tiny_dataset), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.is_file():
            assert writer.poll() is None, f"the writer ended before its cache write: {writer.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the writer did not reach its cache write in 120 s"
            time.sleep(0.1)
        (folder,) = root.iterdir()
        (live,) = folder.glob(".features.npy.tmp-*")
        live_inode = live.stat().st_ino

        # this process uses the same cache while the writer lives: it builds the cache, the writer's file stays
        train = PairedSpotDataset(tiny_dataset, "train")
        torch.manual_seed(0)
        m = create_model("vit_mlp_nano", panel=train.genes, gene={"finetune": "frozen"})
        cpu = torch.device("cpu")
        feats, folder2, made = cached_features(m, "gene", train, cpu, root=root)
        assert made and folder2 == folder
        assert writer.poll() is None and live.stat().st_ino == live_inode
        m.eval()
        with torch.no_grad():
            direct = m.gene_features(torch.from_numpy(train.counts(np.arange(len(train))))).numpy()
        np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
        del feats
    finally:
        writer.kill()  # SIGKILL
        writer.communicate()

    # leftovers without a writer: of this host (removed), of another host (kept for a day), of hescape-train 0.1
    # (no lock: removed after a day)
    day = 24 * 3600
    names = {".features.npy.tmp-77-otherhost-0123abcd": 0, ".features.npy.tmp-78-otherhost-4567cdef": day + 60,
             ".features.npy.tmp-4242": day + 60, ".features.npy.tmp-4243": 600, ".meta.json.ab_cd123.tmp": day + 60}
    for name, age in names.items():
        (folder / name).write_bytes(b"partial")
        t = time.time() - age
        os.utime(folder / name, (t, t))
    again, _, made = cached_features(m, "gene", train, cpu, root=root)
    assert not made
    np.testing.assert_allclose(again, direct, rtol=1e-5, atol=1e-6)
    assert not live.exists()
    kept = {".features.npy.tmp-77-otherhost-0123abcd", ".features.npy.tmp-4243"}
    assert {p.name for p in folder.iterdir()} == {"features.npy", "meta.json", ".lock", *kept}
