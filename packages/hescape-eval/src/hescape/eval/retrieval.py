"""Exact cross-modal retrieval metrics over the full gallery.

Ranking rule
------------
For query ``i`` with true match ``i`` in the gallery, its 0-based rank is

    rank_i = #{j : s_ij > s_ii} + #{j < i : s_ij == s_ii}

i.e. the number of gallery items scoring strictly higher, plus the items that tie with the true
match and come earlier in the gallery (ties are broken by gallery index, as a stable sort on
descending score would). ``Recall@k = mean(rank < k)``; mean and median ranks are reported 1-based.

The similarity matrix is never materialised whole: queries are processed in blocks of
``block_size`` rows, so memory is ``O(block_size · N + N · d)``, and there is no sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import HescapeEvalError

__all__ = ["RetrievalResult", "match_ranks", "recall_at_k", "retrieval_metrics", "chance_recall"]


@dataclass(frozen=True)
class RetrievalResult:
    """Metrics of one retrieval direction. ``recall[k]`` and ``chance[k]`` are fractions in [0, 1]."""

    n: int
    recall: dict[int, float]
    chance: dict[int, float]
    mean_rank: float
    median_rank: float
    chance_mean_rank: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}R@{k}": v for k, v in self.recall.items()}
        out.update({f"{prefix}R@{k}_chance": v for k, v in self.chance.items()})
        out.update({f"{prefix}mean_rank": self.mean_rank, f"{prefix}median_rank": self.median_rank,
                    f"{prefix}mean_rank_chance": self.chance_mean_rank, f"{prefix}n": self.n})
        return out


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        msg = f"{name}: expected a torch.Tensor or numpy array, found {type(x).__name__}"
        raise HescapeEvalError(msg)
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        msg = f"{name}: expected a floating-point array, found dtype {x.dtype}; cast with .float()"
        raise HescapeEvalError(msg)
    if x.ndim != 2:
        msg = f"{name}: expected shape (N, d), found {tuple(x.shape)}"
        raise HescapeEvalError(msg)
    if x.shape[0] == 0:
        msg = f"{name}: expected at least one row, found an empty array"
        raise HescapeEvalError(msg)
    if not torch.isfinite(x).all():
        msg = f"{name}: found NaN or inf values; check the encoder outputs before evaluating"
        raise HescapeEvalError(msg)
    return x


def match_ranks(queries, gallery, *, block_size: int = 1024) -> torch.Tensor:
    """0-based rank of each query's true match (gallery row ``i`` for query ``i``), by the rule above.

    Scores are inner products computed in float32 (float64 inputs stay float64).
    """
    q = _as_tensor(queries, "queries")
    g = _as_tensor(gallery, "gallery")
    if q.shape != g.shape:
        msg = f"queries and gallery must be paired row by row with equal shapes; found {tuple(q.shape)} and {tuple(g.shape)}"
        raise HescapeEvalError(msg)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, g = q.to(dtype), g.to(dtype)
    n = q.shape[0]
    ranks = torch.empty(n, dtype=torch.int64)
    idx = torch.arange(n)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        s = q[start:stop] @ g.T  # (b, N)
        rows = torch.arange(stop - start)
        p = s[rows, idx[start:stop]].unsqueeze(1)
        higher = (s > p).sum(dim=1)
        tie_before = ((s == p) & (idx.unsqueeze(0) < idx[start:stop].unsqueeze(1))).sum(dim=1)
        ranks[start:stop] = higher + tie_before
    return ranks


def chance_recall(n: int, k: int) -> float:
    """Recall@k of a random ranking of a gallery of ``n`` items: ``min(k, n) / n``."""
    return min(k, n) / n


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose 0-based rank is below each ``k``."""
    n = len(ranks)
    out = {}
    for k in ks:
        if not isinstance(k, int | np.integer) or k < 1:
            msg = f"k must be a positive integer, found {k!r}"
            raise HescapeEvalError(msg)
        if k > n:
            msg = f"Recall@{k} needs a gallery of at least {k} items, found {n}; lower k or evaluate more samples"
            raise HescapeEvalError(msg)
        out[int(k)] = float((ranks < k).double().mean())
    return out


def _direction(q, g, ks, block_size) -> RetrievalResult:
    ranks = match_ranks(q, g, block_size=block_size)
    n = len(ranks)
    r1 = (ranks + 1).double()
    return RetrievalResult(
        n=n,
        recall=recall_at_k(ranks, ks),
        chance={int(k): chance_recall(n, int(k)) for k in ks},
        mean_rank=float(r1.mean()),
        median_rank=float(np.median(r1.numpy())),
        chance_mean_rank=(n + 1) / 2,
    )


def retrieval_metrics(image_emb, gene_emb, *, ks: Sequence[int] = (1, 5, 10),
                      block_size: int = 1024) -> dict[str, RetrievalResult]:
    """Image→gene (``"i2g"``) and gene→image (``"g2i"``) retrieval over the full paired gallery."""
    return {
        "i2g": _direction(image_emb, gene_emb, ks, block_size),
        "g2i": _direction(gene_emb, image_emb, ks, block_size),
    }
