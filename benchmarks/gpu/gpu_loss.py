"""GPU check of the fused contrastive losses: run the ``gpu`` loss tests, then benchmark vs open_clip.

Run on a CUDA machine (no network needed) from the repository root::

    OUT=/tmp/out uv run python benchmarks/gpu/gpu_loss.py [--sizes 4096 16384 65536] [--skip-tests]

Writes ``$OUT/gpu_loss.json``: the pytest exit code and tail, and per (loss, B, provider) the fwd+bwd time
(CUDA events, median of a few runs), ``torch.cuda.max_memory_allocated`` above the inputs, or ``"OOM"``.
Providers: ``hescape`` (Triton kernels) and ``openclip`` (materialised B×B logits). d = 128, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def run_gpu_tests(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(ROOT / "packages/hescape-models/tests/test_losses_triton.py")]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-6000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc)[-2000:]
    return {"cmd": " ".join(cmd), "returncode": rc, "seconds": round(time.time() - t0, 1), "tail": tail}


def _inputs(b: int, d: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(b)
    v = F.normalize(torch.randn(b, d, device="cuda", generator=gen), dim=-1).to(dtype).requires_grad_()
    g = F.normalize(torch.randn(b, d, device="cuda", generator=gen), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    return v, g, s, bias


def bench_one(kind: str, provider: str, b: int, d: int, dtype: torch.dtype, reps: int) -> dict:
    from hescape.models.losses import create_loss

    loss_fn = create_loss(kind, impl="openclip" if provider == "openclip" else "triton")
    torch.cuda.empty_cache()
    try:
        v, g, s, bias = _inputs(b, d, dtype)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()

        def step():
            for t in (v, g, s, bias):
                t.grad = None
            loss = loss_fn(v, g, s, bias)["contrastive_loss"]
            loss.backward()
            return loss

        loss = step()  # warm-up (Triton compilation) and the memory measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        return {"status": "ok", "loss": float(loss), "time_s": times[len(times) // 2], "peak_bytes": peak}
    except torch.OutOfMemoryError as exc:
        return {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
    finally:
        v = g = s = bias = None  # noqa: F841 - release before the next case
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=240)
    args = ap.parse_args(argv)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__}
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device"
        (out_dir / "gpu_loss.json").write_text(json.dumps(report, indent=2))
        print(report["error"])
        return 1
    if not args.skip_tests:
        report["tests"] = run_gpu_tests(args.test_timeout)
        print(f"gpu tests: rc={report['tests']['returncode']} in {report['tests']['seconds']}s")
    results = []
    for dtype_name in args.dtypes:
        for kind in ("clip", "siglip"):
            for b in args.sizes:
                row = {"loss": kind, "B": b, "d": args.dim, "dtype": dtype_name}
                for provider in ("hescape", "openclip"):
                    row[provider] = bench_one(kind, provider, b, args.dim, getattr(torch, dtype_name), args.reps)
                ours, ref = row["hescape"], row["openclip"]
                if ours["status"] == ref["status"] == "ok":
                    row["speedup"] = ref["time_s"] / ours["time_s"]
                    row["memory_ratio"] = ref["peak_bytes"] / max(ours["peak_bytes"], 1)
                    row["loss_rel_diff"] = abs(ours["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
                results.append(row)
                print(json.dumps(row))
                (out_dir / "gpu_loss.json").write_text(json.dumps({**report, "bench": results}, indent=2))
    report["bench"] = results
    (out_dir / "gpu_loss.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
