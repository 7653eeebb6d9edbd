"""Exact cross-modal retrieval metrics over the full gallery.

Ranking rule
------------
For query ``i`` with true match ``i`` in the gallery, its 0-based rank is

    rank_i = #{j : s_ij > s_ii} + #{j < i : s_ij == s_ii}

i.e. the number of gallery items scoring strictly higher, plus the items that tie with the true
match and come earlier in the gallery (ties are broken by gallery index, as a stable sort on
descending score would). ``Recall@k = mean(rank < k)``; mean and median ranks are reported 1-based.

With several positives per query (``positives=`` labels), the rank is that of the best positive among
the negatives only: negatives scoring strictly higher than it, plus negatives tying with it at a lower
gallery index (see :mod:`hescape.eval._backend`). It is the position of the first positive in a
stable descending sort, so ``Recall@k`` is the fraction of queries with some positive in the top ``k``.

The similarity matrix is never materialised whole and nothing is sorted: the C++/CUDA kernels fuse
the dot products with the compare-and-count, and the torch fallback works in blocks of
``block_size`` query rows (memory ``O(block_size · N + N · d)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._backend import compute_ranks
from .errors import HescapeEvalError

__all__ = ["RetrievalResult", "match_ranks", "recall_at_k", "retrieval_metrics", "chance_recall"]


@dataclass(frozen=True)
class RetrievalResult:
    """Metrics of one retrieval direction. ``recall[k]`` and ``chance[k]`` are fractions in [0, 1].

    ``backend`` records what computed the ranks (``"cuda"``, ``"cpp-avx512"``, ``"cpp-avx2"``, ``"cpp-generic"``, ``"torch"``).
    """

    n: int
    recall: dict[int, float]
    chance: dict[int, float]
    mean_rank: float
    median_rank: float
    chance_mean_rank: float
    backend: str = "torch"

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}R@{k}": v for k, v in self.recall.items()}
        out.update({f"{prefix}R@{k}_chance": v for k, v in self.chance.items()})
        out.update({f"{prefix}mean_rank": self.mean_rank, f"{prefix}median_rank": self.median_rank,
                    f"{prefix}mean_rank_chance": self.chance_mean_rank, f"{prefix}n": self.n})
        return out


def match_ranks(queries, gallery, *, block_size: int = 1024, positives=None, backend: str = "auto") -> torch.Tensor:
    """0-based rank of each query's true match (gallery row ``i`` for query ``i``), by the rule above.

    ``positives`` (labels, or a ``(query_labels, gallery_labels)`` pair) generalises the true match to
    several positives; ``backend`` picks the kernel (see :func:`hescape.eval.compute_ranks`, which also
    reports the backend used). Scores are float32 inner products (float64 inputs stay float64 on torch).
    """
    return compute_ranks(queries, gallery, positives=positives, backend=backend, block_size=block_size).ranks


def chance_recall(n: int, k: int, n_positives: int = 1) -> float:
    """Recall@k of a random ranking of ``n`` items with ``n_positives`` positives.

    ``1 - C(n - P, k) / C(n, k)``; for one positive, ``min(k, n) / n``.
    """
    if k >= n - n_positives + 1:
        return 1.0
    miss = 1.0
    for t in range(min(k, n)):
        miss *= (n - n_positives - t) / (n - t)
    return 1.0 - miss


def _check_ks(ks: Sequence[int], n: int) -> None:
    for k in ks:
        if not isinstance(k, int | np.integer) or k < 1:
            raise HescapeEvalError.build(what=f"k={k!r}", expected="a positive integer", found=type(k).__name__,
                                         fix="pass ks such as (1, 5, 10)")
        if k > n:
            raise HescapeEvalError.build(what=f"Recall@{k}", expected=f"a gallery of at least {k} items", found=f"{n}",
                                         fix="lower k or evaluate more samples")


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int], *, n_gallery: int | None = None) -> dict[int, float]:
    """Fraction of queries whose 0-based rank is below each ``k`` (``k`` at most the gallery size)."""
    _check_ks(ks, len(ranks) if n_gallery is None else n_gallery)
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def _n_positives(positives) -> np.ndarray | int:
    """Number of gallery positives of each query (validated labels)."""
    if positives is None:
        return 1
    if isinstance(positives, tuple | list) and len(positives) == 2:
        ql, gl = positives
    else:
        ql = gl = positives
    ql = np.asarray(ql.cpu() if isinstance(ql, torch.Tensor) else ql)
    gl = np.asarray(gl.cpu() if isinstance(gl, torch.Tensor) else gl)
    values, counts = np.unique(gl, return_counts=True)
    return counts[np.clip(np.searchsorted(values, ql), 0, len(values) - 1)]


def _direction(q, g, ks, block_size, positives, backend, reverse) -> RetrievalResult:
    if isinstance(positives, tuple | list) and len(positives) == 2 and reverse:
        positives = (positives[1], positives[0])
    _check_ks(ks, int(g.shape[0]) if hasattr(g, "shape") else 0)
    out = compute_ranks(q, g, positives=positives, backend=backend, block_size=block_size)
    ranks = out.ranks.cpu()
    n, n_g = len(ranks), int(g.shape[0])
    r1 = (ranks + 1).double()
    n_pos = np.atleast_1d(_n_positives(positives))
    uniq, cnt = np.unique(n_pos, return_counts=True)
    chance = {int(k): float(sum(c * chance_recall(n_g, int(k), int(p)) for p, c in zip(uniq, cnt, strict=True))
                            / cnt.sum()) for k in ks}
    return RetrievalResult(
        n=n,
        recall=recall_at_k(ranks, ks, n_gallery=n_g),
        chance=chance,
        mean_rank=float(r1.mean()),
        median_rank=float(np.median(r1.numpy())),
        chance_mean_rank=float(np.mean((n_g + 1) / (n_pos + 1))),
        backend=out.backend,
    )


def retrieval_metrics(image_emb, gene_emb, *, ks: Sequence[int] = (1, 5, 10), block_size: int = 1024,
                      positives=None, backend: str = "auto") -> dict[str, RetrievalResult]:
    """Image→gene (``"i2g"``) and gene→image (``"g2i"``) retrieval over the full paired gallery.

    ``positives``: ``None`` (row ``i`` matches row ``i``), one label vector for both sets, or a pair
    ``(image_labels, gene_labels)`` (swapped automatically for ``"g2i"``).
    """
    return {
        "i2g": _direction(image_emb, gene_emb, ks, block_size, positives, backend, reverse=False),
        "g2i": _direction(gene_emb, image_emb, ks, block_size, positives, backend, reverse=True),
    }
