"""Per-sample gene normalisation (hescape.data.gene_norm), checked on counts built with a known per-sample scale."""

from __future__ import annotations

import numpy as np
import torch
from hescape.data.gene_norm import ScaledCounts, round_counts, sample_mean_factors


class _Counts:
    """The part of a PairedSpotDataset the scaling reads: samples, counts, n_genes."""

    def __init__(self, counts: np.ndarray, samples: list[str]):
        self._c, self.samples, self.n_genes = counts.astype(np.float32), samples, counts.shape[1]
        self.spot_ids = [f"s{i}" for i in range(len(samples))]

    def __len__(self):
        return len(self._c)

    def __getitem__(self, i):
        return {"gexp": torch.from_numpy(self._c[i].copy()), "index": i}

    def counts(self, idx):
        return self._c[np.asarray(idx)]

    def raw_counts(self):
        return self._c.copy()


def test_sample_mean_scaling_removes_a_known_per_sample_scale():
    """Sample B is sample A with every gene's capture scaled by a known factor (and gene 3 never detected): after
    the correction the two samples' gene means agree, and A's factors are those of B times that factor."""
    rng = np.random.default_rng(0)
    a = rng.poisson(lam=[2.0, 5.0, 0.5, 3.0], size=(400, 4)).astype(np.float64)
    scale = np.array([3.0, 0.5, 2.0, 0.0])
    b = a * scale
    counts, samples = np.vstack([a, b]), ["A"] * 400 + ["B"] * 400
    reference = counts.mean(axis=0)
    f = sample_mean_factors(counts, samples, reference)
    assert np.allclose(f["A"][:3], f["B"][:3] * scale[:3], rtol=1e-6)
    assert f["B"][3] == 1.0  # never detected: zeros stay zeros
    # a gene seen in only a few spots of a sample is not scaled by that noise (a stray count would become ~100)
    rare = counts.copy()
    rare[400:, 2] = 0
    rare[[401, 402], 2] = 1
    assert sample_mean_factors(rare, samples, rare.mean(axis=0))["B"][2] == 1.0
    rare[400:420, 2] = 1  # 20 spots: scaled
    assert sample_mean_factors(rare, samples, rare.mean(axis=0))["B"][2] > 1.0
    ds = ScaledCounts(_Counts(counts, samples), f)
    out = ds.raw_counts()
    assert np.array_equal(out, np.round(out)) and (out >= 0).all()  # still counts
    ma, mb = out[:400].mean(0), out[400:].mean(0)
    assert np.allclose(ma[:3], reference[:3], rtol=0.05) and np.allclose(mb[:3], reference[:3], rtol=0.05)
    assert (out[400:, 3] == 0).all()
    # rows read one at a time, in batches or all at once agree (rounding seeded by the row)
    idx = np.array([5, 401, 77, 799])
    assert np.array_equal(ds.counts(idx), out[idx])
    assert np.array_equal(np.stack([ds[i]["gexp"].numpy() for i in idx]), out[idx])


def test_stochastic_rounding_is_unbiased():
    x = np.full((20000, 3), [0.3, 1.5, 7.25])
    r = round_counts(x, np.arange(20000))
    assert set(np.unique(r[:, 0])) == {0.0, 1.0}
    assert np.allclose(r.mean(0), [0.3, 1.5, 7.25], atol=0.02)  # 0.3 ± 3·sd of a mean of 20,000 Bernoullis
