"""Speed of ``hescape-data import hescape``: rows/s against pyarrow alone reading (and copying) the same shards.

Run: ``uv run pytest benchmarks/bench_import.py --benchmark-enable -q -p no:cacheprovider -s`` (about 1 minute on 2
cores). Skipped under the default ``--benchmark-disable``.

Input: ``IMPORT_ROWS`` rows (``HESCAPE_BENCH_IMPORT_ROWS``, default 2,000) in the official layout
(``tests/test_spatialdata_import.py``: ClassLabel ``name``, Image struct, ``(1, 280)`` ``gexp``, ``cell_coords``, 17
metadata columns), 4 breast-preset samples over 4 parquet shards of 256-row row groups. Patches are 512 px PNGs of
textured noise, about 550 KB each (real 512 px H&E PNGs are a few hundred KB); 16 distinct images are reused, which
changes nothing for a reader that copies bytes (parquet's dictionary encoding is off for the image column, so they
are stored once per row, about 1.1 GB for 2,000 rows). The shards are read from the page cache (written just before), so
"reading" is parquet decoding and memory copies, not the disk.

Three timings, best of two:

* ``read``: pyarrow reads every column of every shard in 256-row batches (``ParquetFile.iter_batches``), nothing else;
* ``copy``: the same batches written to Arrow IPC stream files and fsynced (pyarrow only: the least a durable
  converter must do);
* ``import``: :func:`hescape.data.import_hescape.import_hescape` (``check_images="some"``): per-row gexp and image
  header checks, two images decoded per batch, sharded output with SHA-256, the atomic rename.

``copy`` and ``import`` are alternated (best of two each), so the shared disk and page cache treat them alike. The
summary line gives rows/s of each, ``import / copy`` (close to 1: the import is bound by reading and writing bytes),
and the seconds the import spends in its own per-batch work (gexp reshaping and count checks, image header checks
and decodes, metadata), i.e. everything but reading the shards and writing, hashing and syncing its own.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

try:
    from .conftest import SUMMARY
except ImportError:  # run as a plain module
    SUMMARY: list[str] = []

IMPORT_ROWS = int(os.environ.get("HESCAPE_BENCH_IMPORT_ROWS", "2000"))
PANEL = "human-breast-panel"
SAMPLES = ["TENX95", "TENX94", "NCBI785", "NCBI783"]
META = ["atlas", "age", "diagnosis", "cancer", "oncotree_code", "tumor_grade", "gender", "race", "treatment_type",
        "therapeutic_agents", "tumor_tissue_type", "assay", "preservation_method", "stain", "spaceranger", "species",
        "cytassist"]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(120, 230, (64, 64, 3)).astype(np.uint8)
    arr = np.kron(base, np.ones((8, 8, 1), np.uint8)) + rng.integers(0, 24, (512, 512, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hescape.data import load_panel

    root = tmp_path_factory.mktemp("hub") / PANEL
    root.mkdir()
    g = load_panel(PANEL).n_genes
    images = [_png(i) for i in range(16)]
    rng = np.random.default_rng(0)
    feats = {"name": {"names": SAMPLES, "_type": "ClassLabel"}, "image": {"_type": "Image"},
             "gexp": {"shape": [1, g], "dtype": "float32", "_type": "Array2D"},
             "tissue": {"names": ["breast"], "_type": "ClassLabel"}}
    schema = pa.schema([("name", pa.int64()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("gexp", pa.list_(pa.list_(pa.float32()))), ("cell_coords", pa.list_(pa.float64())),
                        ("source", pa.string()), ("tissue", pa.int64()), *[(c, pa.string()) for c in META]],
                       metadata={"huggingface": json.dumps({"info": {"features": feats}})})
    per_shard = -(-IMPORT_ROWS // 4)
    start = 0
    for k in range(4):
        n = min(per_shard, IMPORT_ROWS - start)
        codes = np.repeat(np.arange(len(SAMPLES)), -(-IMPORT_ROWS // len(SAMPLES)))[start:start + n]
        gexp = rng.poisson(1.0, (n, g)).astype(np.float32)
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * g, g), pa.int32()), pa.array(gexp.ravel()))
        cols = [pa.array(codes, pa.int64()),
                pa.StructArray.from_arrays([pa.array([images[(start + i) % 16] for i in range(n)], pa.binary()),
                                            pa.array([None] * n, pa.string())], names=["bytes", "path"]),
                pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()), inner),
                pa.FixedSizeListArray.from_arrays(pa.array(rng.uniform(0, 9000, 2 * n)), 2).cast(pa.list_(pa.float64())),
                pa.array(["xenium"] * n), pa.array(np.zeros(n, np.int64)), *[pa.array([c] * n) for c in META]]
        pq.write_table(pa.Table.from_arrays(cols, schema=schema), root / f"train-{k:05d}-of-00004.parquet",
                       row_group_size=256, use_dictionary=["name", "source", "tissue", *META])  # no dedup of images
        start += n
    size = sum(f.stat().st_size for f in root.iterdir())
    return root.parent, size


def _timed(fn) -> float:
    os.sync()  # start clean: no dirty pages of the previous case to write back during this one
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_import_rows_per_second(benchmark, shards, tmp_path, monkeypatch):
    if benchmark.disabled:
        pytest.skip("benchmark: run with --benchmark-enable")
    import hescape.data.import_hescape as imp
    from hescape.data.arrow import DatasetWriter

    src, size = shards
    files = sorted(src.rglob("*.parquet"))

    def read():
        for f in files:
            for _b in pq.ParquetFile(f).iter_batches(batch_size=256):
                pass

    def copy():
        out = tmp_path / "copy"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for i, f in enumerate(files):
            pf = pq.ParquetFile(f)
            with pa.OSFile(str(out / f"{i}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pf.schema_arrow) as w:
                for b in pf.iter_batches(batch_size=256):
                    w.write_batch(b)
            fd = os.open(out / f"{i}.arrow", os.O_RDONLY)  # durable, as the import's shards are
            os.fsync(fd)
            os.close(fd)

    # time spent in the import's own per-batch work (checks, conversion), without the shard writes it triggers
    spent = {"batch": 0.0, "flush": 0.0, "in_batch": False}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            spent["in_batch"] |= key == "batch"
            try:
                return fn(*a, **k)
            finally:
                if key == "batch":
                    spent["in_batch"] = False
                if key == "batch" or spent["in_batch"]:
                    spent[key] += time.perf_counter() - t0
        return wrapper

    monkeypatch.setattr(imp, "_write_batch", timed("batch", imp._write_batch))
    monkeypatch.setattr(DatasetWriter, "_flush", timed("flush", DatasetWriter._flush))

    def run():
        imp.import_hescape(src, tmp_path / "ds", panel=PANEL, progress=False, overwrite=True)

    t_read = min(_timed(read) for _ in range(2))
    t_copy, t_import, own = float("inf"), float("inf"), float("nan")
    for _ in range(2):  # alternated: the shared disk and page cache treat both alike
        t_copy = min(t_copy, _timed(copy))
        spent.update(batch=0.0, flush=0.0)
        t = _timed(run)
        if t < t_import:
            t_import, own = t, spent["batch"] - spent["flush"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the case's row in the pytest-benchmark table
    n = IMPORT_ROWS
    line = (f"import hescape: {n} rows ({size / 2**20:.0f} MiB of parquet, 512 px PNG): read {n / t_read:,.0f} rows/s, "
            f"copy (read + write IPC) {n / t_copy:,.0f} rows/s, import {n / t_import:,.0f} rows/s (import / copy = "
            f"{t_copy / t_import:.2f}; the import's own checks and conversion {own:.2f} s of {t_import:.1f} s = "
            f"{n / own:,.0f} rows/s alone) on {_cpu_model()}, {len(os.sched_getaffinity(0))} cores")
    SUMMARY.append(line)
    print(line)
    benchmark.extra_info.update(rows=n, read_rows_s=n / t_read, copy_rows_s=n / t_copy, import_rows_s=n / t_import,
                                own_s=own)
