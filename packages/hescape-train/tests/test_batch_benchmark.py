"""``hescape-train batch-benchmark``: a trained image tower exported and loaded as weights, the whole experiment on
a tiny scale (files, resumption, the batch dial seen by silhouette-batch), and its refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from hescape.eval.embed import load_trained_model
from hescape.models import create_image_encoder
from hescape.train import main
from hescape.train.batch_benchmark import export_tower


def test_exported_image_tower_loads_as_weights(tiny_dataset, tmp_path):
    assert main([f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=r", "epochs=1", "batch_size=8",
                 "recall_ks=1,5", "probe=false", "progress=false"]) == 0
    file = export_tower(tmp_path / "r", tmp_path / "trunk.safetensors")
    model, _, _ = load_trained_model(tmp_path / "r", "last")
    torch.manual_seed(123)  # a different random init: only the file can make them agree
    enc = create_image_encoder("vit_nano", weights=file).eval()
    img = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        want = model.image_encoder(img)
        assert torch.allclose(enc(img), want, atol=1e-6)
        assert not torch.allclose(create_image_encoder("vit_nano").eval()(img), want, atol=1e-3)
    assert enc.weights_tag.startswith("trunk.safetensors sha256:")


def test_refusals_are_one_line(tmp_path, capsys):
    assert main(["batch-benchmark", str(tmp_path / "b"), "--methods", "clip,mixup"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) mixup" in err and err.count("\n") == 1
    assert main(["batch-benchmark", str(tmp_path / "b"), "--n-test", "1"]) == 2
    assert "--n-test >= 2" in capsys.readouterr().err
    assert main(["batch-benchmark", str(tmp_path / "b"), "--methods", "within_sample"]) == 2
    assert "post-hoc corrections apply to the plain CLIP runs" in capsys.readouterr().err
    assert main(["batch-benchmark", str(tmp_path / "b"), "--seeds", "0,0"]) == 2
    assert "0 listed twice" in capsys.readouterr().err
    assert main(["batch-benchmark", str(tmp_path / "b"), "--methods", "", "--post-hoc", ""]) == 2
    assert "expected at least one method" in capsys.readouterr().err
    assert main(["batch-benchmark", str(tmp_path / "b"), "--batch-size", "1"]) == 2
    assert "--batch-size: expected an integer >= 2, found 1" in capsys.readouterr().err
    assert main(["batch-benchmark", str(tmp_path / "b"), "--size-um", "0"]) == 2
    assert "at least 300 µm" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything is written
    (tmp_path / "afile").write_text("x")
    assert main(["batch-benchmark", str(tmp_path / "afile")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_other_fixed_options_in_the_same_folder_are_refused(tmp_path, capsys):
    from hescape.train.batch_benchmark import BenchmarkConfig, _claim

    for extra in ("scanpy", "scib_metrics", "leidenalg", "harmonypy", "drvi"):  # checked before the folder
        pytest.importorskip(extra)

    _claim(BenchmarkConfig(out=tmp_path / "b", epochs=1, n_donors=5))
    assert main(["batch-benchmark", str(tmp_path / "b"), "--epochs", "3", "--n-donors", "5"]) == 2
    err = capsys.readouterr().err
    assert "made with other options (epochs 1 -> 3)" in err and err.count("\n") == 1
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    assert main(["batch-benchmark", str(tmp_path / "c")]) == 2
    assert "not empty and holds no benchmark.json" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    for extra in ("scanpy", "scib_metrics", "leidenalg", "harmonypy"):  # hescape-eval[batch]
        pytest.importorskip(extra)
    monkeypatch.setenv("HESCAPE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    args = ["batch-benchmark", str(out), "--strengths", "0,3", "--seeds", "0", "--methods", "clip,within_sample",
            "--post-hoc", "harmony", "--epochs", "1", "--pretrain-epochs", "1", "--n-donors", "5", "--n-test", "2",
            "--size-um", "400", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## R@5 full" in printed and "figure:" in printed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["strength"], r["method"]) for r in rows) == sorted(
        (s, m) for s in ("0.0", "3.0") for m in ("clip", "within_sample", "clip+harmony"))
    for r in rows:
        assert 0 <= float(r["r5_full"]) <= 1 and 0 <= float(r["r5_batch"]) <= 1
        assert float(r["r5_full_chance"]) == pytest.approx(5 / int(r["n_test"]))
    # the dial: the expression's batches mix less at strength 3 than at 0 (sample as batch, true niche as label)
    sil = {r["strength"]: float(r["sil_expression"]) for r in rows}
    assert sil["3.0"] < sil["0.0"] - 0.1
    # the held-out donors really are held out: 2 test donors in every dataset
    for s in ("s0", "s3"):
        manifest = json.loads((out / "data" / s / "manifest.json").read_text())
        assert len({x["donor"] for x in manifest["samples"] if x["split"] == "test"}) == 2
    png = (out / "batch_benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a second call trains and scores nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("results.json")}
    stamps.update({p: p.stat().st_mtime_ns for p in (out / "scores").glob("*.json")})
    assert len(stamps) == 4 + 6
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert np.isfinite([float(r["sil_gene"]) for r in rows]).all()
