"""GPU check of the exact Recall@k kernel, for a CUDA machine without network access.

Run from the repository root:  ``python benchmarks/gpu/gpu_recall.py``  (``OUT`` names the output folder;
default ``benchmarks/out``). Steps, each recorded in ``$OUT/gpu_recall.json``:

1. build ``hescape.eval._C`` with ``HESCAPE_CUDA=ON``: ``uv sync --offline`` when uv and its cache are there,
   else a plain CMake build of ``packages/hescape-eval`` (needs cmake, nvcc, and pybind11 importable),
   installed in-tree under ``packages/hescape-eval/src`` and put first on ``PYTHONPATH``;
2. the ``gpu``-marked recall tests (``pytest -m gpu``), plus exactness checks against the C++ kernel (one
   direction, and both directions from ``compute_ranks_both``'s fused pass);
3. timings of the CUDA kernel at N in {100k, 1M}, d = 128 (fp32 and bf16; labels at 100k), and of the
   torch fallback on the GPU at 100k, with GFLOP/s (2 N^2 d per pass); both directions fused vs one direction
   vs two calls at each N.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "packages" / "hescape-eval"
OUT = Path(os.environ.get("OUT", ROOT / "benchmarks" / "out"))
REPORT: dict = {"steps": {}}


def _sh(cmd: list[str], env: dict | None = None, timeout: int = 900) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def _save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_recall.json").write_text(json.dumps(REPORT, indent=2))


def build() -> list[str]:
    """Returns the python command that sees the CUDA build."""
    env = dict(os.environ, HESCAPE_CUDA="ON")
    if shutil.which("uv") and (ROOT / "uv.lock").exists():
        rc, log = _sh(["uv", "sync", "--offline", "--reinstall-package", "hescape-eval"], env=env)
        REPORT["steps"]["uv_sync"] = {"rc": rc, "log": log}
        if rc == 0:
            return ["uv", "run", "--offline", "--no-sync", "python"]
    import pybind11  # noqa: PLC0415  (only the fallback needs it)

    bdir = ROOT / "build" / "gpu_recall"
    cfg = ["cmake", "-S", str(PKG), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DHESCAPE_CUDA=ON",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    for name, cmd in (("cmake_configure", cfg), ("cmake_build", ["cmake", "--build", str(bdir), "-j"])):
        rc, log = _sh(cmd)
        REPORT["steps"][name] = {"rc": rc, "log": log}
        if rc != 0:
            _save()
            msg = f"{name} failed; see {OUT / 'gpu_recall.json'}"
            raise SystemExit(msg)
    for so in glob.glob(str(bdir / "_C*.so")):
        shutil.copy(so, PKG / "src" / "hescape" / "eval")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PKG / "src"), os.environ.get("PYTHONPATH", "")])
    return [sys.executable]


_BENCH = r"""
import json, time, torch, numpy as np
import hescape.eval as E
from hescape.eval import _backend
assert _backend.has_cuda_ext(), "extension built without CUDA"
out = {"device": torch.cuda.get_device_name(), "backends": E.available_backends(), "runs": []}
# exactness: CUDA == C++ on quantised data with ties (exact scores), and labels
g = torch.Generator().manual_seed(0)
q = torch.randint(-8, 9, (20011, 96), generator=g).float() / 8
gal = torch.where(torch.rand(20011, 96, generator=g) < 0.6, q, torch.randint(-8, 9, (20011, 96), generator=g).float() / 8)
gal[5000:6000] = gal[:1000]
lab = torch.randint(0, 50, (20011,), generator=g)
for pos in (None, lab):
    a = E.compute_ranks(q.cuda(), gal.cuda(), positives=pos, backend="cuda").ranks.cpu()
    b = E.compute_ranks(q, gal, positives=pos, backend="cpp").ranks
    out.setdefault("exact_vs_cpp", []).append(bool(torch.equal(a, b)))
    fwd, rev = E.compute_ranks_both(q.cuda(), gal.cuda(), positives=None if pos is None else pos.cuda(), backend="cuda")
    cf, cr = E.compute_ranks_both(q, gal, positives=pos, backend="cpp")
    out.setdefault("fused_exact_vs_cpp", []).append(bool(torch.equal(fwd.ranks.cpu(), cf.ranks)
                                                         and torch.equal(rev.ranks.cpu(), cr.ranks) and fwd.fused))
def timed(fn, reps):
    fn(); torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); r = fn(); torch.cuda.synchronize(); best = min(best, time.perf_counter() - t)
    return best, r
d = 128
for n in (100_000, 1_000_000):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1)
    y = torch.nn.functional.normalize(x + 0.7 * torch.randn(n, d, device="cuda", generator=gen), dim=1)
    cases = [("cuda", torch.float32, None), ("cuda", torch.bfloat16, None)]
    if n <= 100_000:
        cases += [("cuda", torch.float32, "labels"), ("torch", torch.float32, None)]
    for backend, dt, pos in cases:
        labels = torch.randint(0, 1000, (n,), device="cuda") if pos else None
        sec, r = timed(lambda: E.compute_ranks(x.to(dt), y.to(dt), positives=labels, backend=backend), 3 if n <= 100_000 else 1)
        passes = 2 if pos else 1
        out["runs"].append({"n": n, "d": d, "backend": r.backend, "dtype": str(dt), "positives": pos or "diagonal",
                            "seconds": sec, "gflops": passes * 2 * n * n * d / sec / 1e9,
                            "recall@10": float((r.ranks < 10).double().mean())})
        print(out["runs"][-1], flush=True)
    # both directions: one fused call vs two one-direction calls (target: fused <= 1.1x one direction)
    reps = 3 if n <= 100_000 else 1
    one, _ = timed(lambda: E.compute_ranks(x, y, backend="cuda"), reps)
    two, _ = timed(lambda: (E.compute_ranks(x, y, backend="cuda"), E.compute_ranks(y, x, backend="cuda")), reps)
    both, (f, r) = timed(lambda: E.compute_ranks_both(x, y, backend="cuda"), reps)
    out.setdefault("directions", []).append({"n": n, "d": d, "one_s": one, "two_calls_s": two, "fused_s": both,
                                             "fused_over_one": both / one, "fused": f.fused})
    print(out["directions"][-1], flush=True)
print("JSON" + json.dumps(out))
"""


def main() -> None:
    t0 = time.time()
    py = build()
    env = dict(os.environ)
    rc, log = _sh([*py, "-m", "pytest", "packages/hescape-eval/tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                  env=env)
    REPORT["steps"]["pytest_gpu"] = {"rc": rc, "log": log}
    _save()
    rc, log = _sh([*py, "-c", _BENCH], env=env, timeout=1800)
    REPORT["steps"]["bench"] = {"rc": rc, "log": log}
    for line in log.splitlines():
        if line.startswith("JSON"):
            REPORT["bench"] = json.loads(line[4:])
    REPORT["wall_s"] = time.time() - t0
    _save()
    print(json.dumps({k: v for k, v in REPORT.items() if k != "steps"}, indent=2))
    print({k: v["rc"] for k, v in REPORT["steps"].items()})
    sys.exit(0 if all(v["rc"] == 0 for v in REPORT["steps"].values() if v is not REPORT["steps"].get("uv_sync"))
             else 1)


if __name__ == "__main__":
    main()
