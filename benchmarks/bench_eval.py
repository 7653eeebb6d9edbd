"""Speed of the hescape-eval probes: HEST expression probe, MIL cross-validation, both retrieval directions vs faiss.

Run: ``uv run pytest benchmarks/bench_eval.py --benchmark-enable -q -p no:cacheprovider -s`` (about 6-8 minutes on
2 cores). Not collected by the default ``uv run pytest`` (root testpaths are ``packages`` and ``tests``); the heavy
cases skip under the default ``--benchmark-disable``.

* ``expression``: :func:`hescape.eval.expression.expression_probe` on ``EXPR_N`` spots x 1,536-d random features x 50
  genes (Poisson counts driven by a linear map of the features), 10 patients, ``n_splits=5`` (``GroupKFold``), the
  HEST defaults otherwise (PCA 256, ridge ``alpha="hest"``, gene selection over all spots). Set
  ``HESCAPE_BENCH_EXPR_N`` to change the spot count.
* ``mil``: :func:`hescape.eval.mil.cross_validate_mil` on 100 bags x 2,000 tiles x 1,536-d, 20 sites, 5 folds, the
  paper-size :class:`~hescape.eval.mil.TransformerMIL` (2 layers, 8 heads x 64, latent 512) for ONE epoch
  (``epochs=1``); the paper's 10 epochs are estimated as 10x that (an upper bound: the test pass runs once, not 10x).

Each of the two runs in a fresh subprocess that builds the data, runs the call once on tiny inputs (so the lazy
imports are not measured), then times the call alone (``time.perf_counter``)
and reads the resident-set high-water mark (``VmHWM`` after ``/proc/self/clear_refs`` = 5, as ``bench_loss.py``):
``peak`` is the absolute high-water mark, ``extra`` its rise over the resident set with the inputs built. A second
subprocess runs the same call once under ``cProfile`` for the share of time outside scikit-learn / torch:

* scikit-learn: time inside scikit-learn = summed cumulative time of every call edge from hescape code into a
  function defined in ``sklearn/`` (so the numpy/scipy/BLAS work that scikit-learn calls counts as
  scikit-learn); outside = profiled wall time minus that. Top entries: hescape functions' own time and calls from
  hescape code into non-scikit-learn functions, by cumulative time of that edge.
* torch: self time of functions in ``torch/`` plus C built-ins whose name names torch (``torch._C...``, tensor
  methods, autograd's ``run_backward``); outside = the rest (hescape code, numpy, Python). Top entries by self time.

* ``retrieval``: N = 65,536, d = 128, single run each: :func:`hescape.eval.compute_ranks_both` (exact ranks of both
  directions from one pass) vs faiss ``IndexFlatIP`` top-10 search run twice (image→gene, gene→image).
* ``directions``: N = 65,536 (``HESCAPE_BENCH_DIRECTIONS_N``), d = 128: :func:`hescape.eval.compute_ranks` (image→gene
  only) against :func:`hescape.eval.compute_ranks_both` (both directions from one pass), C++ kernel, all cores, in
  one process on the same data, alternated ``HESCAPE_BENCH_DIRECTIONS_ROUNDS`` (2) times after a small warm-up call;
  wall and process CPU time (``time.process_time``, less sensitive to other jobs time-slicing the cores) and the load
  average before and after are recorded (the target: both ≤ 1.1× one direction). Ranks are checked equal.

The summary lines carry the CPU model and thread count; ``benchmarks/out/bench_eval.json`` holds the raw figures
(not committed).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

try:  # the shared benchmark harness (absent when this file runs as the subprocess script)
    from .conftest import SUMMARY
except ImportError:
    SUMMARY: list[str] = []

EXPR_N = int(os.environ.get("HESCAPE_BENCH_EXPR_N", "30000"))
EXPR_D, EXPR_GENES, EXPR_PATIENTS, EXPR_FOLDS = 1536, 50, 10, 5
MIL_BAGS, MIL_TILES, MIL_D, MIL_SITES, MIL_EPOCHS = 100, 2000, 1536, 20, 1
RET_N, RET_D = 65536, 128
#: N of the one-direction vs both-directions case (``HESCAPE_BENCH_DIRECTIONS_N``; 32,768 on a busy machine).
RET_N_DIRECTIONS = int(os.environ.get("HESCAPE_BENCH_DIRECTIONS_N", "65536"))
DIRECTIONS_ROUNDS = int(os.environ.get("HESCAPE_BENCH_DIRECTIONS_ROUNDS", "2"))
_OUT = Path(__file__).parent / "out"
_RESULTS: dict[str, dict] = {}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------------------------------------------------------
# Workloads (built and run inside the subprocess)
# ---------------------------------------------------------------------------------------------------------------

def _expression_job():
    from hescape.eval.expression import expression_probe

    rng = np.random.default_rng(0)
    n = EXPR_N
    x = rng.standard_normal((n, EXPR_D), dtype=np.float32)
    w = rng.standard_normal((EXPR_D, EXPR_GENES), dtype=np.float32) / np.sqrt(EXPR_D)
    rate = np.exp(np.clip(x @ w, -3, 3)).astype(np.float64)
    counts = rng.poisson(rate).astype(np.float32)
    genes = [f"G{i}" for i in range(EXPR_GENES)]
    patients = np.repeat(np.arange(EXPR_PATIENTS), -(-n // EXPR_PATIENTS))[:n].astype(str)

    def call():
        return expression_probe(x, counts, genes, patients, n_splits=EXPR_FOLDS, seed=1)

    def info(res):
        return {"n": n, "d": EXPR_D, "genes": EXPR_GENES, "folds": EXPR_FOLDS, "summary": str(res.summary())[:400]}

    return call, info


def _mil_job():
    import torch
    from hescape.eval.mil import cross_validate_mil

    torch.set_num_threads(_cores())
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], MIL_BAGS // 2)
    sites = np.repeat(np.arange(MIL_SITES), MIL_BAGS // MIL_SITES)  # 5 slides per site, both labels in each
    bags = []
    for y in labels:
        b = rng.standard_normal((MIL_TILES, MIL_D), dtype=np.float32)
        b[:, :8] += 0.3 * y
        bags.append(b)

    def call():
        return cross_validate_mil(bags, labels, sites, epochs=MIL_EPOCHS, seed=0)

    def info(res):
        return {"bags": MIL_BAGS, "tiles": MIL_TILES, "d": MIL_D, "epochs": MIL_EPOCHS, "threads": torch.get_num_threads(),
                "summary": str(res.summary())[:400]}

    return call, info


def _expression_warmup():
    from hescape.eval.expression import expression_probe

    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 16), dtype=np.float32)
    counts = rng.poisson(1.0, (60, 4)).astype(np.float32)
    expression_probe(x, counts, ["a", "b", "c", "d"], np.repeat(np.arange(3), 20).astype(str), n_splits=3,
                     n_components=8, n_genes=4)


def _mil_warmup():
    from hescape.eval.mil import cross_validate_mil

    rng = np.random.default_rng(1)
    bags = [rng.standard_normal((4, 16), dtype=np.float32) for _ in range(10)]
    cross_validate_mil(bags, np.tile([0, 1], 5), np.arange(10), epochs=1, model_kwargs={"heads": 2, "dim_head": 8})


_JOBS = {"expression": _expression_job, "mil": _mil_job}
_WARMUP = {"expression": _expression_warmup, "mil": _mil_warmup}


def _in_pkg(filename: str, pkg: str) -> bool:
    return f"{os.sep}{pkg}{os.sep}" in filename


def _label(func) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    return f"{'/'.join(parts[-2:])}:{line}({name})"


def _outside_sklearn(stats: pstats.Stats, wall: float) -> dict:
    raw = stats.stats  # func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    inside = 0.0  # calls from hescape code into scikit-learn (none call back into hescape with alpha="hest")
    for func, (_, _, _, _, callers) in raw.items():
        if _in_pkg(func[0], "sklearn"):
            inside += sum(edge[3] for caller, edge in callers.items() if _in_pkg(caller[0], "hescape"))
    entries: dict[str, float] = {}
    for func, (_, _, tt, _, callers) in raw.items():
        if _in_pkg(func[0], "hescape"):
            entries[f"{_label(func)} [own]"] = entries.get(f"{_label(func)} [own]", 0.0) + tt
        elif not _in_pkg(func[0], "sklearn"):
            for caller, edge in callers.items():
                if _in_pkg(caller[0], "hescape"):
                    entries[_label(func)] = entries.get(_label(func), 0.0) + edge[3]
    top = sorted(entries.items(), key=lambda kv: -kv[1])[:8]
    return {"inside_s": inside, "outside_s": wall - inside, "outside_share": (wall - inside) / wall,
            "top_outside": [[k, round(v, 3)] for k, v in top]}


def _is_torch(func) -> bool:
    filename, _, name = func
    return _in_pkg(filename, "torch") or (filename == "~" and "torch" in name)


def _outside_torch(stats: pstats.Stats, wall: float) -> dict:
    raw = stats.stats
    inside = sum(v[2] for f, v in raw.items() if _is_torch(f))
    outside = sorted(((f, v[2]) for f, v in raw.items() if not _is_torch(f)), key=lambda kv: -kv[1])[:8]
    return {"inside_s": inside, "outside_s": wall - inside, "outside_share": (wall - inside) / wall,
            "top_outside": [[_label(f), round(t, 3)] for f, t in outside]}


def run_job(name: str, profile: bool) -> dict:
    """Build the inputs of ``name``, run the call once; time + peak memory, or a cProfile breakdown."""
    call, info = _JOBS[name]()
    _WARMUP[name]()  # the lazy imports (scikit-learn, torch.optim, ...) happen here, outside the measurement
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    res = call()
    if prof is not None:
        prof.disable()
    wall = time.perf_counter() - t0
    out = {"job": name, "wall_s": wall, "profiled": profile, **info(res)}
    if profile:
        stats = pstats.Stats(prof)
        out.update(_outside_sklearn(stats, wall) if name == "expression" else _outside_torch(stats, wall))
    else:
        peak = _rss_kib("VmHWM")
        out.update(peak_mib=peak / 1024, base_mib=base / 1024,
                   extra_mib=(peak - base) / 1024 if reset else float("nan"), hwm_reset=reset)
    return out


def _subprocess(name: str, profile: bool) -> dict:
    cmd = [sys.executable, __file__, "--job", name] + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        msg = f"{name} subprocess failed:\n{proc.stderr[-3000:]}"
        raise AssertionError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Tests (pytest side)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def _enabled(benchmark):
    if benchmark.disabled:
        pytest.skip("heavy benchmark: run with --benchmark-enable")

@pytest.mark.usefixtures("_enabled")
@pytest.mark.parametrize("name", ["expression", "mil"])
def test_job(benchmark, name):
    timed = _subprocess(name, profile=False)
    prof = _subprocess(name, profile=True)
    _RESULTS[name] = {"timed": timed, "profile": prof}
    benchmark.extra_info.update(wall_s=timed["wall_s"], peak_mib=timed["peak_mib"],
                                outside_share=prof["outside_share"])
    # pytest-benchmark needs one timed call: record the (cheap) JSON parse so the table lists the case.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

@pytest.mark.usefixtures("_enabled")
def test_retrieval_both_vs_faiss(benchmark):
    import hescape.eval as E
    import torch

    faiss = pytest.importorskip("faiss", reason="faiss is not installed (dev dependency faiss-cpu)")
    torch.set_num_threads(_cores())
    faiss.omp_set_num_threads(_cores())
    gen = torch.Generator().manual_seed(RET_N)
    q = torch.nn.functional.normalize(torch.randn(RET_N, RET_D, generator=gen), dim=1).contiguous()
    g = torch.nn.functional.normalize(q + 0.7 * torch.randn(RET_N, RET_D, generator=gen), dim=1).contiguous()

    t0 = time.perf_counter()
    fwd, rev = E.compute_ranks_both(q, g)
    t_fused = time.perf_counter() - t0

    def both_faiss():
        out = []
        for a, b in ((q, g), (g, q)):
            index = faiss.IndexFlatIP(RET_D)
            index.add(b.numpy())
            out.append(index.search(a.numpy(), 10)[1])
        return out

    t0 = time.perf_counter()
    idx = benchmark.pedantic(both_faiss, rounds=1, iterations=1, warmup_rounds=0)
    t_faiss = time.perf_counter() - t0
    arange = np.arange(RET_N)[:, None]
    r10 = [float((fwd.ranks < 10).double().mean()), float((rev.ranks < 10).double().mean())]
    f10 = [float((i == arange).any(axis=1).mean()) for i in idx]
    _RESULTS["retrieval"] = {"n": RET_N, "d": RET_D, "fused_s": t_fused, "backend": fwd.backend,
                             "fused": bool(fwd.fused), "faiss_both_s": t_faiss, "recall10": r10,
                             "faiss_recall10": f10, "threads": torch.get_num_threads()}
    benchmark.extra_info.update(_RESULTS["retrieval"])
    assert abs(r10[0] - f10[0]) < 1e-3 and abs(r10[1] - f10[1]) < 1e-3, (r10, f10)

@pytest.mark.usefixtures("_enabled")
def test_retrieval_one_vs_both_directions(benchmark):
    """Both directions from one pass vs one direction, fused C++ kernel, same process, same data, interleaved."""
    import hescape.eval as E
    import torch

    if not E.has_cpp_ext():
        pytest.skip("the C++ extension is not built")
    n = RET_N_DIRECTIONS
    torch.set_num_threads(_cores())
    gen = torch.Generator().manual_seed(n)
    q = torch.nn.functional.normalize(torch.randn(n, RET_D, generator=gen), dim=1).contiguous()
    g = torch.nn.functional.normalize(q + 0.7 * torch.randn(n, RET_D, generator=gen), dim=1).contiguous()
    E.compute_ranks_both(q[:2048], g[:2048])  # warm-up: the kernel's first call (page faults, thread pool)
    load_before = os.getloadavg()
    one, both, one_cpu, both_cpu, fwd, rev, ref = [], [], [], [], None, None, None
    for _ in range(DIRECTIONS_ROUNDS):  # interleaved, so a change in machine load hits both alike
        t0, c0 = time.perf_counter(), time.process_time()
        ref = E.compute_ranks(q, g)
        one.append(time.perf_counter() - t0)
        one_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        fwd, rev = E.compute_ranks_both(q, g)
        both.append(time.perf_counter() - t0)
        both_cpu.append(time.process_time() - c0)
    load_after = os.getloadavg()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert fwd.fused and torch.equal(fwd.ranks, ref.ranks)
    _, small_rev = E.compute_ranks_both(q[:4096], g[:4096])  # gene→image on a subset (the full one: tests)
    assert rev.fused and torch.equal(small_rev.ranks, E.compute_ranks(g[:4096], q[:4096]).ranks)
    _RESULTS["directions"] = {"n": n, "d": RET_D, "backend": fwd.backend, "threads": torch.get_num_threads(),
                              "one_s": one, "both_s": both, "ratio_min": min(both) / min(one),
                              "one_cpu_s": one_cpu, "both_cpu_s": both_cpu,
                              "ratio_cpu_min": min(both_cpu) / min(one_cpu),
                              "ratio_median": float(np.median(both) / np.median(one)),
                              "loadavg_before": load_before, "loadavg_after": load_after}
    benchmark.extra_info.update(_RESULTS["directions"])


def test_zz_summary():
    if not _RESULTS:
        pytest.skip("nothing measured (run with --benchmark-enable)")
    head = f"{_cpu_model()}, {_cores()} cores"
    lines = [f"hescape-eval speed, {head}"]
    for name in ("expression", "mil"):
        if name not in _RESULTS:
            continue
        t, p = _RESULTS[name]["timed"], _RESULTS[name]["profile"]
        size = (f"{t['n']} spots x {t['d']}-d x {t['genes']} genes, {t['folds']} folds" if name == "expression"
                else f"{t['bags']} bags x {t['tiles']} tiles x {t['d']}-d, {t['epochs']} epoch, "
                     f"{t['threads']} threads; 10 epochs ~ {10 * t['wall_s']:.0f} s (10x)")
        peer = "scikit-learn" if name == "expression" else "torch"
        lines.append(f"  {name}: {size}: {t['wall_s']:.1f} s, peak RSS {t['peak_mib']:.0f} MiB "
                     f"(+{t['extra_mib']:.0f} MiB over inputs {t['base_mib']:.0f} MiB); outside {peer} "
                     f"{100 * p['outside_share']:.1f}% of {p['wall_s']:.1f} s profiled")
        lines.extend(f"      {s:8.3f} s  {k}" for k, s in p["top_outside"])
    if "directions" in _RESULTS:
        r = _RESULTS["directions"]
        lines.append(f"  directions N={r['n']} d={r['d']} ({r['backend']}, {r['threads']} threads): one direction "
                     f"{', '.join(f'{t:.2f}' for t in r['one_s'])} s; both (one pass) "
                     f"{', '.join(f'{t:.2f}' for t in r['both_s'])} s -> both/one {r['ratio_min']:.2f}x (best of "
                     f"each), {r['ratio_median']:.2f}x (median); CPU time both/one {r['ratio_cpu_min']:.2f}x (best "
                     f"of each); load average "
                     f"{r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}")
    if "retrieval" in _RESULTS:
        r = _RESULTS["retrieval"]
        lines.append(f"  retrieval N={r['n']} d={r['d']}: compute_ranks_both ({r['backend']}, fused={r['fused']}) "
                     f"{r['fused_s']:.2f} s vs faiss IndexFlatIP top-10 x2 {r['faiss_both_s']:.2f} s -> "
                     f"{r['faiss_both_s'] / r['fused_s']:.2f}x; R@10 i2g/g2i {r['recall10'][0]:.4f}/"
                     f"{r['recall10'][1]:.4f} vs faiss {r['faiss_recall10'][0]:.4f}/{r['faiss_recall10'][1]:.4f}")
    SUMMARY.extend(lines)
    print("\n".join(lines))
    _OUT.mkdir(exist_ok=True)
    (_OUT / "bench_eval.json").write_text(json.dumps({"cpu": _cpu_model(), "cores": _cores(), **_RESULTS},
                                                     indent=1, default=str))


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--job":
    print(json.dumps(run_job(sys.argv[2], profile="--profile" in sys.argv[3:]), default=str))
