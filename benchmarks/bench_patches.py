"""Patch cutting speed end to end: one synthetic Xenium sample built into a dataset, before and after (issue 9).

Run: ``uv run pytest benchmarks/bench_patches.py --benchmark-enable -q -p no:cacheprovider -s`` (about 2 minutes on
2 cores: the bundle takes ~30 s to write). Skipped under the default ``--benchmark-disable``.

The sample: a ``BENCH_SIZE_UM`` square synthetic section (``small_bundle_config``, cells at 0.5 µm/px) written by
:func:`~hescape.data.xenium_bundle.write_xenium_bundle` in the real file formats, its H&E a JPEG-tiled (256 px)
pyramidal OME-TIFF at 0.2738 µm/px rotated 23° against the morphology frame. It is built with
:func:`~hescape.data.ingest.build_xenium_dataset` (``hescape`` geometry: 55 µm hexagons 47.6 µm apart, 224 px
patches of 112 µm at 0.5 µm/px, read from level 0 and low-passed; QC figure off): read the bundle, pool the cells,
cut the patches, encode them as PNG, write the shards. patches/s = rows written / wall time of the whole build.

* ``before``: the builder with the path it had before issue 9, kept here as :func:`_one_at_a_time`: every patch
  reads (decoding every JPEG tile it touches) and low-passes its own region (:func:`extract_patches`), and the PNG
  is encoded in the calling thread.
* ``after-1``: block by block, each tile decoded once, one region low-pass per block (:func:`iter_patches`), one
  thread; ``after``: the same with :func:`~hescape.data.patches.default_workers` threads (the default).

Each build writes its own dataset; the three datasets' rows are checked to be byte-identical. CPU time
(``time.process_time``, all threads) is reported next to wall time: on a shared machine other users' load
lowers patches/s but hardly the CPU time per patch. A cProfile run of ``after-1`` splits the time into tile
decoding, low-pass, resampling and PNG encoding, and ``encode_png`` is timed at zlib levels 0, 1 and 6
on the sample's own patches (size and time per patch). The summary lines carry the CPU model, the cores this
process may use and the load average at the start; ``benchmarks/out/bench_patches.json`` holds the figures.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

import numpy as np
import pytest

try:
    from .conftest import SUMMARY
except ImportError:  # run as a plain module
    SUMMARY: list[str] = []

BENCH_SIZE_UM = float(os.environ.get("HESCAPE_BENCH_PATCH_SIZE_UM", "1200"))
HE_UM_PER_PX, TILE = 0.2738, 256
_OUT = Path(__file__).parent / "out"
_RES: dict[str, dict] = {}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _one_at_a_time(image, um_to_px, centers_um, *, fov_um=112.0, target_um_per_px=0.5, fill=255, transform=None,
                   **_ignored):
    """The path before issue 9: :func:`extract_patches` in input order, ``transform`` in the calling thread."""
    from hescape.data.patches import extract_patches

    for i, p in enumerate(extract_patches(image, um_to_px, centers_um, fov_um=fov_um,
                                          target_um_per_px=target_um_per_px, fill=fill)):
        yield i, (p if transform is None else transform(p))


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory):
    from hescape.data.xenium_bundle import XeniumBundleOptions, small_bundle_config, write_xenium_bundle

    cfg = request.config
    if cfg.getoption("benchmark_disable") and not cfg.getoption("benchmark_enable"):  # pytest-benchmark's rule
        pytest.skip("benchmark: run with --benchmark-enable")
    t0 = time.perf_counter()
    out = write_xenium_bundle(tmp_path_factory.mktemp("bench") / "bundle",
                              small_bundle_config(BENCH_SIZE_UM, pixel_size_um=0.5),
                              XeniumBundleOptions(he_compression="jpeg", he_tile=TILE, he_um_per_px=HE_UM_PER_PX))
    _RES["bundle"] = {"write_s": time.perf_counter() - t0, "size_um": BENCH_SIZE_UM}
    return out


@pytest.fixture
def _enabled(benchmark):
    if benchmark.disabled:
        pytest.skip("benchmark: run with --benchmark-enable")


def _build(bundle: Path, out: Path, case: str, monkeypatch):
    from hescape.data import ingest, patches
    from hescape.data.ingest import build_xenium_dataset

    with monkeypatch.context() as m:
        if case == "before":
            m.setattr(ingest, "iter_patches", _one_at_a_time)
        elif case == "after-1":
            m.setattr(patches, "default_workers", lambda: 1)
        t0, c0 = time.perf_counter(), time.process_time()
        build_xenium_dataset(bundle, out, progress=False, qc=False)
        return time.perf_counter() - t0, time.process_time() - c0


def _images(out: Path) -> list[bytes]:
    from hescape.data.arrow import pyarrow_dataset

    return [r["bytes"] for r in pyarrow_dataset(out).to_table().column("image").to_pylist()]


@pytest.mark.usefixtures("_enabled")
def test_patches_per_second(benchmark, bundle, tmp_path, monkeypatch):
    from hescape.data.patches import default_workers

    load = os.getloadavg()
    for case in ("before", "after-1", "after"):
        wall, cpu = _build(bundle, tmp_path / case, case, monkeypatch)
        n = len(_images(tmp_path / case))
        _RES[case] = {"spots": n, "wall_s": wall, "cpu_s": cpu, "patches_per_s": n / wall,
                      "cpu_ms_per_patch": 1e3 * cpu / n, "threads": 1 if case != "after" else default_workers()}
    ref = _images(tmp_path / "before")
    assert _images(tmp_path / "after-1") == ref and _images(tmp_path / "after") == ref  # byte-identical rows
    _RES["machine"] = {"cpu": _cpu_model(), "cores": _cores(), "loadavg_start": load}
    benchmark.extra_info.update({k: _RES[k] for k in ("before", "after-1", "after")})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the builds above are the measurement


def _profile_shares(bundle: Path, out: Path, monkeypatch) -> dict:
    """Shares of the ``after-1`` build's time in tile decoding, low-pass, resampling and PNG encoding."""
    prof = cProfile.Profile()
    with monkeypatch.context() as m:
        from hescape.data import patches
        from hescape.data.ingest import build_xenium_dataset

        m.setattr(patches, "default_workers", lambda: 1)
        prof.enable()
        build_xenium_dataset(bundle, out, progress=False, qc=False)
        prof.disable()
    st = pstats.Stats(prof).stats
    total = max(v[3] for v in st.values())  # the build's cumulative time

    def tottime(pred) -> float:
        return sum(v[2] for k, v in st.items() if pred(k))

    parts = {"jpeg_decode": tottime(lambda k: "jpeg" in k[2] and "decode" in k[2]),
             "low_pass": tottime(lambda k: "correlate1d" in k[2]),
             "resample": tottime(lambda k: "geometric_transform" in k[2]),
             "png_encode": tottime(lambda k: k[2] == "<method 'encode' of 'ImagingEncoder' objects>")}
    return {"total_s": total, **{k: v / total for k, v in parts.items()}}


@pytest.mark.usefixtures("_enabled")
def test_png_encode(benchmark, bundle, tmp_path, monkeypatch):
    from hescape.data.geometry import get_geometry
    from hescape.data.patches import iter_patches
    from hescape.data.readers.xenium import read_xenium
    from PIL import Image

    _RES["profile_after_1"] = _profile_shares(bundle, tmp_path / "prof", monkeypatch)
    s = read_xenium(bundle)
    try:
        geo = get_geometry("hescape")
        centres = np.random.default_rng(0).uniform(s.xy_um.min(0) + 60, s.xy_um.max(0) - 60, (64, 2))
        pats = [p for _, p in iter_patches(s.image, s.um_to_px, centres, fov_um=geo.fov_um,
                                           target_um_per_px=geo.um_per_px)]
    finally:
        s.close()
    res = {}
    for level in (0, 1, 6):
        def enc(p, level=level):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="PNG", compress_level=level)
            return buf.getvalue()

        best = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            sizes = [len(enc(p)) for p in pats]
            best = min(best, time.process_time() - c0)
        res[f"level{level}"] = {"cpu_ms_per_patch": 1e3 * best / len(pats), "kb_per_patch": np.mean(sizes) / 1e3}
    _RES["png"] = res
    benchmark.extra_info.update(res)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_zz_summary():
    if "after" not in _RES:
        pytest.skip("nothing measured (run with --benchmark-enable)")
    mach = _RES["machine"]
    lines = [f"hescape-data patch cutting, {mach['cpu']}, {mach['cores']} cores, load average at start "
             f"{mach['loadavg_start'][0]:.1f} (shared machine: wall-time figures vary with other users' load)"]
    b = _RES["before"]
    for case in ("before", "after-1", "after"):
        r = _RES[case]
        lines.append(f"  {case:8s} {r['spots']} spots: {r['patches_per_s']:6.1f} patches/s end to end "
                     f"({r['wall_s']:.1f} s wall, {r['cpu_ms_per_patch']:.1f} ms CPU per patch, {r['threads']} "
                     f"thread(s)); {b['wall_s'] / r['wall_s']:.2f}x wall, {b['cpu_s'] / r['cpu_s']:.2f}x CPU vs before")
    if "profile_after_1" in _RES:
        p = _RES["profile_after_1"]
        lines.append("  after-1 profile: " + ", ".join(f"{k} {v:.0%}" for k, v in p.items() if k != "total_s")
                     + f" of {p['total_s']:.1f} s")
    if "png" in _RES:
        lines.append("  encode_png (PIL, 224 px): " + ", ".join(
            f"zlib {k[5:]} {v['cpu_ms_per_patch']:.2f} ms / {v['kb_per_patch']:.0f} kB" for k, v in _RES["png"].items()))
    SUMMARY.extend(lines)
    _OUT.mkdir(exist_ok=True)
    (_OUT / "bench_patches.json").write_text(json.dumps(_RES, indent=1, default=float))
    print("\n".join(lines))
