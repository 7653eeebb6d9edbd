"""CPU benchmark of the fused contrastive losses (tiled torch path) against open_clip: time and peak memory.

Run: ``uv run pytest benchmarks/bench_loss.py --benchmark-enable`` (not collected by the default run).
Providers ``hescape`` (our tiled path) and ``openclip``; mode ``full`` (forward + backward); B ∈ {2048, 8192},
d = 128. Peak memory is the rise of the resident-set high-water mark over the inputs, measured in a fresh
subprocess per (provider, loss, B) with ``/proc/self/clear_refs``. Set ``HESCAPE_BENCH_THREADS`` to pin
``torch.set_num_threads`` (default: torch's default). Results go to ``.benchmarks/bench_loss.csv``.
"""

from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:  # the shared benchmark harness (absent when this file runs as the --peak subprocess script)
    from .conftest import SUMMARY
except ImportError:
    SUMMARY: list[str] = []

SIZES = (2048, 8192)
DIM = 128
KINDS = ("clip", "siglip")
PROVIDERS = ("hescape", "openclip")
_RESULTS: dict[tuple[str, str, int, str], float] = {}  # (metric, kind, B, provider) -> value
_OUT = Path(__file__).resolve().parent.parent / ".benchmarks" / "bench_loss.csv"


def _threads() -> None:
    if os.environ.get("HESCAPE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["HESCAPE_BENCH_THREADS"]))


def make_inputs(b: int, d: int = DIM, device: str = "cpu"):
    gen = torch.Generator().manual_seed(b)
    v = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device).requires_grad_()
    g = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device).requires_grad_()
    s = torch.tensor(14.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return v, g, s, bias


def make_step(provider: str, kind: str):
    """fwd+bwd callable ``step(v, g, s, b)``; the provider's loss module is built once."""
    from hescape.models.losses import create_loss

    loss_fn = create_loss(kind, impl="openclip" if provider == "openclip" else "auto")

    def step(v, g, s, b):
        for t in (v, g, s, b):
            t.grad = None
        loss_fn(v, g, s, b)["contrastive_loss"].backward()

    return step


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_peak(provider: str, kind: str, b: int) -> int:
    """Peak extra resident bytes of one fwd+bwd over the live inputs (run in a fresh process)."""
    _threads()
    step = make_step(provider, kind)
    v, g, s, bias = make_inputs(b)
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    step(v, g, s, bias)
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, (peak - base) * 1024)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_time_full(benchmark, kind, b, provider):
    _threads()
    step = make_step(provider, kind)
    inputs = make_inputs(b)
    benchmark.group = f"{kind}-B{b}-full"
    benchmark.extra_info.update({"provider": provider, "threads": torch.get_num_threads()})
    benchmark.pedantic(step, args=inputs, rounds=3 if b <= 2048 else 2, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _RESULTS[("time_s", kind, b, provider)] = benchmark.stats.stats.min


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_peak_memory_full(kind, b, provider):
    proc = subprocess.run([sys.executable, __file__, "--peak", provider, kind, str(b)], capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        msg = f"peak-memory subprocess failed:\n{proc.stderr[-3000:]}"
        raise AssertionError(msg)
    _RESULTS[("peak_bytes", kind, b, provider)] = float(proc.stdout.split()[-1])


def test_report():
    """Print and save the ratios open_clip / hescape (time: > 1 means we are faster; memory: > 1 means smaller)."""
    rows = []
    for kind in KINDS:
        for b in SIZES:
            row = {"loss": kind, "B": b, "d": DIM, "threads": torch.get_num_threads()}
            for metric in ("time_s", "peak_bytes"):
                ours, ref = _RESULTS.get((metric, kind, b, "hescape")), _RESULTS.get((metric, kind, b, "openclip"))
                row[f"{metric}_hescape"], row[f"{metric}_openclip"] = ours, ref
                row[f"{metric}_ratio"] = (ref / ours) if ours and ref else None
            rows.append(row)
    _OUT.parent.mkdir(exist_ok=True)
    with _OUT.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"loss fwd+bwd on CPU, d={DIM}, {torch.get_num_threads()} threads "
             f"(ratios are open_clip / hescape; CSV: {_OUT})"]
    for r in rows:
        t = (f"time {r['time_s_hescape']:.3f}s vs {r['time_s_openclip']:.3f}s ({r['time_s_ratio']:.2f}x faster)"
             if r["time_s_ratio"] else "time n/a (run with --benchmark-enable)")
        m = (f"peak +{r['peak_bytes_hescape'] / 2**20:.1f} MiB vs +{r['peak_bytes_openclip'] / 2**20:.1f} MiB "
             f"({r['peak_bytes_ratio']:.1f}x less)" if r["peak_bytes_ratio"] else "peak n/a")
        lines.append(f"  {r['loss']:6s} B={r['B']:5d}: {t}; {m}")
    SUMMARY.extend(lines)
    print("\n".join(lines))
    big = [r for r in rows if r["B"] == max(SIZES) and r["peak_bytes_ratio"]]
    if not big:
        pytest.skip("peak-memory measurements did not run")
    for r in big:
        if r["peak_bytes_ratio"] < 20:
            msg = (f"{r['loss']} B={r['B']}: expected >= 20x less peak memory than open_clip, "
                   f"found {r['peak_bytes_ratio']:.1f}x")
            raise AssertionError(msg)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--peak":
    print(measure_peak(sys.argv[2], sys.argv[3], int(sys.argv[4])))
