"""``hescape-eval batch-effects``: silhouette-batch of a run's dataset and embeddings beside its Recall@5.

Runs are written here in hescape-train's layout (``config.json``, ``results.json``, ``checkpoints/index.json`` +
``model.safetensors``) over a synthetic dataset built by hescape-data (3 donors: one each in train, val and test).
Truth is computed independently of hescape.eval: scanpy's pipeline called by hand for the Leiden clusters,
scikit-learn's ``silhouette_samples`` for scib's silhouette-batch, the model applied by hand for the embeddings, and
the Recall@5 values written into ``results.json`` by hand.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
models = pytest.importorskip("hescape.models", reason="embeddings need hescape-models")
data = pytest.importorskip("hescape.data", reason="datasets need hescape-data")
if not all(importlib.util.find_spec(m) for m in ("scanpy", "leidenalg", "scib_metrics", "matplotlib")):
    pytest.skip("needs pip install 'hescape-eval[batch]'", allow_module_level=True)

from sklearn.metrics import silhouette_samples  # noqa: E402

RECALL = {0: (0.30, 0.20), 1: (0.40, 0.26)}  # seed: (i2g R@5, g2i R@5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hescape.data.geometry import get_geometry
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("be")
    cfg = data.SyntheticConfig(sample_size_um=300.0, n_donors=3, pixel_size_um=2.0,
                               geometry=get_geometry("hescape").with_(um_per_px=2.0))
    ds = data.build_synthetic_dataset(root / "ds", cfg, progress=False)
    genes = data.read_manifest(ds)["genes"]
    runs, nets = [], []
    for seed, (i2g, g2i) in RECALL.items():
        torch.manual_seed(seed)
        model = models.create_model("vit_mlp_nano", panel=genes).eval()
        run = root / f"run{seed}"
        ck = run / "checkpoints" / "step-00000010"
        ck.mkdir(parents=True)
        meta = {"format": "hescape-train-checkpoint/1", "genes": json.dumps(list(genes)),
                "model_cfg": json.dumps(models.cfg_to_dict(model.recorded_cfg()))}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"),
                  metadata=meta)
        (run / "checkpoints" / "index.json").write_text(json.dumps({"best": ck.name, "last": ck.name}))
        (run / "config.json").write_text(json.dumps({
            "format": "hescape-train-config/1", "seed": seed, "data_resolved": str(ds),
            "model": {"name": "vit_mlp_nano", "image": None, "gene": None},
            "data": {"path": str(ds), "panel": "human-breast-panel"}}))
        res = {f"{d}_{k}": v for d, r in (("i2g", i2g), ("g2i", g2i))
               for k, v in (("R@5", r), ("R@5_chance", 5 / 40), ("protocol", "full"), ("pool", 40))}
        (run / "results.json").write_text(json.dumps(res))
        runs.append(run)
        nets.append(model)
    return ds, runs, nets


def _scib_by_hand(x, labels, batch):
    """scib's silhouette_batch: per label with >1 batch and fewer batches than spots, mean of 1 - |s_batch|."""
    per = []
    for lab in np.unique(labels):
        m = labels == lab
        nb = len(np.unique(batch[m]))
        if 1 < nb < m.sum():
            per.append((1 - np.abs(silhouette_samples(x[m], batch[m]))).mean())
    return float(np.mean(per))


@pytest.mark.slow  # about 40 s of CPU time: jax compiles scib's silhouette for each input shape
@pytest.mark.filterwarnings("ignore:.*default backend for leiden.*:FutureWarning")
def test_scores_and_recall_against_independent_computation(world, tmp_path, cli):
    import anndata
    import scanpy as sc

    ds, runs, nets = world
    out = tmp_path / "fig2"
    code, stdout, err = cli("batch-effects", *map(str, runs), "--out", str(out))
    assert code == 0, err
    with open(out / "batch_effects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["seed"] for r in rows] == ["0", "1"]

    # the dataset, every split, and the split of each spot from the manifest
    pds = data.PairedSpotDataset(ds, None)
    counts = pds.raw_counts()
    split_of = {s["name"]: s["split"] for s in data.read_manifest(ds)["samples"]}
    split = np.array([split_of[s] for s in pds.samples])
    assert set(split) == {"train", "val", "test"} and (counts.sum(1) > 0).all()
    # scanpy by hand: normalise, log1p, PCA, 15 neighbours, Leiden (leidenalg), seed 0
    ad = anndata.AnnData(counts.astype(np.float32))
    sc.pp.normalize_total(ad)
    sc.pp.log1p(ad)
    sc.pp.pca(ad, n_comps=min(50, len(counts) - 1, counts.shape[1] - 1), random_state=0)
    sc.pp.neighbors(ad, n_neighbors=15, use_rep="X_pca", random_state=0)
    sc.tl.leiden(ad, resolution=1.0, random_state=0, flavor="leidenalg")
    labels = ad.obs["leiden"].astype(str).to_numpy()
    want_expr = _scib_by_hand(np.asarray(ad.obsm["X_pca"], np.float64), labels, split)
    scored = np.zeros(len(labels), bool)
    for lab in np.unique(labels):
        m = labels == lab
        scored[m] = 1 < len(np.unique(split[m])) < m.sum()
    print(f"{len(labels)} spots, {len(np.unique(labels))} clusters, coverage {scored.mean():.3f}, "
          f"expression {want_expr:.4f}")
    for r, net, seed in zip(rows, nets, RECALL, strict=True):
        assert int(r["n_spots"]) == len(counts) and r["batch_key"] == "split" and int(r["n_batches"]) == 3
        assert float(r["coverage"]) == pytest.approx(scored.mean())
        assert float(r["silhouette_expression"]) == pytest.approx(want_expr, abs=2e-5)  # scib: float32 (jax)
        with torch.no_grad():
            items = [pds[i] for i in range(len(pds))]
            img = net.encode_image(torch.stack([i["image"] for i in items])).numpy().astype(np.float64)
            gex = net.encode_gene(torch.stack([i["gexp"] for i in items])).numpy().astype(np.float64)
        assert float(r["silhouette_image"]) == pytest.approx(_scib_by_hand(img, labels, split), abs=2e-5)
        assert float(r["silhouette_gene"]) == pytest.approx(_scib_by_hand(gex, labels, split), abs=2e-5)
        i2g, g2i = RECALL[seed]
        assert float(r["i2g_R@5"]) == i2g and float(r["g2i_R@5"]) == g2i
        assert float(r["mean_R@5"]) == pytest.approx((i2g + g2i) / 2)
        assert float(r["chance_R@5"]) == pytest.approx(5 / 40) and r["protocol"] == "full" and r["pool"] == "40"
        assert 0.0 <= float(r["silhouette_chance"]) <= 1.0
    assert (out / "silhouette_vs_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["batch_effects.csv", "batch_effects.md",
                                                     "silhouette_vs_recall.png"]  # no temporary file left
    assert "| run0 |" in stdout and "wrote" in stdout

    # existing outputs are refused (one line, exit 2) before any work; --overwrite with --no-embeddings replaces them
    code, _, err = cli("batch-effects", str(runs[0]), "--out", str(out))
    assert code == 2 and err.startswith("hescape-eval: error: --out") and "--overwrite" in err
    assert err.count("\n") == 1, err
    code, _, err = cli("batch-effects", str(runs[0]), "--out", str(out), "--overwrite", "--no-embeddings",
                       "--batch-key", "sample", "--max-spots", "50", "--no-figure")
    assert code == 0, err
    with open(out / "batch_effects.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["batch_key"] == "sample" and int(row["n_spots"]) == 50
    assert row["silhouette_image"] == "" and row["silhouette_gene"] == "" and math.isfinite(
        float(row["silhouette_expression"]))


def test_refusals(world, tmp_path, cli):
    ds, runs, _ = world
    (tmp_path / "not-a-run").mkdir()
    cases = [
        ([str(tmp_path / "not-a-run")], "config.json"),
        ([str(runs[0]), "--dataset", str(tmp_path / "nowhere")], "manifest.json"),
        ([str(runs[0]), str(runs[0])], "listed twice"),
        ([str(runs[0]), "--max-spots", "2"], "at least 3"),
        ([str(runs[0]), "--batch-key", "donor"], "invalid choice"),
    ]
    for args, words in cases:
        code, out, err = cli("batch-effects", *args, "--out", str(tmp_path / "o"))
        assert code == 2 and err.startswith("hescape-eval: error:") and err.count("\n") == 1, err
        assert words in err, err
    assert not (tmp_path / "o").exists()
