"""Per-sample expression correction before the gene encoder (``data.gene_normalisation``).

``sample_mean``: every count of gene ``g`` in sample ``s`` is multiplied by ``m_g / m_sg``, where ``m_sg`` is the
mean count of ``g`` over the spots of ``s`` and ``m_g`` its mean over all spots of the training split. Afterwards
every sample has the training split's gene means. It removes what a batch effect does to a sample as a whole —
per-gene capture efficiency, library size, background — and keeps every difference between spots of one sample.
A gene detected (count > 0) in fewer than :data:`MIN_DETECTED_SPOTS` spots of a sample keeps factor 1: a mean
of one or two counts is no estimate of the sample's capture of the gene, and scaling by it would turn a stray
count into hundreds (a gene dropped from a sample's panel is exactly that case). The scaled values are rounded stochastically to
integers (``floor(x + u)``, ``u ~ U(0, 1)`` drawn from a generator seeded by the row, so a spot always gets the same
counts and the expected count is exactly ``x``), because every gene encoder takes raw counts and refuses
non-integers (a guard against log-normalised input).

It is *transductive within a sample*: an unseen donor's factors come from that donor's own spots (no label, no
image), as a per-sample normalisation in single-cell analysis does. Sample-level normalisation is one of the
expression-side choices the HESCAPE paper (section 3, batch effects) asks to measure; the factors are computed
once per split from the raw counts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["sample_mean_factors", "ScaledCounts", "scale_to_reference", "round_counts", "MIN_DETECTED_SPOTS"]

#: A gene is scaled in a sample only when detected in at least this many of its spots (else factor 1).
MIN_DETECTED_SPOTS = 10


def round_counts(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``floor(x + u)`` per entry of ``x`` ``(B, G)``, ``u ~ U(0, 1)`` from ``numpy.random.default_rng([7, row])``
    for each row's dataset index in ``rows``: unbiased and the same for a spot in any batch."""
    u = np.stack([np.random.default_rng([7, int(r)]).random(x.shape[1]) for r in rows]) if len(rows) else 0.0
    return np.floor(x + u).astype(np.float32)


def sample_mean_factors(counts: np.ndarray, samples, reference: np.ndarray, *,
                        min_detected: int = MIN_DETECTED_SPOTS) -> dict[str, np.ndarray]:
    """``{sample: (G,) factors}`` scaling each sample's gene means in ``counts`` to ``reference``; 1 for a gene
    detected in fewer than ``min_detected`` spots of the sample.

    Parameters
    ----------
    counts
        ``(N, G)`` raw counts of a split.
    samples
        ``(N,)`` the sample of every row.
    reference
        ``(G,)`` target gene means (the training split's).
    """
    labels = np.asarray(samples, dtype=object).astype(str)
    out = {}
    for s in np.unique(labels):
        rows = counts[labels == s]
        mean = rows.mean(axis=0, dtype=np.float64)
        ok = (rows > 0).sum(axis=0) >= min_detected
        out[str(s)] = np.where(ok, reference / np.where(ok, mean, 1.0), 1.0).astype(np.float32)
    return out


def scale_to_reference(ds, reference: np.ndarray, counts: np.ndarray | None = None) -> ScaledCounts:
    """``ds`` with every sample's counts scaled to the gene means ``reference`` ``(G,)`` (its raw counts, read
    here unless given as ``counts``)."""
    counts = ds.raw_counts() if counts is None else counts
    return ScaledCounts(ds, sample_mean_factors(counts, ds.samples, reference))


class ScaledCounts(torch.utils.data.Dataset):
    """A :class:`~hescape.data.PairedSpotDataset` whose counts are multiplied by per-sample gene factors.

    Everything else (patches, sample and spot ids, the manifest) is the wrapped dataset's. ``count_transform``
    names the factors (a SHA-256), so feature caches of a gene trunk computed on the scaled counts are told apart
    from caches of the raw counts.
    """

    def __init__(self, ds, factors: dict[str, np.ndarray]):
        self.ds = ds
        names = list(dict.fromkeys(ds.samples))
        self._code = {s: i for i, s in enumerate(names)}
        self._row_code = np.array([self._code[s] for s in ds.samples], dtype=np.int64)
        self._table = np.stack([factors[s] for s in names]) if names else np.ones((0, ds.n_genes), np.float32)
        digest = hashlib.sha256()
        for s in sorted(names):
            digest.update(s.encode() + b"\x00" + np.ascontiguousarray(factors[s], dtype=np.float32).tobytes())
        self.count_transform = f"sample_mean:{digest.hexdigest()}"

    def __len__(self) -> int:
        return len(self.ds)

    def __getattr__(self, name):  # samples, donors, spot_ids, manifest, n_genes, …
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __getitem__(self, idx: int) -> dict:
        item = dict(self.ds[idx])
        scaled = item["gexp"].numpy()[None] * self._table[self._row_code[idx]][None]
        item["gexp"] = torch.from_numpy(round_counts(scaled, np.array([idx]))[0])
        return item

    def counts(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return round_counts(self.ds.counts(idx) * self._table[self._row_code[idx]], idx)

    def raw_counts(self) -> np.ndarray:
        return round_counts(self.ds.raw_counts() * self._table[self._row_code], np.arange(len(self)))
