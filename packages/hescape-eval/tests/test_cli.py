"""Saved embeddings (hescape.eval.io) and the ``hescape-eval retrieval`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import hescape.eval as E
import numpy as np
import pytest
import torch
from hescape.eval import HescapeEvalError
from hescape.eval.io import EMBEDDINGS_FORMAT, embeddings_path, load_embeddings, save_embeddings


def _pair(n: int = 150, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d))
    g = q + 0.8 * rng.standard_normal((n, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    sample = np.array(["S1"] * 70 + ["S2"] * 50 + ["S3"] * max(0, n - 120))[:n]
    donor = np.array(["D1"] * 120 + ["D2"] * max(0, n - 120))[:n]
    return q.astype(np.float32), g.astype(np.float32), np.arange(n), sample, donor


@pytest.fixture
def run_dir(tmp_path):
    q, g, idx, sample, donor = _pair()
    save_embeddings(embeddings_path(tmp_path / "run"), image=q, gene=g, index=idx, sample=sample, donor=donor)
    return tmp_path / "run"


# ----------------------------------------------------------------------------------------------- io
def test_save_load_round_trip(tmp_path):
    q, g, idx, sample, donor = _pair(40)
    path = save_embeddings(tmp_path / "r" / "embeddings" / "test.npz", image=torch.from_numpy(q).double(),
                           gene=g, index=torch.from_numpy(idx), sample=list(sample), donor=donor.astype(object))
    assert path == embeddings_path(tmp_path / "r") and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["test.npz"]  # no temporary file left behind
    emb = load_embeddings(tmp_path / "r")
    assert emb.image.dtype == np.float32 and emb.image.shape == (40, 8)
    np.testing.assert_array_equal(emb.image, q)
    np.testing.assert_array_equal(emb.gene, g)
    np.testing.assert_array_equal(emb.index, idx)
    assert emb.sample.tolist() == sample.tolist() and emb.donor.tolist() == donor.tolist()
    assert load_embeddings(path).path == path  # a file path works too
    with np.load(path, allow_pickle=False) as z:  # plain arrays: readable without pickle
        assert str(z["format"]) == EMBEDDINGS_FORMAT
    save_embeddings(path, image=q, gene=g, index=[f"spot{i}" for i in range(40)], sample=sample, donor=donor)
    assert load_embeddings(path).index[3] == "spot3"


def test_save_is_atomic(tmp_path, monkeypatch):
    q, g, idx, sample, donor = _pair(30)
    path = save_embeddings(tmp_path / "test.npz", image=q, gene=g, index=idx, sample=sample, donor=donor)
    before = path.read_bytes()

    def broken(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        save_embeddings(path, image=g, gene=q, index=idx, sample=sample, donor=donor)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz"]  # and the temporary file is gone


def test_save_rejects_bad_input(tmp_path):
    q, g, idx, sample, donor = _pair(30)
    target = tmp_path / "x.npz"
    cases = [
        (dict(image=q * 2), "L2-normalised"),
        (dict(gene=np.where(np.arange(8) == 2, np.nan, g)), "NaN or inf"),
        (dict(gene=g[:29]), "the same shape"),
        (dict(sample=sample[:29]), "one entry per row"),
        (dict(donor=np.zeros(30)), "strings"),
        (dict(image=q[:, 0]), "(N, d)"),
    ]
    for change, words in cases:
        kw = dict(image=q, gene=g, index=idx, sample=sample, donor=donor) | change
        with pytest.raises(HescapeEvalError, match="expected") as info:
            save_embeddings(target, **kw)
        assert words in str(info.value) and "fix" in str(info.value)
    assert not target.exists()


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(HescapeEvalError) as info:
        load_embeddings(tmp_path / "run")
    msg = str(info.value)
    assert str(tmp_path / "run" / "embeddings" / "test.npz") in msg and "save_embeddings" in msg
    np.savez(tmp_path / "foreign.npz", image=np.ones((3, 2)))
    with pytest.raises(HescapeEvalError, match="missing"):
        load_embeddings(tmp_path / "foreign.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(HescapeEvalError, match="unreadable"):
        load_embeddings(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------------------------- CLI
def test_console_script_is_registered():
    eps = entry_points(group="console_scripts")
    assert any(ep.name == "hescape-eval" and ep.value == "hescape.eval.cli:main" for ep in eps)


def test_retrieval_prints_both_protocols_and_writes_json(run_dir, cli, tmp_path):
    out_json = tmp_path / "res" / "retrieval.json"
    code, out, err = cli("retrieval", str(run_dir), "--out", str(out_json))
    assert code == 0, err
    q, g, *_ = _pair()
    want_full = E.retrieval_metrics(q, g, ks=(1, 5, 10))
    want_batch = E.retrieval_metrics(q, g, ks=(1, 5, 10), protocol="batch:64")
    # header lines state protocol, pool and chance
    assert "Protocol `full`" in out and "pool 150;" in out and "R@5 0.033" in out
    assert "Protocol `batch:64`" in out and "pool 64 (3 galleries, smallest 22)" in out and "R@5 0.100" in out
    r = want_batch["i2g"]
    assert (f"| image → gene | 64 | {r.recall[1]:.3f} ({r.chance[1]:.3f}) | {r.recall[5]:.3f} ({r.chance[5]:.3f})"
            in out)
    data = json.loads(out_json.read_text())
    assert [rep["protocol"] for rep in data["reports"]] == ["full", "batch:64"] and data["n"] == 150
    assert data["reports"][0]["g2i"]["recall"]["5"] == want_full["g2i"].recall[5]
    assert data["reports"][1]["i2g"]["chance"]["5"] == pytest.approx(0.1)
    assert data["reports"][1]["i2g"]["pool"] == 64


def test_retrieval_by_sample_and_chosen_protocol(run_dir, cli):
    code, out, err = cli("retrieval", str(run_dir), "--protocol", "batch:32x2", "--by", "sample",
                         "--ks", "1,5")
    assert code == 0, err
    assert "Protocol `batch:32x2`" in out and "Protocol `full`" not in out and "Per sample" in out
    q, g, _, sample, _ = _pair()
    want = E.retrieval_metrics(q, g, ks=(1, 5), protocol="batch:32x2", groups=sample)
    r = want.groups["S3"]["g2i"]
    assert f"| S3 | gene → image | {r.pool} | {r.recall[1]:.3f} ({r.chance[1]:.3f})" in out


@pytest.mark.parametrize(("argv", "words"), [
    (("--protocol", "batch:0"), ("protocol", "batch:0")),
    (("--protocol", "topk"), ("protocol",)),
    (("--ks", "1,151"), ("Recall@151", "150")),
    (("--protocol", "batch:64", "--ks", "65"), ("Recall@65", "64")),
    (("--ks", "a,b"), ("--ks",)),
    (("--by", "organ"), ("--by",)),
    (("--backend", "gpu"), ("backend",)),
    (("--bogus",), ("unrecognized",)),
])
def test_bad_options_are_one_line_exit_2(run_dir, cli, argv, words, one_line_error):
    code, out, err = cli("retrieval", str(run_dir), *argv)
    one_line_error(code, err, *words)
    assert out == ""


def test_run_dir_without_embeddings(tmp_path, cli, one_line_error):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    code, _, err = cli("retrieval", str(run))
    one_line_error(code, err, str(run / "embeddings" / "test.npz"), "save_embeddings")


def _write_raw(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, format=np.array(EMBEDDINGS_FORMAT), **arrays)


def test_damaged_files_are_one_line_exit_2(tmp_path, cli, one_line_error):
    q, g, idx, sample, donor = _pair(20)
    nan = q.copy()
    nan[2, 2] = np.nan
    _write_raw(tmp_path / "nan" / "embeddings" / "test.npz", image=nan, gene=g, index=idx, sample=sample, donor=donor)
    one_line_error(*cli("retrieval", str(tmp_path / "nan"))[::2], "NaN")
    _write_raw(tmp_path / "len" / "embeddings" / "test.npz", image=q, gene=g[:19], index=idx, sample=sample,
               donor=donor)
    one_line_error(*cli("retrieval", str(tmp_path / "len"))[::2], "same shape")


def test_module_runs_as_a_command(run_dir, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run([sys.executable, "-m", "hescape.eval.cli", "retrieval", str(run_dir), "--protocol", "full"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "Protocol `full`" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "hescape.eval.cli", "retrieval", str(tmp_path / "none")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("hescape-eval: error: ")
