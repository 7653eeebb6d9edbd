"""``hescape-eval expression`` and ``hescape-eval export`` on a run directory over a dataset built by hescape-data.

The dataset is written here with hescape-data's ``DatasetWriter`` (6 donors: 2 train, 1 val, 3 test; counts, patch
colours and coordinates chosen by this file), and the run directory in hescape-train's layout (``config.json``,
``results.json``, ``embeddings/test.npz``). Truth comes from outside the code under test: the arrays this file wrote,
a closed-form NumPy ridge on an SVD PCA with ``scipy.stats.pearsonr``, a scikit-learn pipeline assembled here, and
anndata reading the exported file.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import scipy.stats

data = pytest.importorskip("hescape.data", reason="the dataset join needs hescape-data")
pytest.importorskip("sklearn")

from hescape.data.arrow import DatasetWriter, SpotRecords, encode_png  # noqa: E402
from hescape.eval.expression import expression_probe, hest_alpha, select_variable_genes  # noqa: E402
from hescape.eval.io import embeddings_path, save_embeddings  # noqa: E402

HAS_SCANPY = importlib.util.find_spec("scanpy") is not None
HAS_ANNDATA = importlib.util.find_spec("anndata") is not None
SPLITS = {"donor_0": "train", "donor_1": "train", "donor_2": "val", "donor_3": "test", "donor_4": "test",
          "donor_5": "test"}
N_PER, G, D = 40, 12, 16
GENES = [f"GENE{j}" for j in range(G)]


def _world(seed=0):
    """Per donor: latent z, log1p expression linear in z, embeddings linear in z (+ noise), coords, patch colour."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(4, G)), rng.normal(size=(4, D))
    out = {}
    for k, donor in enumerate(SPLITS):
        z = rng.normal(size=(N_PER, 4))
        logy = 1.5 + 0.5 * z @ a + 0.2 * rng.normal(size=(N_PER, G))
        counts = np.round(np.expm1(np.clip(logy, 0, None))).astype(np.float32)
        img = z @ b + 0.5 * rng.normal(size=(N_PER, D))
        gex = np.log1p(counts) @ rng.normal(size=(G, D))
        out[donor] = {"counts": counts, "image": img / np.linalg.norm(img, axis=1, keepdims=True),
                      "gene": gex / np.linalg.norm(gex, axis=1, keepdims=True),
                      "coords": rng.uniform(0, 3000, size=(N_PER, 2)) + 10_000 * k,
                      "colour": rng.integers(0, 256, size=(N_PER, 3)),
                      "spot_ids": [f"s{k}-{i}" for i in range(N_PER)]}
    return out


def _write_dataset(path, world, samples=None):
    with DatasetWriter(path, genes=GENES, gene_ids=[f"ENSG{j:05d}" for j in range(G)], rows_per_shard=50) as w:
        for donor in samples or SPLITS:
            d = world[donor]
            images = [encode_png(np.broadcast_to(c.astype(np.uint8), (8, 8, 3)).copy()) for c in d["colour"]]
            w.add(SpotRecords(name=f"S_{donor}", donor=donor, tissue="t", source="test", images=images,
                              gexp=d["counts"], coords_um=d["coords"], n_cells=np.ones(N_PER, np.int32),
                              spot_ids=d["spot_ids"]), split=SPLITS[donor])
    return path


def _save(path, world, donors):
    cat = {k: np.concatenate([world[d][k] for d in donors]) for k in ("image", "gene")}
    return save_embeddings(path, image=cat["image"], gene=cat["gene"], index=np.arange(len(donors) * N_PER),
                           sample=np.repeat([f"S_{d}" for d in donors], N_PER), donor=np.repeat(donors, N_PER),
                           spot_id=np.concatenate([world[d]["spot_ids"] for d in donors]))


TEST, TRAIN = ["donor_3", "donor_4", "donor_5"], ["donor_0", "donor_1"]


def _patches(world, donors):
    """The flat 8 × 8 patches this file wrote, (N, 8, 8, 3) uint8."""
    colours = np.concatenate([world[d]["colour"] for d in donors]).astype(np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (len(colours), 8, 8, 3)).copy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("expr")
    w = _world()
    ds = _write_dataset(root / "ds", w)
    run = root / "run"
    _save(embeddings_path(run), w, TEST)
    _save(root / "train.npz", w, TRAIN)
    cfg = {"format": "hescape-train-config/1", "seed": 3, "data_resolved": str(ds), "data": {"path": str(ds)},
           "model": {"name": "vit_mlp_nano"}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "results.json").write_text(json.dumps({"i2g_R@5": 0.25, "g2i_R@5": 0.2}))
    return {"root": root, "w": w, "ds": ds, "run": run, "cfg": cfg, "train": root / "train.npz"}


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _numpy_probe(x_tr, y_tr, x_te, y_te, k, alpha):
    """StandardScaler (population std) → PCA by SVD → closed-form ridge without intercept; r by scipy.stats."""
    mu, sd = x_tr.mean(0), x_tr.std(0)
    s_tr, s_te = (x_tr - mu) / sd, (x_te - mu) / sd
    centre = s_tr.mean(0)
    _, _, vt = np.linalg.svd(s_tr - centre, full_matrices=False)
    p_tr, p_te = (s_tr - centre) @ vt[:k].T, (s_te - centre) @ vt[:k].T
    w = np.linalg.solve(p_tr.T @ p_tr + alpha * np.eye(k), p_tr.T @ y_tr)
    pred = p_te @ w
    r = np.array([scipy.stats.pearsonr(y_te[:, j], pred[:, j])[0] for j in range(y_te.shape[1])])
    return r, ((pred - y_te) ** 2).mean(0)


def test_paper_protocol_equals_api_and_numpy(world, tmp_path, cli):
    w, use = world["w"], GENES[2:10]
    out = tmp_path / "expr"
    code, stdout, err = cli("expression", world["run"], "--out", out, "--genes", ",".join(use),
                            "--n-components", 6, "--colour-baseline")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["expression.csv", "expression.json", "expression.md",
                                                     "expression_genes.csv"]  # no temporary file left
    # independent: leave one test donor out, on the arrays this file wrote (the image embedding by default)
    gi, alpha = [GENES.index(g) for g in use], hest_alpha(6, len(use))
    ref_r, ref_mse = [], []
    for held in TEST:
        tr = [d for d in TEST if d != held]
        r, mse = _numpy_probe(np.concatenate([w[d]["image"] for d in tr]).astype(np.float64),
                              np.log1p(np.concatenate([w[d]["counts"][:, gi] for d in tr])),
                              w[held]["image"].astype(np.float64), np.log1p(w[held]["counts"][:, gi]), 6, alpha)
        ref_r.append(r)
        ref_mse.append(mse)
    ref_r, ref_mse = np.array(ref_r), np.array(ref_mse)
    per_gene = _rows(out / "expression_genes.csv")
    assert [r["gene"] for r in per_gene] == use
    # HEST's lsqr stops at tol 1e-4: agreement with the exact solve to about 1e-3 (test_expression.py measures it)
    np.testing.assert_allclose([float(r["pearson_mean"]) for r in per_gene], ref_r.mean(0), atol=1e-3)
    np.testing.assert_allclose([float(r["mse_mean"]) for r in per_gene], ref_mse.mean(0), rtol=2e-3)
    summary = {r["predictor"]: r for r in _rows(out / "expression.csv")}
    probe = summary["probe on image embeddings"]
    assert float(probe["pearson_mean"]) == pytest.approx(ref_r.mean(1).mean(), abs=1e-3)
    assert float(probe["pearson_std"]) == pytest.approx(ref_r.mean(1).std(ddof=0), abs=1e-3)
    assert float(probe["mse_mean"]) == pytest.approx(ref_mse.mean(1).mean(), rel=2e-3)
    assert (probe["protocol"], probe["n_folds"], probe["n_spots"], probe["n_genes"]) == ("paper", "3", "120", "8")
    assert float(probe["pearson_mean"]) > 0.3  # the planted signal is found
    # the mean predictor: each gene's training-fold mean of log1p counts
    y = {d: np.log1p(w[d]["counts"][:, gi]) for d in TEST}
    want = np.mean([((y[h] - np.concatenate([y[d] for d in TEST if d != h]).mean(0)) ** 2).mean() for h in TEST])
    assert float(summary["mean predictor (chance)"]["mse_mean"]) == pytest.approx(want, rel=1e-6)
    # the API on the same inputs (the embeddings as stored: float32) gives the same numbers
    counts = np.concatenate([w[d]["counts"] for d in TEST])
    api = expression_probe(np.concatenate([w[d]["image"] for d in TEST]).astype(np.float32), counts, GENES,
                           np.repeat(TEST, N_PER),
                           samples=np.repeat([f"S_{d}" for d in TEST], N_PER), splits=["test"] * len(counts),
                           genes=use, n_components=6, images=_patches(w, TEST))
    meta = json.loads((out / "expression.json").read_text())
    assert meta["metrics"] == pytest.approx(api.as_dict(), rel=1e-12)
    assert "colour_baseline_pearson_mean" in meta["metrics"]
    assert meta["genes"] == use and meta["protocol"] == "paper" and meta["modality"] == "image"
    assert [f["test_patients"] for f in meta["folds"]] == [[d] for d in TEST]
    md = (out / "expression.md").read_text()
    assert "Protocol **paper**" in md and "3 fold(s)" in md and "120 spots" in md and "8 genes" in md
    assert md in stdout + "\n" and "mean predictor (chance)" in stdout and "wrote" in stdout

    # protocol cv: every row of an `embed`-style file (the train split here), 2 donors → 2 folds; same as the API
    code, _, err = cli("expression", world["train"], "--dataset", world["ds"], "--protocol", "cv",
                       "--genes", ",".join(use), "--n-components", 4, "--out", tmp_path / "cv")
    assert code == 0, err
    api = expression_probe(np.concatenate([w[d]["image"] for d in TRAIN]).astype(np.float32),
                           np.concatenate([w[d]["counts"] for d in TRAIN]), GENES, np.repeat(TRAIN, N_PER),
                           genes=use, n_components=4)
    meta = json.loads((tmp_path / "cv" / "expression.json").read_text())
    assert meta["metrics"] == pytest.approx(api.as_dict(), rel=1e-12) and meta["n_folds"] == 2
    assert meta["embedded_split"] == "train" and meta["n_spots"] == 2 * N_PER


@pytest.mark.skipif(not HAS_SCANPY, reason="gene selection ranks genes with scanpy")
def test_gene_modality_and_selected_genes_equal_api(world, tmp_path, cli):
    w = world["w"]
    out = tmp_path / "g"
    code, _, err = cli("expression", world["run"] / "embeddings" / "test.npz", "--modality", "gene",
                       "--n-genes", 6, "--n-components", 5, "--folds", 3, "--alpha", 2.5, "--out", out)
    assert code == 0, err  # the run is found around its embeddings file: no --dataset needed
    counts = np.concatenate([w[d]["counts"] for d in TEST])
    samples = np.repeat([f"S_{d}" for d in TEST], N_PER)
    genes = select_variable_genes(counts, GENES, samples, n_genes=6)
    api = expression_probe(np.concatenate([w[d]["gene"] for d in TEST]).astype(np.float32), counts, GENES,
                           np.repeat(TEST, N_PER),
                           samples=samples, n_genes=6, n_components=5, n_splits=3, alpha=2.5)
    meta = json.loads((out / "expression.json").read_text())
    assert meta["genes"] == genes == list(api.genes) and meta["modality"] == "gene"
    assert meta["metrics"] == pytest.approx(api.as_dict(), rel=1e-12)
    assert meta["model"]["alphas"] == [2.5] * 3


def test_train_test_equals_sklearn_pipeline(world, tmp_path, cli):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    w, use = world["w"], GENES[:8]
    out = tmp_path / "tt"
    code, stdout, err = cli("expression", world["run"], "--protocol", "train-test", "--train-embeddings",
                            world["train"], "--genes", ",".join(use), "--n-components", 8, "--colour-baseline",
                            "--out", out)
    assert code == 0, err
    x_tr = np.concatenate([w[d]["image"] for d in TRAIN]).astype(np.float64)
    x_te = np.concatenate([w[d]["image"] for d in TEST]).astype(np.float64)
    y_tr = np.log1p(np.concatenate([w[d]["counts"][:, :8] for d in TRAIN]))
    y_te = np.log1p(np.concatenate([w[d]["counts"][:, :8] for d in TEST]))
    pipe = make_pipeline(StandardScaler(), PCA(8, random_state=1),
                         Ridge(alpha=100 / (8 * 8), solver="lsqr", fit_intercept=False, random_state=1))
    pred = pipe.fit(x_tr, y_tr).predict(x_te)
    r = np.array([np.corrcoef(y_te[:, j], pred[:, j])[0, 1] for j in range(8)])
    per_gene = _rows(out / "expression_genes.csv")
    np.testing.assert_allclose([float(g["pearson_mean"]) for g in per_gene], r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(g["mse_mean"]) for g in per_gene], ((pred - y_te) ** 2).mean(0), rtol=1e-5)
    summary = {s["predictor"]: s for s in _rows(out / "expression.csv")}
    probe = summary["probe on image embeddings"]
    assert probe["n_folds"] == "1" and float(probe["pearson_std"]) == 0 and probe["n_spots"] == str(5 * N_PER)
    # the colour baseline: the same pipeline on colour statistics of the patches this file wrote
    from hescape.eval.baselines import colour_statistics

    f_tr, f_te = colour_statistics(_patches(w, TRAIN)), colour_statistics(_patches(w, TEST))
    pred_c = make_pipeline(StandardScaler(), PCA(8, random_state=1),
                           Ridge(alpha=100 / (8 * 8), solver="lsqr", fit_intercept=False, random_state=1)
                           ).fit(f_tr, y_tr).predict(f_te)
    colour = summary["probe on colour statistics (baseline)"]
    assert float(colour["mse_mean"]) == pytest.approx(((pred_c - y_te) ** 2).mean(), rel=1e-5)
    assert "1 split (train → test" in stdout and "colour-statistics probe" in stdout


@pytest.mark.skipif(not HAS_ANNDATA, reason="needs anndata (pip install 'hescape-eval[export]')")
def test_export_h5ad(world, tmp_path, cli, one_line_error):
    import anndata
    from hescape.eval.export import read_params

    w = world["w"]
    out = tmp_path / "sub" / "run.h5ad"
    code, stdout, err = cli("export", world["run"], out, "--counts")
    assert code == 0, err
    ad = anndata.read_h5ad(out)
    n = len(TEST) * N_PER
    assert ad.obsm["X_hescape_img"].shape == (n, D) and ad.obsm["X_hescape_gex"].shape == (n, D)
    np.testing.assert_array_equal(ad.obsm["X_hescape_img"], np.concatenate([w[d]["image"] for d in TEST])
                                  .astype(np.float32))
    np.testing.assert_array_equal(ad.obsm["spatial"], np.concatenate([w[d]["coords"] for d in TEST]))  # µm, as written
    assert list(ad.obs["sample"].astype(str)) == list(np.repeat([f"S_{d}" for d in TEST], N_PER))
    assert list(ad.obs["donor"].astype(str)) == list(np.repeat(TEST, N_PER))
    assert set(ad.obs["split"].astype(str)) == {"test"}
    assert list(ad.obs["spot_id"]) == [s for d in TEST for s in w[d]["spot_ids"]]
    np.testing.assert_array_equal(np.asarray(ad.X), np.concatenate([w[d]["counts"] for d in TEST]))
    assert list(ad.var_names) == GENES
    params = read_params(ad)
    assert params["config"] == world["cfg"] and params["results"]["i2g_R@5"] == 0.25
    assert params["spatial_unit"] == "um" and params["embedded_split"] == "test"
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.h5ad"] and "wrote" in stdout
    # an existing OUT is refused and left untouched; --overwrite replaces it
    before = out.read_bytes()
    code, _, err = cli("export", world["run"], out)
    one_line_error(code, err, "exists", "--overwrite")
    assert out.read_bytes() == before
    code, _, err = cli("export", world["run"], out, "--overwrite")
    assert code == 0, err and "X" not in anndata.read_h5ad(out).obsm


def test_refusals_leave_nothing(world, tmp_path, cli, one_line_error):
    w, run = world["w"], world["run"]
    no_emb = tmp_path / "bare"
    no_emb.mkdir()
    (no_emb / "config.json").write_text(json.dumps(world["cfg"]))
    other = _write_dataset(tmp_path / "other", w, samples=["donor_0", "donor_3"])  # test split: 1 donor, other rows
    one_donor = tmp_path / "one.npz"
    _save(one_donor, w, ["donor_3"])
    out = tmp_path / "o"
    cases = [
        (["expression", no_emb, "--out", out], ["embeddings", "no such file"]),
        (["export", no_emb, tmp_path / "x.h5ad"], ["embeddings", "no such file"]),
        (["expression", run, "--dataset", other, "--out", out], ["not in the dataset"]),
        (["export", one_donor, tmp_path / "x.h5ad", "--dataset", other, "--split", "train"], ["sample"]),
        (["expression", one_donor, "--out", out], ["--dataset"]),
        (["expression", run, "--genes", "GENE1,NOPE", "--out", out], ["NOPE", "missing"]),
        (["expression", one_donor, "--dataset", world["ds"], "--genes", "GENE1", "--out", out],
         ["at least 2", "donor_3"]),
        (["expression", run, "--genes", "GENE1", "--folds", 5, "--out", out], ["--folds 5", "(3)"]),
        (["expression", world["train"], "--dataset", world["ds"], "--out", out], ["--protocol cv", "['train']"]),
        (["expression", run, "--protocol", "train-test", "--genes", "GENE1", "--out", out], ["train.npz"]),
        (["expression", run, "--train-embeddings", world["train"], "--out", out], ["train-test"]),
        (["export", run, tmp_path / "x.csv"], [".h5ad"]),
    ]
    for argv, words in cases:
        code, _, err = cli(*argv)
        one_line_error(code, err, *words)
    assert not out.exists() and not (tmp_path / "x.h5ad").exists()
    # an unwritable --out (a path under a file): one line, exit 2, before any work
    (tmp_path / "file").write_text("x")
    code, _, err = cli("expression", run, "--out", tmp_path / "file" / "sub")
    one_line_error(code, err)
    code, _, err = cli("export", run, tmp_path / "file" / "x.h5ad")
    one_line_error(code, err)
    # existing outputs are refused and untouched
    out.mkdir()
    (out / "expression.md").write_text("mine")
    stamp = os.stat(out / "expression.md").st_mtime_ns
    code, _, err = cli("expression", run, "--genes", "GENE1", "--out", out)
    one_line_error(code, err, "expression.md", "--overwrite")
    assert (out / "expression.md").read_text() == "mine" and os.stat(out / "expression.md").st_mtime_ns == stamp
    assert sorted(p.name for p in out.iterdir()) == ["expression.md"]
