"""CPU benchmarks of hescape-data: pseudo-spot pooling, patch extraction, dataset read throughput.

Run: ``uv run pytest benchmarks/bench_data.py --benchmark-enable`` (not collected by the default run; ~2-3 min).

* **pool**: 500,000 cells × 5,001 genes (~200 non-zeros per cell, scipy CSR, ~0.8 GB) pooled into 55 µm
  pseudo-spots on a 100 µm hex grid (``get_geometry("visium")``). ``hescape`` = ``SpotGeometry.assign`` +
  :func:`pool_counts`; ``pandas`` = the exploded long table (cell, gene, count) merged with the (spot, cell)
  pairs, then ``groupby([spot, gene]).sum()``. Both start from the same matrix; the pandas path reuses our
  cell→spot pairs, so it is timed on pooling only. Peak memory = rise of the process's resident high-water
  mark (``VmHWM``, reset through ``/proc/self/clear_refs``) during the call, against the CSR input's size.
  Targets: < 20 s, ≤ 2× input.
* **patches**: 224-px patches (112 µm at 0.5 µm/px) from a 20,000 × 20,000 px JPEG-tiled pyramidal OME-TIFF
  at 0.2738 µm/px, rotated 23°, through :func:`extract_patches` (patches/s).
* **read**: one epoch over 2,048 rows (224-px PNG, 5,001 genes, 4 shards), ``DataLoader(batch_size=64,
  num_workers=2)``, best of two epochs, of :class:`PairedSpotDataset` vs ``datasets.Dataset.from_file`` on the
  same shards (``with_format("torch")``), in samples/s.
* **samplesheet_jobs**: ``build_from_samplesheet`` over 4 synthetic Xenium bundles (``SS_SIZE_UM`` square sections at
  0.5 µm/px, >= 50,000 cells each, H&E as a JPEG-tiled (256 px) pyramidal OME-TIFF at 0.3638 µm/px rotated 23°,
  written in real file formats by :func:`write_xenium_bundle`), the ``hescape`` geometry (224 px patches), QC figures
  on: ``--jobs 1`` (in this process) then ``--jobs 2`` (two spawned workers), each into its own ``--out`` (no part
  reused). Reports the speed-up (time 1 / time 2), patches/s end to end (spots written / wall time, samplesheet
  read to manifest written), the CPU model and the load average at the start. Skipped unless
  ``--benchmark-enable`` (about 5 minutes on 2 cores: the bundles take about 1 minute to write).

The ratios are printed in the "hescape benchmark summary" section (shared ``conftest.SUMMARY``).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

try:
    from .conftest import SUMMARY
except ImportError:  # run as a plain module
    SUMMARY: list[str] = []

N_CELLS, N_GENES, NNZ_PER_CELL = 500_000, 5_001, 200
CELLS_PER_MM2 = 3_000.0
_RES: dict[str, float] = {}


# ----------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _peak_rise(fn):
    """``(result, seconds, peak RSS rise in bytes)`` of ``fn()``; the rise is NaN where VmHWM cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
    except OSError:
        base = None
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    rise = float("nan") if base is None else (_status_kib("VmHWM") - base) * 1024.0
    return out, dt, rise


# ----------------------------------------------------------------------------------------------- pooling


@pytest.fixture(scope="module")
def cells():
    """Cell centroids (µm) and a canonical CSR count matrix with ~200 distinct genes per cell."""
    rng = np.random.default_rng(0)
    side = np.sqrt(N_CELLS / CELLS_PER_MM2) * 1000.0
    xy = rng.uniform(0, side, (N_CELLS, 2))
    # strictly increasing gene ids per row: cumulative random gaps (mean 24), cut at the panel size
    gaps = rng.integers(1, 48, (N_CELLS, NNZ_PER_CELL), dtype=np.int16)
    cols = np.cumsum(gaps, axis=1, dtype=np.int32) - 1
    del gaps
    keep = cols < N_GENES
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1), dtype=np.int64)])
    indices = cols[keep]
    del cols, keep
    data = rng.integers(1, 6, len(indices)).astype(np.float32)
    counts = sp.csr_matrix((data, indices, indptr), shape=(N_CELLS, N_GENES))
    counts.has_canonical_format = True
    return xy, counts, side


def _nbytes(m: sp.csr_matrix) -> int:
    return m.data.nbytes + m.indices.nbytes + m.indptr.nbytes


def _pandas_pool(assignment: sp.csr_matrix, counts: sp.csr_matrix) -> np.ndarray:
    import pandas as pd

    coo = counts.tocoo()
    long = pd.DataFrame({"cell": coo.row, "gene": coo.col, "count": coo.data})
    del coo
    a = assignment.tocoo()
    pairs = pd.DataFrame({"spot": a.row, "cell": a.col})
    exploded = long.merge(pairs, on="cell", how="inner")
    del long
    pooled = exploded.groupby(["spot", "gene"], sort=False)["count"].sum()
    out = np.zeros(assignment.shape[0:1] + (counts.shape[1],), dtype=np.float32)
    out[pooled.index.get_level_values(0).to_numpy(), pooled.index.get_level_values(1).to_numpy()] = pooled.to_numpy()
    return out


@pytest.mark.parametrize("provider", ["hescape", "pandas"])
def test_pool(benchmark, cells, provider):
    from hescape.data import pool_counts
    from hescape.data.geometry import get_geometry

    xy, counts, side = cells
    geo = get_geometry("visium")  # 55 µm discs on a 100 µm hex lattice
    spots = geo.centres((0, 0, side, side))
    if provider == "hescape":
        def run():
            return pool_counts(geo.assign(xy, spots), counts)
    else:
        assignment = _RES["_assignment"] if "_assignment" in _RES else geo.assign(xy, spots)

        def run():
            return _pandas_pool(assignment, counts)

    out, dt, rise = benchmark.pedantic(lambda: _peak_rise(run), rounds=1, iterations=1)
    _RES[f"pool_{provider}_s"] = dt
    _RES[f"pool_{provider}_mem"] = rise / _nbytes(counts)
    if provider == "hescape":
        _RES["_assignment"] = geo.assign(xy, spots)
        _RES["_pooled"] = out
        _RES["pool_spots"] = out.shape[0]
        _RES["pool_input_gb"] = _nbytes(counts) / 1e9
        assert dt < 60.0  # the target is 20 s; leave room for a loaded machine
    else:
        np.testing.assert_array_equal(out, _RES.pop("_pooled"))  # same spots x genes sums (integer counts)


# ----------------------------------------------------------------------------------------------- patches

SLIDE_PX, SLIDE_UM_PER_PX, TILE = 20_000, 0.2738, 256


def _write_slide(path: Path) -> None:
    """A JPEG-tiled pyramidal OME-TIFF written tile by tile (never the whole image in memory)."""
    import tifffile
    from scipy import ndimage

    rng = np.random.default_rng(1)
    textures = []
    for _ in range(8):  # H&E-like blobs: smooth noise mapped to pink/purple
        f = ndimage.gaussian_filter(rng.random((TILE, TILE)), 6)
        f = (f - f.min()) / (np.ptp(f) + 1e-9)
        rgb = np.stack([230 - 90 * f, 190 - 150 * f, 220 - 60 * f], axis=-1)
        textures.append(np.clip(rgb, 0, 255).astype(np.uint8))

    def tiles(n_px):
        k = -(-n_px // TILE)
        for i in range(k):
            for j in range(k):
                yield textures[(i * 7 + j * 3) % len(textures)]

    sizes = [SLIDE_PX]
    while sizes[-1] > 2 * TILE:
        sizes.append(sizes[-1] // 2)
    kw = {"tile": (TILE, TILE), "compression": "jpeg", "photometric": "rgb", "dtype": np.uint8}
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tw:
        for i, n in enumerate(sizes):
            meta = ({"axes": "YXS", "PhysicalSizeX": SLIDE_UM_PER_PX, "PhysicalSizeY": SLIDE_UM_PER_PX}
                    if i == 0 else None)
            extra = {"subifds": len(sizes) - 1} if i == 0 else {"subfiletype": 1}
            tw.write(tiles(n), shape=(n, n, 3), metadata=meta, **kw, **extra)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    t0 = time.perf_counter()
    _write_slide(path)
    _RES["slide_write_s"] = time.perf_counter() - t0
    return path


def test_patches(benchmark, slide):
    from hescape.data.patches import extract_patches
    from hescape.data.readers.image import open_image

    theta = np.deg2rad(23.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    c = SLIDE_PX / 2
    um_to_px = (np.array([[1, 0, c], [0, 1, c], [0, 0, 1]]) @ rot @ np.diag([1 / SLIDE_UM_PER_PX] * 2 + [1])
                @ np.array([[1, 0, -c * SLIDE_UM_PER_PX], [0, 1, -c * SLIDE_UM_PER_PX], [0, 0, 1]]))
    extent = SLIDE_PX * SLIDE_UM_PER_PX
    centres = np.random.default_rng(2).uniform(0.2 * extent, 0.8 * extent, (300, 2))

    def run():
        with open_image(slide) as img:
            return sum(1 for _ in extract_patches(img, um_to_px, centres, fov_um=112.0, target_um_per_px=0.5))

    n, dt, _ = benchmark.pedantic(lambda: _peak_rise(run), rounds=1, iterations=1)
    assert n == 300
    _RES["patches_per_s"] = n / dt


# ----------------------------------------------------------------------------------------------- dataset read

N_ROWS, IMG_PX = 2048, 224


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hescape.data import DatasetWriter, SpotRecords
    from PIL import Image
    from scipy import ndimage

    rng = np.random.default_rng(3)
    pngs = []
    for _ in range(32):
        f = ndimage.gaussian_filter(rng.random((IMG_PX, IMG_PX, 3)), (3, 3, 0))
        f = ((f - f.min()) / (np.ptp(f) + 1e-9) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="PNG", compress_level=1)
        pngs.append(buf.getvalue())
    genes = [f"G{i}" for i in range(N_GENES)]
    out = tmp_path_factory.mktemp("read") / "ds"
    per_sample = N_ROWS // 8
    with DatasetWriter(out, genes=genes, gene_ids=genes, rows_per_shard=N_ROWS // 4) as w:
        for s in range(8):
            g = rng.poisson(0.5, (per_sample, N_GENES)).astype(np.float32)
            w.add(SpotRecords(name=f"s{s}", donor=f"d{s}", tissue="t", source="bench",
                              images=[pngs[(s * per_sample + i) % len(pngs)] for i in range(per_sample)], gexp=g,
                              coords_um=np.zeros((per_sample, 2)), n_cells=np.ones(per_sample)), split="train")
    return out


def _epoch(ds) -> int:
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2, shuffle=False)
    n = 0
    for batch in loader:
        n += len(batch["gexp"])
    return n


@pytest.mark.parametrize("reader", ["hescape", "hf_datasets"])
def test_read(benchmark, shards, reader):
    if reader == "hescape":
        from hescape.data import PairedSpotDataset

        ds = PairedSpotDataset(shards)
    else:
        datasets = pytest.importorskip("datasets")
        from hescape.data import read_manifest

        files = [str(shards / s["file"]) for s in read_manifest(shards)["shards"]]
        ds = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
        ds = ds.with_format("torch", columns=["image", "gexp"])
    times = []

    def run():
        n, dt, _ = _peak_rise(lambda: _epoch(ds))
        times.append(dt)
        return n

    n = benchmark.pedantic(run, rounds=2, iterations=1)  # best of two epochs: the machine is shared
    assert n == N_ROWS
    _RES[f"read_{reader}_per_s"] = n / min(times)


# ----------------------------------------------------------------------------------------------- samplesheet

SS_SAMPLES, SS_SIZE_UM, SS_MIN_CELLS = 4, 2150.0, 50_000


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


@pytest.fixture
def _enabled(benchmark):
    if benchmark.disabled:
        pytest.skip("heavy benchmark: run with --benchmark-enable")


@pytest.fixture(scope="module")
def ss_bundles(request, tmp_path_factory):
    """4 synthetic Xenium bundles (distinct donors), written two at a time in spawned processes.

    A module fixture is set up before the test's ``_enabled`` check: it skips by itself without --benchmark-enable.
    """
    if request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"):
        pytest.skip("heavy benchmark: run with --benchmark-enable")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow.parquet as pq
    from hescape.data.xenium_bundle import XeniumBundleOptions, small_bundle_config, write_xenium_bundle

    root = tmp_path_factory.mktemp("samplesheet")
    cfg = small_bundle_config(SS_SIZE_UM, pixel_size_um=0.5)
    opts = XeniumBundleOptions(he_compression="jpeg", he_tile=256)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(write_xenium_bundle, root / f"bundle{d}", cfg, opts, donor=d) for d in range(SS_SAMPLES)]
        bundles = [f.result() for f in futs]
    _RES["ss_write_s"] = time.perf_counter() - t0
    cells = [pq.read_metadata(b / "cells.parquet").num_rows for b in bundles]
    assert min(cells) >= SS_MIN_CELLS, cells
    _RES["ss_cells"] = cells
    sheet = root / "samples.csv"
    sheet.write_text("technology,path,sample,donor,tissue,panel,split\n" + "".join(
        f"xenium,{b},S{d},D{d},breast,human-breast-panel,{'train' if d < 2 else 'val' if d == 2 else 'test'}\n"
        for d, b in enumerate(bundles)))
    return sheet


@pytest.mark.usefixtures("_enabled")
def test_samplesheet_jobs(benchmark, ss_bundles):
    from hescape.data import build_from_samplesheet, read_manifest

    sheet = ss_bundles
    _RES["ss_load"] = os.getloadavg()[0]
    times, outs = {}, {}
    for jobs in (1, 2):
        t0 = time.perf_counter()
        res = build_from_samplesheet(sheet, sheet.parent / f"ds_jobs{jobs}", jobs=jobs, progress=False)
        times[jobs] = time.perf_counter() - t0
        assert not res.failed and [s.status for s in res.samples] == ["built"] * SS_SAMPLES
        outs[jobs] = read_manifest(res.out)
    assert [s["sha256"] for s in outs[1]["shards"]] == [s["sha256"] for s in outs[2]["shards"]]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the table lists the case; times are above
    n = outs[1]["n_rows"]
    _RES.update(ss_spots=n, ss_t1=times[1], ss_t2=times[2])
    benchmark.extra_info.update(spots=n, jobs1_s=times[1], jobs2_s=times[2], speedup=times[1] / times[2])


# ----------------------------------------------------------------------------------------------- summary


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    r = _RES
    if "pool_hescape_s" in r:
        line = (f"bench_data pool {N_CELLS:,} cells x {N_GENES:,} genes -> {r['pool_spots']:,} spots "
                f"(input CSR {r['pool_input_gb']:.2f} GB): hescape {r['pool_hescape_s']:.2f} s, peak "
                f"{r['pool_hescape_mem']:.2f}x input")
        if "pool_pandas_s" in r:
            line += (f"; pandas groupby {r['pool_pandas_s']:.2f} s, peak {r['pool_pandas_mem']:.2f}x input; "
                     f"speed-up {r['pool_pandas_s'] / r['pool_hescape_s']:.1f}x")
        SUMMARY.append(line)
    if "patches_per_s" in r:
        SUMMARY.append(f"bench_data patches: {r['patches_per_s']:.1f} patches/s (224 px from a {SLIDE_PX:,}^2 px "
                       f"JPEG-tiled OME-TIFF, written in {r.get('slide_write_s', float('nan')):.1f} s)")
    if "ss_t2" in r:
        SUMMARY.append(
            f"bench_data samplesheet: {SS_SAMPLES} Xenium samples ({min(r['ss_cells']):,}-{max(r['ss_cells']):,} cells, "
            f"JPEG-tiled H&E), {r['ss_spots']:,} patches: --jobs 1 {r['ss_t1']:.1f} s ({r['ss_spots'] / r['ss_t1']:.1f} "
            f"patches/s), --jobs 2 {r['ss_t2']:.1f} s ({r['ss_spots'] / r['ss_t2']:.1f} patches/s); speed-up "
            f"{r['ss_t1'] / r['ss_t2']:.2f}x (target >= 1.7x); {_cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, "
            f"load average {r['ss_load']:.1f} at start (bundles written in {r['ss_write_s']:.0f} s)")
    if "read_hescape_per_s" in r:
        line = f"bench_data read (DataLoader, 2 workers): PairedSpotDataset {r['read_hescape_per_s']:.0f} samples/s"
        if "read_hf_datasets_per_s" in r:
            line += (f", datasets.Dataset.from_file {r['read_hf_datasets_per_s']:.0f} samples/s; ratio "
                     f"{r['read_hescape_per_s'] / r['read_hf_datasets_per_s']:.2f}x")
        SUMMARY.append(line)
