"""The batch-robust options in real training runs (small synthetic dataset with three training samples)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hescape.data import SyntheticConfig, build_synthetic_dataset, read_manifest
from hescape.data.geometry import get_geometry
from hescape.eval.correction import centre_by_sample
from hescape.eval.embed import embed_split, load_trained_model
from hescape.train import main

SMALL = SyntheticConfig(sample_size_um=400.0, n_donors=5, pixel_size_um=2.0,
                        geometry=get_geometry("hescape").with_(um_per_px=2.0))


@pytest.fixture(scope="module")
def five_donors(tmp_path_factory):
    return build_synthetic_dataset(tmp_path_factory.mktemp("robust-ds") / "five", SMALL, progress=False)


def _args(dataset, out, name, *extra):
    return [f"data.path={dataset}", f"out_dir={out}", f"run_name={name}", "epochs=2", "batch_size=8",
            "model.image_finetune=frozen", "data.augment=false", "log_every=1", "recall_ks=1,5", "probe=false",
            "progress=false", *extra]


def test_within_sample_steps_and_gene_normalisation(five_donors, tmp_path, monkeypatch):
    monkeypatch.setenv("HESCAPE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(_args(five_donors, tmp_path, "ws", "data.batch_sampling=within_sample",
                      "data.gene_normalisation=sample_mean")) == 0
    train = [s["n_spots"] for s in read_manifest(five_donors)["samples"] if s["split"] == "train"]
    assert len(train) == 3
    per_epoch = sum(n // 8 for n in train)  # whole batches of 8 inside each sample
    steps = [json.loads(x) for x in (tmp_path / "ws" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 2 * per_epoch + 1))
    cfg = json.loads((tmp_path / "ws" / "config.json").read_text())
    assert cfg["data"]["batch_sampling"] == "within_sample" and cfg["data"]["gene_normalisation"] == "sample_mean"


def test_gene_normalisation_gets_its_own_feature_cache(five_donors, tmp_path, monkeypatch):
    """A frozen gene trunk's cached features of scaled counts are never reused for raw counts (nor the reverse)."""
    monkeypatch.setenv("HESCAPE_CACHE_DIR", str(tmp_path / "cache"))
    frozen = ("model.gene_finetune=frozen", "data.feature_cache=on", "epochs=1")
    assert main(_args(five_donors, tmp_path, "raw", *frozen)) == 0
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 6  # 2 towers × 3 splits
    assert main(_args(five_donors, tmp_path, "scaled", *frozen, "data.gene_normalisation=sample_mean")) == 0
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 9  # 3 new gene caches, image caches reused


def test_corrections_apply_at_evaluation_and_in_hescape_eval(five_donors, tmp_path, monkeypatch):
    """The saved test embeddings of a run with sample_centring and gene_normalisation are the model's embeddings with
    each sample's mean removed; hescape-eval's embed reproduces them from the checkpoint alone (it applies the
    recorded corrections), and without them it gives other embeddings."""
    monkeypatch.setenv("HESCAPE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(_args(five_donors, tmp_path, "centred", "sample_centring=true", "data.batch_sampling=balanced",
                      "data.gene_normalisation=sample_mean")) == 0
    saved = np.load(tmp_path / "centred" / "embeddings" / "test.npz")
    model, _, _ = load_trained_model(tmp_path / "centred")
    assert model.hescape_inference["sample_centring"] is True
    assert len(model.hescape_inference["gene_normalisation"]["reference"]) == len(model.panel)
    again = embed_split(model, five_donors, "test")
    assert list(again["spot_id"]) == list(saved["spot_id"])
    for key in ("image", "gene"):
        assert np.abs(saved[key] - again[key]).max() < 1e-4
    inference = model.hescape_inference
    model.hescape_inference = {"sample_centring": False, "gene_normalisation": inference["gene_normalisation"]}
    plain = embed_split(model, five_donors, "test")
    for key in ("image", "gene"):
        assert np.abs(saved[key] - centre_by_sample(plain[key], plain["sample"])).max() < 1e-4
        assert np.abs(saved[key] - plain[key]).max() > 1e-2  # the centring changed them
    model.hescape_inference = {"sample_centring": True}  # raw counts: another gene embedding
    raw = embed_split(model, five_donors, "test")
    assert np.abs(saved["gene"] - raw["gene"]).max() > 1e-3
    assert np.abs(saved["image"] - raw["image"]).max() < 1e-4


def test_a_batch_of_one_is_refused(five_donors, tmp_path, capsys):
    assert main(_args(five_donors, tmp_path, "one", "batch_size=1")) == 2
    assert "a contrastive step needs at least 2 pairs" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()
