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
``block_size`` query rows (memory ``O(block_size · N + N · d)``). Both directions come from one pass over the
score tiles (:func:`hescape.eval.compute_ranks_both`).

Protocols and groups
--------------------
``protocol="full"`` (the default) ranks against the whole evaluated set; ``protocol="batch:64"`` ranks inside
each test batch of 64 in dataset order, as the HESCAPE reference code does (see :mod:`hescape.eval.protocol`
for what was checked there, and ``"batch:64x4"`` for its 4-device layout). ``groups=`` (e.g. the sample of
each spot) adds one evaluation per group, run on that group's rows alone under the same protocol, so each
group has its own pool size and chance. Every :class:`RetrievalResult` records its protocol and pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._backend import _as_tensor, batched_ranks_both, compute_ranks, compute_ranks_both, warn_if_not_unit
from .errors import HescapeEvalError
from .protocol import RetrievalProtocol

__all__ = ["RetrievalReport", "RetrievalResult", "chance_recall", "match_ranks", "recall_at_k", "retrieval_metrics",
           "retrieval_reports"]


@dataclass(frozen=True)
class RetrievalResult:
    """Metrics of one retrieval direction. ``recall[k]`` and ``chance[k]`` are fractions in [0, 1].

    ``n`` is the number of queries evaluated (a row counts twice where a protocol repeats it). ``mean_rank`` and
    ``median_rank`` are 1-based over those queries; ``chance_*`` are the expectations under a random ranking of
    each query's own gallery (exact, averaged over queries). ``backend`` records what computed the ranks
    (``"cuda"``, ``"cpp-avx512"``, ``"cpp-avx2"``, ``"cpp-generic"``, ``"torch"``). ``protocol`` is the
    :class:`~hescape.eval.protocol.RetrievalProtocol` spec (``"full"``, ``"batch:64"``, ...); ``pool`` the
    largest gallery size (the full set, or the batch size ``B``), ``pool_min`` the smallest gallery a query met
    (a last, partial batch), ``n_pools`` the number of galleries; ``group`` the group label (``None``: whole set).
    """

    n: int
    recall: dict[int, float]
    chance: dict[int, float]
    mean_rank: float
    median_rank: float
    chance_mean_rank: float
    backend: str = "torch"
    protocol: str = "full"
    pool: int | None = None
    pool_min: int | None = None
    n_pools: int = 1
    group: str | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {f"{prefix}R@{k}": v for k, v in self.recall.items()}
        out.update({f"{prefix}R@{k}_chance": v for k, v in self.chance.items()})
        out.update({f"{prefix}mean_rank": self.mean_rank, f"{prefix}median_rank": self.median_rank,
                    f"{prefix}mean_rank_chance": self.chance_mean_rank, f"{prefix}n": self.n,
                    f"{prefix}protocol": self.protocol})
        if self.pool is not None:
            out[f"{prefix}pool"] = self.pool
        return out

    def to_dict(self) -> dict:
        """JSON-ready record of every field (``recall``/``chance`` keyed by ``k`` as strings)."""
        return {"protocol": self.protocol, "group": self.group, "n": self.n, "pool": self.pool,
                "pool_min": self.pool_min, "n_pools": self.n_pools, "backend": self.backend,
                "recall": {str(k): v for k, v in self.recall.items()},
                "chance": {str(k): v for k, v in self.chance.items()},
                "mean_rank": self.mean_rank, "median_rank": self.median_rank,
                "chance_mean_rank": self.chance_mean_rank}


_DIRECTIONS = {"i2g": "image → gene", "g2i": "gene → image"}


class RetrievalReport(dict):
    """``{"i2g": RetrievalResult, "g2i": RetrievalResult}`` of one protocol, plus per-group reports.

    A plain dict for callers that index ``["i2g"]``; the attributes say how it was computed.

    Attributes
    ----------
    protocol
        The :class:`~hescape.eval.protocol.RetrievalProtocol` used.
    ks
        The ``k`` values of every ``recall`` / ``chance`` dict.
    groups
        ``{label: RetrievalReport}`` when ``groups=`` was given (each ranked within its own rows), else ``{}``.
    group_key
        Name of the grouping (e.g. ``"sample"``), for headers; ``None`` without groups.
    """

    def __init__(self, results: dict, *, protocol: RetrievalProtocol, ks: Sequence[int],
                 groups: dict | None = None, group_key: str | None = None) -> None:
        super().__init__(results)
        self.protocol = protocol
        self.ks = [int(k) for k in ks]
        self.groups: dict[str, RetrievalReport] = dict(groups or {})
        self.group_key = group_key

    def header(self) -> str:
        """One line: protocol, pool size, chance per ``k`` and query count."""
        r = self["i2g"]
        pool = f"pool {r.pool}"
        if r.n_pools > 1:
            pool += f" ({r.n_pools} galleries, smallest {r.pool_min})"
        chance = ", ".join(f"R@{k} {r.chance[k]:.3f}" for k in self.ks)
        return (f"Protocol `{self.protocol}`: {self.protocol.describe()}; {pool}; chance {chance}; "
                f"{r.n} queries per direction.")

    def to_markdown(self, title: str | None = None) -> str:
        """Header line (protocol, pool, chance), a table with one row per direction, then one per group."""
        head = ("| direction | pool | " + " | ".join(f"R@{k} (chance)" for k in self.ks)
                + " | mean rank (chance) | median rank |")
        sep = "|" + "---|" * (len(self.ks) + 4)

        def row(name: str, r: RetrievalResult) -> str:
            cells = " | ".join(f"{r.recall[k]:.3f} ({r.chance[k]:.3f})" for k in self.ks)
            return (f"| {name} | {r.pool} | {cells} | {r.mean_rank:.1f} ({r.chance_mean_rank:.1f}) "
                    f"| {r.median_rank:.1f} |")

        lines = [f"### {title}", ""] if title else []
        lines += [self.header(), "", head, sep]
        lines += [row(_DIRECTIONS.get(key, key), r) for key, r in self.items()]
        if self.groups:
            gk = self.group_key or "group"
            lines += ["", f"Per {gk}: each {gk} ranked on its own rows under `{self.protocol}` (its own pool "
                          "and chance).", "", head.replace("| direction |", f"| {gk} | direction |"), "|---" + sep]
            for name, rep in self.groups.items():
                lines += [f"| {name} " + row(_DIRECTIONS.get(key, key), r) for key, r in rep.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: protocol, ks, both directions and the per-group reports."""
        out = {"protocol": str(self.protocol), "description": self.protocol.describe(), "ks": self.ks,
               **{key: r.to_dict() for key, r in self.items()}}
        if self.groups:
            out["group_key"] = self.group_key
            out["groups"] = {name: {key: r.to_dict() for key, r in rep.items()} for name, rep in self.groups.items()}
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


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


def _labels(x, what: str, n: int) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise HescapeEvalError.build(what=what, expected=f"one label per row, shape ({n},)", found=f"shape {arr.shape}",
                                     fix="pass a 1-D label vector aligned with the embedding rows")
    return arr


def _swap(positives):
    if isinstance(positives, tuple | list) and len(positives) == 2:
        return (positives[1], positives[0])
    return positives


def _check_pool(ks: Sequence[int], largest: int, protocol: RetrievalProtocol, where: str) -> None:
    """Every ``k`` must fit the largest gallery: the full set, or a full batch (a last, partial one may be smaller)."""
    _check_ks(ks, 1 << 62)  # types and positivity first
    for k in ks:
        if k > largest:
            unit = "a gallery" if protocol.kind == "full" else "test batches"
            raise HescapeEvalError.build(what=f"Recall@{k}{where}", expected=f"{unit} of at least {k} items",
                                         found=f"{largest} under protocol {protocol}",
                                         fix="lower k, evaluate more samples, or use a larger batch (batch:B)")


def _summarise(ranks, pool, n_pos, ks: Sequence[int], *, backend: str, protocol: RetrievalProtocol, pool_nominal: int,
               n_pools: int, group: str | None) -> RetrievalResult:
    """Recall@k, ranks and exact chance levels from per-query ranks, gallery sizes and positive counts."""
    ranks = np.asarray(ranks, dtype=np.int64)
    pool = np.broadcast_to(np.asarray(pool, dtype=np.int64), ranks.shape)
    n_pos = np.broadcast_to(np.asarray(n_pos, dtype=np.int64), ranks.shape)
    pairs, inverse = np.unique(np.stack([pool, n_pos]), axis=1, return_inverse=True)
    inverse = inverse.ravel()
    chance = {}
    for k in ks:
        per_pair = np.array([chance_recall(int(p), int(k), int(c)) for p, c in pairs.T])
        chance[int(k)] = float(per_pair[inverse].mean())
    r1 = ranks.astype(np.float64) + 1.0
    return RetrievalResult(
        n=int(ranks.size),
        recall={int(k): float((ranks < k).mean()) for k in ks},
        chance=chance,
        mean_rank=float(r1.mean()),
        median_rank=float(np.median(r1)),
        chance_mean_rank=float(np.mean((pool + 1) / (n_pos + 1))),
        backend=backend,
        protocol=str(protocol),
        pool=int(pool_nominal),
        pool_min=int(pool.min()),
        n_pools=int(n_pools),
        group=group,
    )


def _evaluate(q: torch.Tensor, g: torch.Tensor, ks, protocol: RetrievalProtocol, positives, backend: str,
              block_size: int, group: str | None, where: str) -> dict[str, RetrievalResult]:
    nq, ng = q.shape[0], g.shape[0]
    common = {"protocol": protocol, "group": group}
    if protocol.kind == "full":
        _check_pool(ks, min(nq, ng), protocol, where)
        fwd, rev = compute_ranks_both(q, g, positives=positives, backend=backend, block_size=block_size)
        return {
            "i2g": _summarise(fwd.ranks.cpu().numpy(), ng, _n_positives(positives), ks, backend=fwd.backend,
                              pool_nominal=ng, n_pools=1, **common),
            "g2i": _summarise(rev.ranks.cpu().numpy(), nq, _n_positives(_swap(positives)), ks, backend=rev.backend,
                              pool_nominal=nq, n_pools=1, **common),
        }
    if nq != ng:
        raise HescapeEvalError.build(what=f"protocol {protocol}", expected="paired rows (as many image as gene rows)",
                                     found=f"{nq} and {ng} rows", fix="pass one row per spot in both, or use 'full'")
    if isinstance(positives, tuple | list) and len(positives) == 2:
        raise HescapeEvalError.build(what=f"protocol {protocol}", expected="positives=None or one label vector",
                                     found="a (query_labels, gallery_labels) pair",
                                     fix="batches hold paired rows: pass one label vector, or use protocol='full'")
    galleries = protocol.galleries(nq)
    _check_pool(ks, min(int(protocol.batch_size), max(len(x) for x in galleries)), protocol, where)
    br = batched_ranks_both(q, g, galleries, positives=positives, backend=backend)
    largest = int(br.pool.max())
    return {
        "i2g": _summarise(br.i2g, br.pool, br.n_pos_i2g, ks, backend=br.backend, pool_nominal=largest,
                          n_pools=len(galleries), **common),
        "g2i": _summarise(br.g2i, br.pool, br.n_pos_g2i, ks, backend=br.backend, pool_nominal=largest,
                          n_pools=len(galleries), **common),
    }


def retrieval_metrics(image_emb, gene_emb, *, ks: Sequence[int] = (1, 5, 10), block_size: int = 1024,
                      positives=None, backend: str = "auto", protocol: str | RetrievalProtocol = "full",
                      groups=None, group_key: str | None = None) -> RetrievalReport:
    """Image→gene (``"i2g"``) and gene→image (``"g2i"``) retrieval under a stated protocol.

    Parameters
    ----------
    image_emb, gene_emb
        ``(N_i, d)`` and ``(N_g, d)`` float embeddings (tensors or arrays; paired rows, ``N_i == N_g``, unless
        ``positives`` is a label pair and the protocol is ``"full"``).
    ks
        Recall@k values; each must fit the gallery (the set, or a full batch), else :class:`HescapeEvalError`.
    block_size
        Tile side of the torch backend.
    positives
        ``None`` (row ``i`` matches row ``i``), one label vector for both sets, or a pair
        ``(image_labels, gene_labels)`` (swapped automatically for ``"g2i"``; ``"full"`` only).
    backend
        Rank backend (:data:`hescape.eval.BACKENDS`). Under a batch protocol ``"auto"`` ranks all batches of one
        size in one batched product (torch); a named backend ranks batch by batch on that backend.
    protocol
        ``"full"``, ``"batch:B"`` or ``"batch:BxW"`` (:class:`~hescape.eval.protocol.RetrievalProtocol`).
    groups
        Optional label per row (e.g. sample or donor): adds ``report.groups[label]``, each evaluated on that
        group's rows only, under the same protocol (its own pool size and chance). Labels are sorted.
    group_key
        Name of the grouping for headers (default ``"group"``).

    Returns
    -------
    RetrievalReport
        ``{"i2g": RetrievalResult, "g2i": RetrievalResult}`` with ``.protocol``, ``.ks`` and ``.groups``.

    Raises
    ------
    HescapeEvalError
        Unequal row counts, NaN/inf, a ``k`` larger than the pool, an unknown protocol, misaligned labels.
    """
    proto = RetrievalProtocol.parse(protocol)
    ks = list(ks)
    _check_ks(ks, 1 << 62)
    q, g = _as_tensor(image_emb, "image embeddings"), _as_tensor(gene_emb, "gene embeddings")
    warn_if_not_unit(q, g)
    overall = _evaluate(q, g, ks, proto, positives, backend, block_size, None, "")
    per_group: dict[str, RetrievalReport] = {}
    if groups is not None:
        if q.shape[0] != g.shape[0]:
            raise HescapeEvalError.build(what="groups", expected="paired image and gene rows (equal N)",
                                         found=f"{q.shape[0]} and {g.shape[0]} rows",
                                         fix="drop groups= or pair the rows")
        labels = _labels(groups, "groups", q.shape[0])
        key = group_key or "group"
        for name in np.unique(labels):
            rows = np.flatnonzero(labels == name)
            t_rows = torch.from_numpy(rows).to(q.device)
            if positives is None:
                sub = None
            elif isinstance(positives, tuple | list) and len(positives) == 2:
                sub = tuple(_labels(p, "positives", q.shape[0])[rows] for p in positives)
            else:
                sub = _labels(positives, "positives", q.shape[0])[rows]
            res = _evaluate(q[t_rows], g[t_rows], ks, proto, sub, backend, block_size, str(name),
                            f" in {key} {str(name)!r}")
            per_group[str(name)] = RetrievalReport(res, protocol=proto, ks=ks)
    return RetrievalReport(overall, protocol=proto, ks=ks, groups=per_group,
                           group_key=(group_key or "group") if groups is not None else None)


def retrieval_reports(image_emb, gene_emb, *, protocols: Sequence[str | RetrievalProtocol] = ("full", "batch:64"),
                      ks: Sequence[int] = (1, 5, 10), groups=None, group_key: str | None = None,
                      positives=None, backend: str = "auto", block_size: int = 1024) -> list[RetrievalReport]:
    """:func:`retrieval_metrics` under each protocol in turn (default: the full gallery and test batches of 64).

    Every protocol string is parsed before anything is ranked, so a typo fails fast. Returns one
    :class:`RetrievalReport` per protocol, in the order given; ``report.to_markdown()`` prints it.
    """
    parsed = [RetrievalProtocol.parse(p) for p in protocols]
    if not parsed:
        raise HescapeEvalError.build(what="protocols", expected="at least one protocol", found="none",
                                     fix="pass e.g. protocols=('full', 'batch:64')")
    return [retrieval_metrics(image_emb, gene_emb, ks=ks, protocol=p, groups=groups, group_key=group_key,
                              positives=positives, backend=backend, block_size=block_size) for p in parsed]
