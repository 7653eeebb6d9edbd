"""Exact Recall@k kernel vs a full stable-argsort reference and faiss ``IndexFlatIP`` top-10 (CPU, d = 128).

Run: ``uv run pytest benchmarks/bench_recall.py --benchmark-enable`` (about 2 minutes on 2 cores).
Not collected by the default ``uv run pytest`` (root testpaths are ``packages`` and ``tests``).

* ``cpp``: :func:`hescape.eval.compute_ranks` (both passes, exact ranks of every query).
* ``argsort``: the brute-force reference: score block ``q @ g.T`` then a stable descending argsort of
  every row (``torch.sort(stable=True)``, the fastest stable sort here). Rows are independent, so it is
  timed on ``ARGSORT_ROWS`` query rows and scaled to all ``N`` rows (stated in the output).
* ``faiss``: ``IndexFlatIP.search(k=10)``, which gives Recall@1..10 only and breaks ties arbitrarily.

Writes ``benchmarks/out/bench_recall.csv`` (not committed) and prints ratios and GFLOP/s against this
CPU's fp32 peak: cores x 2 FMA units x SIMD lanes (8 AVX2, 16 AVX-512) x 2 flops x GHz (GHz from /proc/cpuinfo).

Both directions (``test_directions``, N = ``DIR_N``, d = 128; ``-k "directions or summary"`` runs only these and
the summary):
``one`` = :func:`hescape.eval.compute_ranks` image→gene only; ``two`` = image→gene then gene→image, two calls
(what ``retrieval_metrics`` did before); ``fused`` = :func:`hescape.eval.compute_ranks_both`, both directions
from one pass over the score tiles; for the C++ kernel and the torch fallback. The summary prints fused/two and
fused/one from the same run, with the CPU model, and checks that fused and two give identical ranks.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import hescape.eval as E
import numpy as np
import pytest
import torch

from .conftest import SUMMARY

try:
    import faiss
except ImportError:  # only the faiss comparison needs it
    faiss = None

D = 128
ARGSORT_ROWS = 1024
TIMES: dict[tuple[str, int], float] = {}
_OUT = Path(__file__).parent / "out"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _ghz() -> float:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    return max(mhz) / 1000 if mhz else float("nan")


def _lanes() -> int:
    """fp32 lanes of the widest SIMD path the kernel dispatches to here (AVX-512: 16, AVX2: 8)."""
    from hescape.eval import _backend

    return 16 if _backend._C is not None and _backend._C.cpu_has_avx512() else 8


def _peak_gflops() -> float:
    return _cores() * 2 * _lanes() * 2 * _ghz()


_DATA: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n not in _DATA:
        gen = torch.Generator().manual_seed(n)
        q = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1)
        g = torch.nn.functional.normalize(q + 0.7 * torch.randn(n, D, generator=gen), dim=1)
        _DATA[n] = (q.contiguous(), g.contiguous())
    return _DATA[n]


def _gflops(n: int, seconds: float) -> float:
    return 2.0 * n * n * D / seconds / 1e9


def _run(benchmark, key: tuple[str, int], fn, rounds: int):
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    TIMES[key] = stats.stats.min if stats is not None else float("nan")
    return result


def _cpp(n: int):
    q, g = _data(n)
    return E.compute_ranks(q, g, backend="cpp")


def _faiss(n: int):
    q, g = _data(n)
    index = faiss.IndexFlatIP(D)
    index.add(g.numpy())
    _, idx = index.search(q.numpy(), 10)
    return idx


def _argsort_rows(n: int, rows: int) -> torch.Tensor:
    q, g = _data(n)
    ranks = torch.empty(rows, dtype=torch.int64)
    for start in range(0, rows, 256):
        s = q[start:start + 256] @ g.T
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        ranks[start:start + 256] = (order == torch.arange(start, start + 256).unsqueeze(1)).int().argmax(dim=1)
    return ranks


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(_cores())
    if faiss is not None:
        faiss.omp_set_num_threads(_cores())


@pytest.fixture
def _need_extension():
    if not E.has_cpp_ext():
        pytest.skip("hescape.eval._C is not built: run `uv sync --reinstall-package hescape-eval`")


@pytest.fixture
def _need_faiss():
    if faiss is None:
        pytest.skip("faiss is not installed (dev dependency faiss-cpu)")


@pytest.mark.usefixtures("_need_extension")
@pytest.mark.parametrize("n", [16384, 65536])
def test_cpp(benchmark, n):
    out = _run(benchmark, ("cpp", n), lambda: _cpp(n), rounds=3 if n <= 16384 else 1)
    benchmark.extra_info.update(backend=out.backend, recall10=float((out.ranks < 10).double().mean()))
    TIMES[("cpp_recall10", n)] = float((out.ranks < 10).double().mean())


@pytest.mark.usefixtures("_need_extension")
def test_argsort_reference(benchmark):
    n = 16384
    ranks = _run(benchmark, ("argsort_rows", n), lambda: _argsort_rows(n, ARGSORT_ROWS), rounds=1)
    exact = _cpp(n).ranks[:ARGSORT_ROWS]
    benchmark.extra_info.update(rows=ARGSORT_ROWS, scaled_to=n)
    # Same ranks, up to float rounding between BLAS and the kernel on near-ties.
    assert float((ranks == exact).double().mean()) > 0.99


@pytest.mark.usefixtures("_need_faiss")
@pytest.mark.parametrize("n", [16384, 65536])
def test_faiss_top10(benchmark, n):
    idx = _run(benchmark, ("faiss", n), lambda: _faiss(n), rounds=2 if n <= 16384 else 1)
    TIMES[("faiss_recall10", n)] = float((idx == np.arange(n)[:, None]).any(axis=1).mean())


DIR_N = 8192
DIR_RANKS: dict[tuple[str, str], tuple] = {}


def _one(backend: str):
    q, g = _data(DIR_N)
    return (E.compute_ranks(q, g, backend=backend).ranks,)


def _two(backend: str):
    q, g = _data(DIR_N)
    return E.compute_ranks(q, g, backend=backend).ranks, E.compute_ranks(g, q, backend=backend).ranks


def _fused(backend: str):
    q, g = _data(DIR_N)
    fwd, rev = E.compute_ranks_both(q, g, backend=backend)
    assert fwd.fused
    return fwd.ranks, rev.ranks


_NO_EXT = pytest.mark.skipif(not E.has_cpp_ext(), reason="hescape.eval._C is not built")


@pytest.mark.parametrize("mode", ["one", "two", "fused"])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=_NO_EXT), "torch"])
def test_directions(benchmark, backend, mode):
    fn = {"one": _one, "two": _two, "fused": _fused}[mode]
    out = _run(benchmark, (f"dir-{backend}-{mode}", DIR_N), lambda: fn(backend), rounds=5 if backend == "cpp" else 2)
    DIR_RANKS[(backend, mode)] = out
    benchmark.extra_info.update(n=DIR_N, d=D, backend=backend, mode=mode)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _sgemm_gflops(n: int = 3072) -> float:
    """Measured fp32 GEMM throughput of torch's BLAS here: the practical peak (the VM hides turbo clocks)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def test_zz_summary():
    sgemm = _sgemm_gflops()
    peak = _peak_gflops()
    rows = []
    for n in (16384, 65536):
        t_cpp = TIMES.get(("cpp", n))
        if t_cpp is None:
            continue
        gf = _gflops(n, t_cpp)
        row = {"n": n, "d": D, "cpp_s": t_cpp, "cpp_gflops": gf, "peak_gflops": peak, "cpp_frac_peak": gf / peak}
        if ("faiss", n) in TIMES:
            row.update(faiss_s=TIMES[("faiss", n)], speedup_vs_faiss=TIMES[("faiss", n)] / t_cpp,
                       recall10_cpp=TIMES[("cpp_recall10", n)], recall10_faiss=TIMES[("faiss_recall10", n)])
        if ("argsort_rows", n) in TIMES:
            full = TIMES[("argsort_rows", n)] * n / ARGSORT_ROWS
            row.update(argsort_s_scaled=full, speedup_vs_argsort=full / t_cpp)
        rows.append(row)
    isa = "AVX-512" if _lanes() == 16 else "AVX2"
    SUMMARY.append(f"CPU: {_cores()} cores, {isa}-FMA; nominal fp32 peak {peak:.0f} GFLOP/s at the {_ghz():.2f} GHz "
                   f"cpuinfo clock (above 100% means the cores run faster than that clock); torch sgemm {sgemm:.0f} GFLOP/s")
    for r in rows:
        line = f"N={r['n']:>6} d={D}: cpp {r['cpp_s']:.2f} s = {r['cpp_gflops']:.1f} GFLOP/s ({100 * r['cpp_frac_peak']:.0f}% of nominal peak, {r['cpp_gflops'] / sgemm:.1f}x sgemm)"
        if "speedup_vs_argsort" in r:
            line += f"; argsort ~{r['argsort_s_scaled']:.1f} s (from {ARGSORT_ROWS} rows) -> {r['speedup_vs_argsort']:.1f}x"
        if "speedup_vs_faiss" in r:
            line += (f"; faiss top-10 {r['faiss_s']:.2f} s -> {r['speedup_vs_faiss']:.2f}x"
                     f" (R@10 {r['recall10_cpp']:.4f} vs faiss {r['recall10_faiss']:.4f})")
        SUMMARY.append(line)
    for backend in ("cpp", "torch"):
        t = {m: TIMES.get((f"dir-{backend}-{m}", DIR_N)) for m in ("one", "two", "fused")}
        if None in t.values():
            continue
        two, fused = DIR_RANKS[(backend, "two")], DIR_RANKS[(backend, "fused")]
        same = all(bool((a == b).all()) for a, b in zip(two, fused, strict=True))
        assert same, f"{backend}: fused ranks differ from two separate calls"
        SUMMARY.append(f"both directions, N={DIR_N} d={D}, {backend}: one direction {t['one']:.3f} s, two calls "
                       f"{t['two']:.3f} s, fused {t['fused']:.3f} s -> fused/two {t['fused'] / t['two']:.2f}x, "
                       f"fused/one {t['fused'] / t['one']:.2f}x (ranks identical: {same}); {_cpu_model()}, "
                       f"{torch.get_num_threads()} threads")
        rows.append({"n": DIR_N, "d": D, f"{backend}_one_s": t["one"], f"{backend}_two_s": t["two"],
                     f"{backend}_fused_s": t["fused"]})
    _OUT.mkdir(exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(_OUT / "bench_recall.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    assert rows, "no timing was recorded"
