"""Post-hoc batch correction of embeddings (hescape.eval.correction), checked against brute force, harmonypy
itself and scikit-learn's silhouette score."""

from __future__ import annotations

import numpy as np
import pytest
from hescape.eval import HescapeEvalError
from hescape.eval.correction import centre_by_sample, harmony


def _planted(seed: int = 0):
    """Three cell types × three batches; each batch shifts every embedding by its own offset."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, 900)
    batch = np.repeat(["b0", "b1", "b2"], 300)
    centres = rng.normal(size=(3, 16)) * 3
    offsets = rng.normal(size=(3, 16)) * 4
    x = centres[types] + offsets[np.searchsorted(["b0", "b1", "b2"], batch)] + rng.normal(size=(900, 16)) * 0.5
    return x, batch, types


def test_centre_by_sample_matches_a_loop():
    x, batch, _ = _planted()
    out = centre_by_sample(x, batch)
    for i in (0, 450, 899):
        same = x[batch == batch[i]]
        v = x[i] - same.mean(axis=0)
        assert np.allclose(out[i], v / np.linalg.norm(v), atol=1e-6)
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    lone = centre_by_sample(x[:4], ["a", "a", "a", "b"])  # a sample of one spot: only normalised
    assert np.allclose(lone[3], x[3] / np.linalg.norm(x[3]), atol=1e-6)


def test_corrections_remove_a_planted_batch_shift():
    pytest.importorskip("harmonypy")
    from sklearn.metrics import silhouette_score

    x, batch, types = _planted()
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    before_b, before_t = silhouette_score(raw, batch), silhouette_score(raw, types)
    for fixed in (harmony(x, batch), centre_by_sample(x, batch)):
        assert silhouette_score(fixed, batch) < before_b - 0.2  # batches no longer separate
        assert silhouette_score(fixed, types) > before_t + 0.2  # the cell types now do
        assert np.allclose(np.linalg.norm(fixed, axis=1), 1, atol=1e-5)


def test_harmony_is_harmonypy():
    harmonypy = pytest.importorskip("harmonypy")
    x, batch, _ = _planted(1)
    ho = harmonypy.run_harmony(x, {"batch": batch}, ["batch"], random_state=3, verbose=False, ncores=1)
    z = np.asarray(ho.Z_corr)
    z = z if z.shape == x.shape else z.T
    assert np.allclose(harmony(x, batch, seed=3), z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)
    assert np.array_equal(harmony(x, batch, seed=3), harmony(x, batch, seed=3))  # deterministic


def test_one_batch_and_bad_input():
    x, _, _ = _planted()
    one = harmony(x, ["s"] * len(x))
    assert np.allclose(one, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(HescapeEvalError, match="one batch label per spot \\(900\\), found 3 labels"):
        centre_by_sample(x, ["a", "b", "c"])
    bad = x.copy()
    bad[4, 2] = np.nan
    with pytest.raises(HescapeEvalError, match="finite embeddings, found NaN"):
        harmony(bad, ["a"] * 900)
    with pytest.raises(HescapeEvalError, match="non-empty \\(N, d\\) embedding"):
        centre_by_sample(np.zeros(5), ["a"] * 5)
    with pytest.raises(HescapeEvalError, match="a 1-D sequence, found labels of shape \\(450, 2\\)"):
        centre_by_sample(x, np.zeros((450, 2)))
    with pytest.raises(HescapeEvalError, match="at least 16 spots, found 15"):
        harmony(x[:15], ["a"] * 8 + ["b"] * 7)
    with pytest.raises(HescapeEvalError, match="real-valued"):
        centre_by_sample(x.astype(complex), ["a"] * 900)
