"""Retrieval protocols (full gallery / test batches), per-group breakdown and both directions in one pass.

Truth comes from outside the code under test: NumPy stable argsort per gallery (float64 scores of quantised
embeddings, so ties are exact), torch's own ``DistributedSampler`` + ``DataLoader`` for the batch layout, a
re-implementation of the reference metric (argsort per batch, batch-size-weighted mean as Lightning logs it),
and hand-computed chance levels.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import hescape.eval as E
import numpy as np
import pytest
import torch
from hescape.eval import RetrievalProtocol, _backend
from torch.utils.data import DataLoader, DistributedSampler

_CPP_FUSED = _backend.has_cpp_ext() and hasattr(_backend._C, "rank_cpu_both")
_CPP_ISAS = [b for b in ("cpp-generic", "cpp-avx2", "cpp-avx512") if b in E.available_backends()]


# ----------------------------------------------------------------------------------------------- references
def quantised_pair(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Values k/8 (|k| <= 8): every dot product is exact in float32 whatever the summation order, so ties are
    real ties on every backend; plus duplicated gallery rows and queries (planted ties)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 9, size=(n, d)).astype(np.float32) / 8
    g = rng.integers(-8, 9, size=(n, d)).astype(np.float32) / 8
    g = np.where(rng.random((n, d)) < 0.7, q, g).astype(np.float32)
    if n >= 4:
        g[rng.integers(0, n, n // 4)] = g[rng.integers(0, n, n // 4)]
        q[rng.integers(0, n, max(1, n // 8))] = q[0]
    return q, g


def stable_ranks(q: np.ndarray, g: np.ndarray, labels=None) -> np.ndarray:
    """Position of the first positive in a stable descending sort of each row of ``q @ g.T`` (float64)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    n = s.shape[1]
    out = np.empty(s.shape[0], np.int64)
    for i in range(s.shape[0]):
        order = np.lexsort((np.arange(n), -s[i]))
        pos = order == i if labels is None else labels[order] == labels[i]
        out[i] = int(np.flatnonzero(pos)[0])
    return out


def brute_force_batches(q, g, batches, labels=None):
    """Per-query ranks of both directions, each query ranked inside its batch (NumPy, stable argsort)."""
    r_ig, r_gi, pool = [], [], []
    for rows in batches:
        lab = None if labels is None else labels[rows]
        r_ig.append(stable_ranks(q[rows], g[rows], lab))
        r_gi.append(stable_ranks(g[rows], q[rows], lab))
        pool.append(np.full(len(rows), len(rows)))
    return np.concatenate(r_ig), np.concatenate(r_gi), np.concatenate(pool)


def sampler_batches(n: int, batch: int, world: int) -> list[np.ndarray]:
    """Test batches exactly as PyTorch hands them out: DataLoader(shuffle=False) on one device, or one
    DistributedSampler(shuffle=False) per rank (what Lightning injects under DDP)."""
    data = list(range(n))
    if world == 1:
        loaders = [DataLoader(data, batch_size=batch, shuffle=False)]
    else:
        loaders = [DataLoader(data, batch_size=batch,
                              sampler=DistributedSampler(data, num_replicas=world, rank=r, shuffle=False))
                   for r in range(world)]
    return [b.numpy() for loader in loaders for b in loader]


def reference_metric(q: np.ndarray, g: np.ndarray, batches, ks=(1, 5, 10)) -> dict:
    """The reference evaluation, written from its description: per batch, ``argsort`` of the scores (no ties in
    continuous data), rank of the diagonal, ``R@k = mean(rank < k)`` per batch, then the batch-size-weighted mean
    that ``self.log(..., batch_size=bs)`` accumulates (sum of value x bs over sum of bs)."""
    acc = {(d, k): 0.0 for d in ("i2g", "g2i") for k in ks}
    total = 0
    for rows in batches:
        logits = torch.from_numpy(q[rows]).double() @ torch.from_numpy(g[rows]).double().T
        for name, lg in (("i2g", logits), ("g2i", logits.T)):
            order = torch.argsort(lg, dim=1, descending=True)
            pred = torch.nonzero(order == torch.arange(len(rows)).unsqueeze(1))[:, 1]
            for k in ks:
                acc[(name, k)] += float((pred < k).double().mean()) * len(rows)
        total += len(rows)
    return {key: v / total for key, v in acc.items()}


def continuous_pair(n: int, d: int, seed: int, noise: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d))
    g = q + noise * rng.standard_normal((n, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return q.astype(np.float32), g.astype(np.float32)


# ----------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(("spec", "kind", "b", "w", "name"), [
    ("full", "full", None, 1, "full"), (" FULL ", "full", None, 1, "full"), ("batch", "batch", 64, 1, "batch:64"),
    ("batch:64", "batch", 64, 1, "batch:64"), ("batch:7", "batch", 7, 1, "batch:7"),
    ("batch:64x4", "batch", 64, 4, "batch:64x4"), ("Batch:32X2", "batch", 32, 2, "batch:32x2"),
])
def test_parse_round_trip(spec, kind, b, w, name):
    p = RetrievalProtocol.parse(spec)
    assert (p.kind, p.batch_size, p.world_size, str(p)) == (kind, b, w, name)
    assert RetrievalProtocol.parse(str(p)) == p and RetrievalProtocol.parse(p) is p


@pytest.mark.parametrize("spec", ["", "batch:", "batch:0", "batch:-3", "batch:64x0", "batch:6.4", "full:3", "top-k",
                                  "batch 64", None, 64])
def test_unknown_protocol_is_one_clear_error(spec, refuses):
    refuses(lambda: RetrievalProtocol.parse(spec), "protocol")
    x = torch.randn(70, 4)
    if isinstance(spec, str):
        refuses(lambda: E.retrieval_metrics(x, x, protocol=spec), "protocol")


def test_paper_protocol_and_chance():
    assert str(E.PAPER_PROTOCOL) == "batch:64x4"
    # chance of Recall@5 in a batch of 64 is 5/64 = 0.078 (the number to print beside the paper's Table 2)
    assert RetrievalProtocol.parse("batch:64").chance(5, 64) == pytest.approx(0.078125)


# ----------------------------------------------------------------------------------------------- batch layout
@pytest.mark.parametrize(("n", "b", "w"), [(150, 64, 1), (128, 64, 1), (5, 64, 1), (100, 16, 3), (102, 16, 3),
                                          (7, 4, 4), (3, 2, 5), (1000, 64, 4)])
def test_galleries_match_torch_samplers(n, b, w):
    spec = f"batch:{b}" + (f"x{w}" if w > 1 else "")
    got = RetrievalProtocol.parse(spec).galleries(n)
    want = sampler_batches(n, b, w)
    assert len(got) == len(want)
    for a, c in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, c)
    assert [len(x) for x in RetrievalProtocol.parse("batch:64").galleries(150)] == [64, 64, 22]  # last one kept
    np.testing.assert_array_equal(RetrievalProtocol.parse("full").galleries(9)[0], np.arange(9))


# ----------------------------------------------------------------------------------------------- batch ranks
@pytest.mark.parametrize("backend", ["auto", "torch", *_CPP_ISAS])
@pytest.mark.parametrize(("n", "spec", "d"), [(150, "batch:64", 5), (203, "batch:16x3", 3), (64, "batch:64", 2),
                                              (97, "batch:10", 128)])
def test_batch_ranks_match_brute_force(backend, n, spec, d):
    q, g = quantised_pair(n, d, seed=n + d)
    proto = RetrievalProtocol.parse(spec)
    batches = proto.galleries(n)
    want_ig, want_gi, pool = brute_force_batches(q, g, batches)
    br = _backend.batched_ranks_both(q, g, batches, backend=backend, max_elements=5000)
    np.testing.assert_array_equal(br.i2g, want_ig)
    np.testing.assert_array_equal(br.g2i, want_gi)
    np.testing.assert_array_equal(br.pool, pool)
    np.testing.assert_array_equal(br.rows, np.concatenate(batches))
    full_ranks = stable_ranks(q, g)[np.concatenate(batches)]
    assert (want_ig != full_ranks).any() if len(batches) > 1 else (want_ig == full_ranks).all()

    res = E.retrieval_metrics(q, g, ks=(1, 2, 5), protocol=spec, backend=backend)
    for key, want in (("i2g", want_ig), ("g2i", want_gi)):
        r = res[key]
        assert r.protocol == spec and r.n == len(want) and r.n_pools == len(batches)
        assert r.pool == max(len(x) for x in batches) and r.pool_min == min(len(x) for x in batches)
        assert r.recall == {k: float((want < k).mean()) for k in (1, 2, 5)}
        assert r.mean_rank == pytest.approx(float(np.mean(want + 1)), abs=1e-12)
        assert r.median_rank == float(np.median(want + 1))


@pytest.mark.parametrize("backend", ["auto", *_CPP_ISAS[:1]])
def test_batch_ranks_with_labels(backend):
    q, g = quantised_pair(130, 6, seed=7)
    labels = np.random.default_rng(1).integers(0, 9, size=130)
    batches = RetrievalProtocol.parse("batch:32").galleries(130)
    want_ig, want_gi, _ = brute_force_batches(q, g, batches, labels)
    br = _backend.batched_ranks_both(q, g, batches, positives=labels, backend=backend)
    np.testing.assert_array_equal(br.i2g, want_ig)
    np.testing.assert_array_equal(br.g2i, want_gi)
    n_pos = np.concatenate([(labels[rows][:, None] == labels[rows][None, :]).sum(1) for rows in batches])
    np.testing.assert_array_equal(br.n_pos_i2g, n_pos)
    res = E.retrieval_metrics(q, g, ks=(1, 5), protocol="batch:32", positives=labels, backend=backend)
    pools = np.concatenate([np.full(len(rows), len(rows)) for rows in batches])
    # hypergeometric miss probability C(b - P, k) / C(b, k); a batch smaller than k always hits (last batch: 2 rows)
    want_chance = np.mean([1.0 if p < 5 else 1 - math.comb(int(p) - int(c), 5) / math.comb(int(p), 5)
                           for p, c in zip(pools, n_pos, strict=True)])
    assert res["i2g"].chance[5] == pytest.approx(want_chance, rel=1e-12)
    assert res["i2g"].recall[5] == float((want_ig < 5).mean())


def test_batch_chance_is_exact_with_a_partial_last_batch():
    q, g = continuous_pair(150, 8, seed=0)
    r = E.retrieval_metrics(q, g, ks=(1, 5, 10, 64), protocol="batch:64")["g2i"]
    # 2 full batches of 64 and one of 22: per query min(k, b)/b, averaged over the 150 queries (by hand)
    assert r.chance[1] == pytest.approx((64 / 64 + 64 / 64 + 22 / 22) / 150)
    assert r.chance[5] == pytest.approx((64 * 5 / 64 + 64 * 5 / 64 + 22 * 5 / 22) / 150)  # = 0.1
    assert r.chance[64] == pytest.approx((64 + 64 + 22) / 150)  # k = B: every query is a hit by chance
    assert r.chance_mean_rank == pytest.approx((128 * 65 / 2 + 22 * 23 / 2) / 150)
    full = E.retrieval_metrics(q[:128], g[:128], ks=(5,), protocol="batch:64")["i2g"]
    assert full.chance[5] == 5 / 64 and full.pool == full.pool_min == 64


@pytest.mark.parametrize(("n", "b", "w"), [(300, 64, 1), (300, 64, 4), (257, 32, 3)])
def test_batch_protocol_reproduces_the_reference_metric(n, b, w):
    """Continuous data (no ties): our batch protocol equals the reference computation on torch's own batches."""
    q, g = continuous_pair(n, 16, seed=n + w)
    spec = f"batch:{b}" + (f"x{w}" if w > 1 else "")
    res = E.retrieval_metrics(q, g, ks=(1, 5, 10), protocol=spec)
    ref = reference_metric(q, g, sampler_batches(n, b, w))
    for (name, k), v in ref.items():
        assert res[name].recall[k] == pytest.approx(v, abs=1e-12), (name, k)
    assert res["i2g"].n == math.ceil(n / w) * w  # padded repeats count as queries, as in the reference


def test_batch_protocol_is_deterministic_and_in_dataset_order():
    q, g = continuous_pair(200, 8, seed=3)
    torch.manual_seed(0)
    a = E.retrieval_metrics(q, g, protocol="batch:64")
    torch.manual_seed(123)
    np.random.seed(5)
    b = E.retrieval_metrics(q, g, protocol="batch:64")
    assert a["i2g"] == b["i2g"] and a["g2i"] == b["g2i"]
    # a permutation of the rows changes which items share a batch, so the in-batch numbers change: order matters
    perm = np.random.default_rng(0).permutation(200)
    c = E.retrieval_metrics(q[perm], g[perm], protocol="batch:64")
    assert c["i2g"].recall != a["i2g"].recall or c["g2i"].recall != a["g2i"].recall
    # while the full-gallery numbers do not depend on the order
    f1, f2 = E.retrieval_metrics(q, g), E.retrieval_metrics(q[perm], g[perm])
    assert f1["i2g"].recall == f2["i2g"].recall


# ----------------------------------------------------------------------------------------------- groups
@pytest.mark.parametrize("spec", ["full", "batch:16"])
def test_groups_each_with_their_own_pool_and_chance(spec):
    q, g = quantised_pair(120, 4, seed=11)
    groups = np.array(["s2"] * 50 + ["s1"] * 40 + ["s3"] * 30)
    groups = groups[np.random.default_rng(2).permutation(120)]
    res = E.retrieval_metrics(q, g, ks=(1, 5), protocol=spec, groups=groups, group_key="sample")
    assert list(res.groups) == ["s1", "s2", "s3"] and res.group_key == "sample"
    proto = RetrievalProtocol.parse(spec)
    for name, rep in res.groups.items():
        rows = np.flatnonzero(groups == name)
        want_ig, want_gi, pool = brute_force_batches(q[rows], g[rows], proto.galleries(len(rows)))
        assert rep["i2g"].group == name and rep["i2g"].pool == min(len(rows), proto.batch_size or len(rows))
        assert rep["i2g"].recall[5] == float((want_ig < 5).mean())
        assert rep["g2i"].recall[1] == float((want_gi < 1).mean())
        assert rep["g2i"].chance[5] == pytest.approx(float(np.mean(np.minimum(5, pool) / pool)))
    if spec == "full":
        assert res.groups["s1"]["i2g"].chance[5] == pytest.approx(5 / 40)
    md = res.to_markdown()
    assert "| s3 | image → gene | 16 |" in md or "| s3 | image → gene | 30 |" in md


def test_group_smaller_than_k_is_named(refuses):
    q, g = continuous_pair(60, 4, seed=1)
    groups = np.array(["big"] * 56 + ["tiny"] * 4)
    refuses(lambda: E.retrieval_metrics(q, g, ks=(1, 5), groups=groups, group_key="sample"), "Recall@5",
            "sample 'tiny'", "4")


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(refuses):
    q, g = continuous_pair(80, 4, seed=2)
    refuses(lambda: E.retrieval_metrics(q, g[:79]), "paired rows")
    refuses(lambda: E.retrieval_metrics(q, g[:79], protocol="batch:16"), "paired rows")
    bad = q.copy()
    bad[3, 1] = np.nan
    refuses(lambda: E.retrieval_metrics(bad, g, protocol="batch:16"), "NaN or inf")
    refuses(lambda: E.retrieval_metrics(q, g, ks=(1, 81)), "Recall@81", "80")
    refuses(lambda: E.retrieval_metrics(q, g, ks=(1, 17), protocol="batch:16"), "Recall@17", "16")
    refuses(lambda: E.retrieval_metrics(q[:10], g[:10], ks=(12,), protocol="batch:64"), "Recall@12", "10")
    refuses(lambda: E.retrieval_metrics(q, g, protocol="batch:16", positives=(np.zeros(80), np.zeros(80))), "pair")
    refuses(lambda: E.retrieval_metrics(q, g, groups=np.zeros(79)), "one label per row")
    refuses(lambda: E.retrieval_reports(q, g, protocols=("full", "batch:x")), "protocol")


# ----------------------------------------------------------------------------------------------- reporting
def test_results_record_protocol_and_pool():
    q, g = continuous_pair(150, 8, seed=4)
    reps = E.retrieval_reports(q, g, protocols=("full", "batch:64"), ks=(1, 5, 10))
    full, batch = reps
    assert full["i2g"].as_dict("i2g_")["i2g_protocol"] == "full" and full["i2g"].as_dict()["pool"] == 150
    assert batch["g2i"].as_dict()["protocol"] == "batch:64" and batch["g2i"].as_dict()["pool"] == 64
    text = batch.to_markdown()
    assert "batch:64" in text and "pool 64 (3 galleries, smallest 22)" in text and "R@5 0.100" in text
    assert "| image → gene | 64 |" in text
    assert "pool 150;" in full.to_markdown() and "R@5 0.033" in full.to_markdown()
    d = json.loads(batch.to_json())
    assert d["protocol"] == "batch:64" and d["i2g"]["pool"] == 64 and d["i2g"]["chance"]["5"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------- fused directions
_FUSED_BACKENDS = ["torch", *(_CPP_ISAS if _CPP_FUSED else [])]


@pytest.mark.parametrize("backend", _FUSED_BACKENDS)
@pytest.mark.parametrize(("n", "d", "block"), [(203, 7, 64), (300, 128, 100), (17, 3, 1024), (1, 4, 16),
                                               (131, 1536, 40)])
def test_fused_equals_two_separate_calls(backend, n, d, block):
    q, g = quantised_pair(n, d, seed=n * 3 + d)
    fwd, rev = E.compute_ranks_both(q, g, backend=backend, block_size=block)
    a = E.compute_ranks(q, g, backend=backend, block_size=block)
    b = E.compute_ranks(g, q, backend=backend, block_size=block)
    assert fwd.fused and rev.fused and fwd.backend == a.backend
    for x, y in ((fwd, a), (rev, b)):
        np.testing.assert_array_equal(x.ranks.numpy(), y.ranks.numpy())
        np.testing.assert_array_equal(x.best_index.numpy(), y.best_index.numpy())
        np.testing.assert_array_equal(x.best_score.numpy(), y.best_score.numpy())
    np.testing.assert_array_equal(fwd.ranks.numpy(), stable_ranks(q, g))  # and both are right
    np.testing.assert_array_equal(rev.ranks.numpy(), stable_ranks(g, q))


@pytest.mark.parametrize("backend", _FUSED_BACKENDS)
def test_fused_with_labels(backend):
    q, g = quantised_pair(211, 9, seed=5)
    labels = np.random.default_rng(9).integers(0, 13, size=211)
    fwd, rev = E.compute_ranks_both(q, g, positives=labels, backend=backend)
    np.testing.assert_array_equal(fwd.ranks.numpy(), stable_ranks(q, g, labels))
    np.testing.assert_array_equal(rev.ranks.numpy(), stable_ranks(g, q, labels))
    np.testing.assert_array_equal(rev.ranks.numpy(), E.compute_ranks(g, q, positives=labels, backend=backend).ranks)


@pytest.mark.skipif(not _CPP_FUSED, reason="extension without rank_cpu_both")
@pytest.mark.parametrize("isa", _CPP_ISAS)
@pytest.mark.parametrize(("n", "d"), [(211, 3), (500, 128), (97, 1536)])
def test_cpp_fused_is_bit_exact_on_continuous_data(isa, n, d):
    """Gaussian data with duplicated rows in both sets: the fused pass scores each pair with the same canonical
    dot as the separate calls, so thresholds, ties and ranks agree exactly (no tolerance), across threads."""
    rng = np.random.default_rng(n + d)
    q = rng.standard_normal((n, d)).astype(np.float32)
    g = (q + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    g[rng.permutation(n)[: n // 5]] = g[rng.permutation(n)[: n // 5]]
    q[rng.permutation(n)[: n // 5]] = q[rng.permutation(n)[: n // 5]]
    a = E.compute_ranks(q, g, backend=isa, num_threads=1)
    b = E.compute_ranks(g, q, backend=isa, num_threads=1)
    for threads in (1, 2, 3):
        fwd, rev = E.compute_ranks_both(q, g, backend=isa, num_threads=threads)
        np.testing.assert_array_equal(fwd.ranks.numpy(), a.ranks.numpy())
        np.testing.assert_array_equal(rev.ranks.numpy(), b.ranks.numpy())
        np.testing.assert_array_equal(rev.best_score.numpy().view(np.int32), b.best_score.numpy().view(np.int32))


def test_fused_unpaired_label_pair_and_reverse_coverage(refuses):
    q, _ = quantised_pair(40, 5, seed=1)
    _, g = quantised_pair(70, 5, seed=2)
    ql = np.random.default_rng(0).integers(0, 4, 40)
    gl = np.random.default_rng(1).integers(0, 4, 70)
    for backend in _FUSED_BACKENDS:
        fwd, rev = E.compute_ranks_both(q, g, positives=(ql, gl), backend=backend)
        want_f = E.compute_ranks(q, g, positives=(ql, gl), backend=backend).ranks
        want_r = E.compute_ranks(g, q, positives=(gl, ql), backend=backend).ranks
        np.testing.assert_array_equal(fwd.ranks.numpy(), want_f)
        np.testing.assert_array_equal(rev.ranks.numpy(), want_r)
    gl_extra = gl.copy()
    gl_extra[5] = 99  # a gene label that no image carries: gene->image has no positive for it
    refuses(lambda: E.compute_ranks_both(q, g, positives=(ql, gl_extra)), "gene")


def test_retrieval_metrics_uses_one_pass():
    q, g = quantised_pair(90, 6, seed=3)
    res = E.retrieval_metrics(q, g, ks=(1, 5))
    assert res["i2g"].recall[5] == float((stable_ranks(q, g) < 5).mean())
    assert res["g2i"].recall[1] == float((stable_ranks(g, q) < 1).mean())
    res64 = E.retrieval_metrics(q.astype(np.float64), g.astype(np.float64), ks=(1, 5), block_size=32)  # torch, fp64
    assert res64["i2g"] == replace(res["i2g"], backend="torch")  # float64 stays on torch; exact products agree
    assert res64["g2i"] == replace(res["g2i"], backend="torch")
    if _CPP_FUSED:
        fwd, _ = E.compute_ranks_both(q, g)
        assert fwd.fused


@pytest.mark.skipif(not _CPP_FUSED, reason="extension without rank_cpu_both")
def test_extension_without_fused_entry_point_falls_back_to_two_calls(monkeypatch):
    q, g = quantised_pair(77, 5, seed=8)
    monkeypatch.delattr(_backend._C, "rank_cpu_both")
    fwd, rev = E.compute_ranks_both(q, g, backend="cpp")
    assert not fwd.fused and fwd.backend.startswith("cpp-")
    np.testing.assert_array_equal(fwd.ranks.numpy(), stable_ranks(q, g))
    np.testing.assert_array_equal(rev.ranks.numpy(), stable_ranks(g, q))


def test_protocols_without_the_extension(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_IMPORT_ERROR", "simulated")
    monkeypatch.setattr(_backend, "_warned_fallback", True)
    q, g = quantised_pair(140, 6, seed=12)
    full = E.retrieval_metrics(q, g, ks=(1, 5))
    assert full["i2g"].backend == "torch" and full["i2g"].recall[5] == float((stable_ranks(q, g) < 5).mean())
    want_ig, want_gi, _ = brute_force_batches(q, g, RetrievalProtocol.parse("batch:64").galleries(140))
    batch = E.retrieval_metrics(q, g, ks=(1, 5), protocol="batch:64")
    assert batch["g2i"].recall[5] == float((want_gi < 5).mean())
    assert batch["i2g"].recall[1] == float((want_ig < 1).mean())
