"""Silhouette-batch (hescape.eval.batch_effects) against a brute-force silhouette and planted batch effects."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hescape.eval.batch_effects import (
    batch_silhouette,
    expression_clusters,
    plot_silhouette_vs_recall,
    scored_spots,
    silhouette_batch,
)
from hescape.eval.errors import HescapeEvalError
from sklearn.metrics import adjusted_rand_score, silhouette_samples


def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


needs_scib = pytest.mark.skipif(not _have("scib_metrics"),
                                reason="scib-metrics not installed (pip install 'hescape-eval[batch]')")
needs_scanpy = pytest.mark.skipif(
    not _have("scanpy", "anndata", "leidenalg", "scib_metrics"),
    reason="scanpy/leidenalg/scib-metrics not installed (pip install 'hescape-eval[batch]')")
needs_mpl = pytest.mark.skipif(not _have("matplotlib"), reason="matplotlib not installed")


def _brute_force(x, labels, batch):
    """scib's definition, with scikit-learn's silhouette: per label with >1 batch and fewer batches than spots,
    1 - |silhouette w.r.t. batch|, averaged within the label, then over labels."""
    per_label = []
    for lab in np.unique(labels):
        m = labels == lab
        nb = len(np.unique(batch[m]))
        if nb == 1 or nb == m.sum():
            continue
        per_label.append((1 - np.abs(silhouette_samples(x[m], batch[m]))).mean())
    return float(np.mean(per_label))


@needs_scib
def test_matches_brute_force_silhouette():
    rng = np.random.default_rng(0)
    n = 150
    x = rng.normal(size=(n, 5))
    labels = rng.choice(["a", "b", "c"], size=n).astype(object)
    batch = rng.choice(["train", "val", "test"], size=n).astype(object)
    batch[labels == "c"] = "train"  # one batch only in label c: skipped
    labels[:2], batch[:2] = "e", ["train", "val"]  # label e: as many batches as spots: skipped
    x[batch == "test"] += 0.7  # some batch structure, so the score is not trivially ~1
    want = _brute_force(x, labels.astype(str), batch.astype(str))
    assert silhouette_batch(x, labels, batch) == pytest.approx(want, abs=1e-5)  # scib-metrics: float32 (jax)
    assert silhouette_batch(x, labels, batch, rescale=False) == pytest.approx(1 - want, abs=1e-5)
    assert scored_spots(labels, batch).sum() == ((labels == "a") | (labels == "b")).sum()


@needs_scib
def test_planted_batch_shift_lowers_the_score():
    rng = np.random.default_rng(1)
    n = 300
    labels = rng.integers(0, 3, size=n)
    centres = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], float)
    batch = rng.choice(["s1", "s2"], size=n)
    x = centres[labels] + rng.normal(size=(n, 4))
    mixed = silhouette_batch(x, labels, batch)
    shifted = x + (batch == "s2")[:, None] * np.array([0, 0, 3.0, 0])
    separated = silhouette_batch(shifted, labels, batch)
    assert mixed > 0.9 and separated < mixed - 0.2, (mixed, separated)  # measured 0.957 → 0.696


def _expression_world(n=400, g=40, *, shift=0.0, seed=2):
    """Counts of three spot types (each with its own gene programme) in two samples; ``shift`` multiplies the
    first half of the genes by ``exp(shift)`` in sample s2 (a technical batch effect)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, size=n)
    sample = rng.choice(["s1", "s2"], size=n)
    prog = rng.lognormal(0.0, 1.2, size=(3, g)) * 6
    rate = prog[kind] * np.exp(shift * (sample == "s2")[:, None] * (np.arange(g) < g // 2))
    return rng.poisson(rate).astype(np.float32), kind, sample


@needs_scanpy
def test_leiden_recovers_planted_spot_types_and_a_batch_shift_lowers_silhouette():
    counts, kind, sample = _expression_world()
    labels, x_pca = expression_clusters(counts, n_pcs=10, seed=0)
    assert x_pca.shape == (len(counts), 10)
    assert adjusted_rand_score(kind, labels) > 0.9
    noise = 0.1 * np.random.default_rng(0).normal(size=(len(kind), 3))
    clean = batch_silhouette(counts, sample, batch_key="sample", n_pcs=10,
                             embeddings={"batch-blind": np.eye(3)[kind] + noise,
                                         "batch-aware": np.c_[np.eye(3)[kind] + noise, 3.0 * (sample == "s2")]})
    assert clean.coverage == 1.0 and clean.n_spots == len(counts)
    assert clean.scores["expression"] > 0.9 and clean.chance > 0.9
    assert clean.scores["batch-blind"] > 0.9 > 0.5 > clean.scores["batch-aware"]
    # a moderate technical shift in sample s2: clusters still mix the samples, the score drops (measured 0.98 → 0.89)
    mild = batch_silhouette(*_expression_world(shift=0.4)[::2], batch_key="sample", n_pcs=10)
    assert mild.coverage == 1.0 and mild.scores["expression"] < clean.scores["expression"] - 0.05, mild.summary()
    # a strong one: Leiden gives each sample its own clusters, which scib skips: undefined, said so, not "mixed"
    strong = batch_silhouette(*_expression_world(shift=1.5)[::2], batch_key="sample", n_pcs=10)
    assert strong.coverage == 0.0 and np.isnan(strong.scores["expression"])
    assert "fully separated" in strong.summary() and "permuted batch" in strong.summary()


@needs_scanpy
def test_subsampling_is_seeded_and_bounded():
    counts, _, sample = _expression_world(n=300)
    a = batch_silhouette(counts, sample, max_spots=200, n_pcs=10, seed=3)
    b = batch_silhouette(counts, sample, max_spots=200, n_pcs=10, seed=3)
    assert a.n_spots == 200 and a.scores == b.scores and a.chance == b.chance


def test_refusals():
    x = np.zeros((6, 2))
    with pytest.raises(HescapeEvalError, match="one label per spot"):
        silhouette_batch(x, [0] * 5, [0] * 6)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(HescapeEvalError, match="finite"):
        silhouette_batch(bad, [0] * 6, [0, 1] * 3)
    with pytest.raises(HescapeEvalError, match="fewer batches than spots"):  # every label has one batch only
        silhouette_batch(x, [0, 0, 0, 1, 1, 1], ["a", "a", "a", "b", "b", "b"])
    with pytest.raises(HescapeEvalError, match="None/NaN"):
        silhouette_batch(x, [0] * 6, ["a", None, "a", "b", "b", "b"])
    with pytest.raises(HescapeEvalError, match="one row per spot"):
        batch_silhouette(np.ones((6, 3)), ["a", "b"] * 3, embeddings={"img": np.zeros((5, 2))})
    with pytest.raises(HescapeEvalError, match="at least 2 batches"):
        batch_silhouette(np.ones((6, 3)), ["a"] * 6)


@needs_scanpy
def test_empty_spots_refused():
    counts, _, sample = _expression_world(n=60)
    counts[4] = 0
    with pytest.raises(HescapeEvalError, match="1 empty spot"):
        expression_clusters(counts)


@needs_mpl
def test_plot_silhouette_vs_recall(tmp_path):
    rows = [{"label": "lung", "silhouette_batch": 0.91, "recall_at_5": 0.62, "chance_recall_at_5": 0.01},
            {"label": "5k", "silhouette_batch": 0.70, "recall_at_5": 0.21, "chance_recall_at_5": 0.02},
            {"label": "breast", "silhouette_batch": 0.76, "recall_at_5": 0.33},
            {"label": "colon", "silhouette_batch": 0.74, "recall_at_5": 0.30}]
    out = plot_silhouette_vs_recall(rows, tmp_path / "fig2.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig2.png"]
    with pytest.raises(HescapeEvalError, match="at least one run"):
        plot_silhouette_vs_recall([], tmp_path / "x.png")
    with pytest.raises(HescapeEvalError, match="recall_at_5"):
        plot_silhouette_vs_recall([{"silhouette_batch": 0.5}], tmp_path / "x.png")
