"""Sharded Arrow datasets of paired H&E patches and raw gene counts.

On-disk layout of a dataset directory::

    manifest.json                      schema version, genes, samples (+ split, donor), shards, checksums
    shard-00000-of-00002.arrow         Arrow IPC stream files, one record batch or more each
    shard-00001-of-00002.arrow

Columns follow the official HESCAPE dataset where they overlap: ``name`` (sample id), ``image``
(struct of encoded ``bytes`` and ``path``), ``gexp`` (raw counts, one float32 list per spot),
``cell_coords`` (spot centre, µm, x and y), ``source``, ``tissue``; plus ``donor`` and ``n_cells``.
Gene symbols and Ensembl ids are also kept in the schema metadata.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place
only after the last shard and the manifest are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import DatasetFormatError, PanelMismatchError

__all__ = ["SCHEMA_VERSION", "SpotRecords", "DatasetWriter", "read_manifest", "verify_dataset", "open_shard"]

SCHEMA_VERSION = "hescape-arrow/1"
MANIFEST = "manifest.json"


@dataclass
class SpotRecords:
    """The spots of one sample, ready to write.

    ``images`` are encoded image files (PNG/JPEG bytes), one per spot; ``gexp`` raw counts (spots × genes).
    """

    name: str
    donor: str
    tissue: str
    source: str
    images: list[bytes]
    gexp: np.ndarray
    coords_um: np.ndarray
    n_cells: np.ndarray


def _schema(genes: list[str], gene_ids: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("name", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("gexp", pa.list_(pa.float32())),
            ("cell_coords", pa.list_(pa.float64(), 2)),
            ("source", pa.string()),
            ("tissue", pa.string()),
            ("donor", pa.string()),
            ("n_cells", pa.int32()),
        ],
        metadata={
            "hescape.schema_version": SCHEMA_VERSION,
            "hescape.genes": json.dumps(genes),
            "hescape.gene_ids": json.dumps(gene_ids),
        },
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DatasetWriter:
    """Write samples into a sharded dataset directory, atomically.

    Use as a context manager; the directory appears only when the ``with`` block exits cleanly::

        with DatasetWriter(out, genes=..., gene_ids=...) as w:
            w.add(records, split="train")
    """

    def __init__(self, out_dir: str | os.PathLike, *, genes: list[str], gene_ids: list[str],
                 rows_per_shard: int = 2048, overwrite: bool = False, extra: dict | None = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            msg = f"output directory {self.out_dir} already exists; choose another path or pass overwrite=True"
            raise FileExistsError(msg)
        if len(genes) != len(set(genes)):
            dup = sorted({g for g in genes if genes.count(g) > 1})
            msg = f"gene names must be unique; found duplicates {dup[:10]}; deduplicate the panel first"
            raise DatasetFormatError(msg)
        self.genes, self.gene_ids = list(genes), list(gene_ids)
        self.schema = _schema(self.genes, self.gene_ids)
        self.rows_per_shard = rows_per_shard
        self.extra = extra or {}
        self._samples: list[dict] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._shard_files: list[str] = []
        self._tmp: Path | None = None

    def __enter__(self) -> DatasetWriter:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        return self

    def add(self, rec: SpotRecords, *, split: str) -> None:
        """Append the spots of one sample, assigned to ``split``."""
        g = rec.gexp
        if g.ndim != 2 or g.shape[1] != len(self.genes):
            msg = f"sample {rec.name}: expected gexp of shape (spots, {len(self.genes)}), found {g.shape}"
            raise PanelMismatchError(msg)
        if not np.isfinite(g).all() or (g < 0).any():
            msg = f"sample {rec.name}: gene counts must be finite and >= 0; found NaN/inf or negative values"
            raise DatasetFormatError(msg)
        n = g.shape[0]
        if not (len(rec.images) == n == len(rec.coords_um) == len(rec.n_cells)):
            msg = f"sample {rec.name}: images, gexp, coords and n_cells must have one row per spot"
            raise DatasetFormatError(msg)
        gexp = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * g.shape[1], g.shape[1]), pa.int32()),
                                        pa.array(g.astype(np.float32).ravel()))
        coords = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(rec.coords_um, np.float64).ravel()), 2)
        image = pa.StructArray.from_arrays(
            [pa.array(rec.images, pa.binary()), pa.array([f"{rec.name}_{i}.png" for i in range(n)])],
            names=["bytes", "path"])
        batch = pa.RecordBatch.from_arrays(
            [pa.array([rec.name] * n), image, gexp, coords, pa.array([rec.source] * n), pa.array([rec.tissue] * n),
             pa.array([rec.donor] * n), pa.array(np.asarray(rec.n_cells, np.int32))],
            schema=self.schema)
        self._samples.append({"name": rec.name, "donor": rec.donor, "tissue": rec.tissue, "source": rec.source,
                              "split": split, "n_spots": n})
        self._pending.append(batch)
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n_rows: int | None = None) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        n_rows = table.num_rows if n_rows is None else min(n_rows, table.num_rows)
        head, rest = table.slice(0, n_rows), table.slice(n_rows)
        path = self._tmp / f"shard-{len(self._shard_files):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as w:
            w.write_table(head, max_chunksize=256)
        self._shard_files.append(path.name)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                return
            self._flush()
            n = len(self._shard_files)
            shards = []
            for i, old in enumerate(self._shard_files):
                new = f"shard-{i:05d}-of-{n:05d}.arrow"
                os.replace(self._tmp / old, self._tmp / new)
                with pa.memory_map(str(self._tmp / new)) as src:
                    rows = pa.ipc.open_stream(src).read_all().num_rows
                shards.append({"file": new, "rows": rows, "sha256": _sha256(self._tmp / new)})
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "genes": self.genes,
                "gene_ids": self.gene_ids,
                "n_rows": sum(s["rows"] for s in shards),
                "samples": self._samples,
                "shards": shards,
                **self.extra,
            }
            (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            os.replace(self._tmp, self.out_dir)
            self._tmp = None
        finally:
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check a dataset's ``manifest.json``."""
    path = Path(path)
    if not path.is_dir():
        msg = (f"dataset directory {path} does not exist; build one with `hescape-train` (the default dataset) "
               "or point data.path at a directory that holds manifest.json")
        raise DatasetFormatError(msg)
    mf = path / MANIFEST
    if not mf.is_file():
        msg = f"{path} has no {MANIFEST}: it is not a HESCAPE dataset, or it was not written completely"
        raise DatasetFormatError(msg)
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        msg = f"{mf} is not valid JSON ({e}); rebuild the dataset"
        raise DatasetFormatError(msg) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        msg = (f"{mf}: expected schema_version {SCHEMA_VERSION!r}, found {manifest.get('schema_version')!r}; "
               "rebuild the dataset with this version of hescape-data")
        raise DatasetFormatError(msg)
    return manifest


def open_shard(path: Path, expected_rows: int | None = None) -> pa.Table:
    """Memory-map one shard as a table (zero copy); clear error if truncated or corrupt."""
    try:
        src = pa.memory_map(str(path))
        table = pa.ipc.open_stream(src).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        msg = f"shard {path} cannot be read ({e}); it is missing, truncated or corrupt: rebuild the dataset"
        raise DatasetFormatError(msg) from None
    if expected_rows is not None and table.num_rows != expected_rows:
        msg = f"shard {path}: manifest says {expected_rows} rows, found {table.num_rows}; rebuild the dataset"
        raise DatasetFormatError(msg)
    return table


def verify_dataset(path: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Check every shard against the manifest (existence, rows, SHA-256). Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            msg = f"shard {f} listed in the manifest is missing; rebuild the dataset"
            raise DatasetFormatError(msg)
        if checksums and _sha256(f) != s["sha256"]:
            msg = f"shard {f} does not match its SHA-256 in the manifest: it is corrupt; rebuild the dataset"
            raise DatasetFormatError(msg)
        open_shard(f, s["rows"])
    return manifest


def iter_split_names(manifest: dict, split: str | Iterable[str] | None) -> set[str]:
    """Sample names in the given split(s); all samples when ``split`` is None."""
    if split is None:
        return {s["name"] for s in manifest["samples"]}
    wanted = {split} if isinstance(split, str) else set(split)
    known = {s["split"] for s in manifest["samples"]}
    if not wanted <= known:
        msg = f"unknown split(s) {sorted(wanted - known)}: this dataset has {sorted(known)}"
        raise DatasetFormatError(msg)
    return {s["name"] for s in manifest["samples"] if s["split"] in wanted}
