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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import DatasetFormatError, PanelMismatchError

__all__ = ["SCHEMA_VERSION", "HF_FEATURES", "SpotRecords", "DatasetWriter", "read_manifest", "verify_dataset",
           "open_shard", "string_column", "gexp_matrix", "index_arrow_shards", "write_manifest",
           "pyarrow_dataset"]

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
    meta: dict = field(default_factory=dict)  # extra keys of this sample's manifest entry (e.g. source_um_per_px)


#: Hugging Face ``datasets`` feature types of our columns (written as the ``huggingface`` schema metadata, so
#: ``datasets.Dataset.from_file(shard)`` decodes ``image`` as an Image and ``gexp`` as a float32 sequence).
#: The ``Sequence`` spelling is read by datasets 2.x-3.x and, as ``List``, by 4.x and later.
HF_FEATURES = {
    "name": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "gexp": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
    "cell_coords": {"feature": {"dtype": "float64", "_type": "Value"}, "length": 2, "_type": "Sequence"},
    "source": {"dtype": "string", "_type": "Value"},
    "tissue": {"dtype": "string", "_type": "Value"},
    "donor": {"dtype": "string", "_type": "Value"},
    "n_cells": {"dtype": "int32", "_type": "Value"},
}


def encode_png(patch: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 patch as PNG bytes (lossless, fast compression) for the ``image`` column."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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
            "huggingface": json.dumps({"info": {"features": HF_FEATURES}}),
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

    @property
    def samples(self) -> list[dict]:
        """The sample table written so far (name, donor, tissue, source, split, n_spots)."""
        return list(self._samples)

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
        self._samples.append({**rec.meta, "name": rec.name, "donor": rec.donor, "tissue": rec.tissue,
                              "source": rec.source, "split": split, "n_spots": n})
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
    """Memory-map one shard as a table (zero copy); clear error if truncated or corrupt.

    Reads the Arrow IPC stream format (ours and Hugging Face's) and the IPC file format (``ARROW1`` magic).
    """
    try:
        src = pa.memory_map(str(path))
        if src.read(6) == b"ARROW1":
            src.seek(0)
            table = pa.ipc.open_file(src).read_all()
        else:
            src.seek(0)
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


def _class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``column`` from the Hugging Face schema metadata, if it is one."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feats = json.loads(meta)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    f = feats.get(column) if isinstance(feats, dict) else None
    if isinstance(f, dict) and f.get("_type") == "ClassLabel":
        return list(f.get("names", []))
    return None


def string_column(table: pa.Table, column: str) -> np.ndarray:
    """A column as an object array of str; ``ClassLabel`` integers (official HESCAPE layout) become their names."""
    col = table.column(column)
    if pa.types.is_integer(col.type):
        names = _class_names(table.schema, column)
        codes = col.to_numpy(zero_copy_only=False)
        if names is None:
            return codes.astype(str).astype(object)
        return np.asarray(names, dtype=object)[codes]
    return col.to_numpy(zero_copy_only=False)


def gexp_matrix(column: pa.ChunkedArray | pa.Array, n_genes: int) -> np.ndarray:
    """The ``gexp`` column as a ``(rows, n_genes)`` float32 view/array.

    Accepts our layout (``list<float>``, one list of ``n_genes`` per row) and the official HESCAPE layout
    (``list<list<float>>`` of shape ``(1, n_genes)`` per row).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    flat = column
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()
    values = flat.to_numpy(zero_copy_only=False)
    if values.size != len(column) * n_genes:
        msg = (f"gexp column: expected {n_genes} values per row ({len(column)} rows), found {values.size} values in "
               f"all; the dataset's gene list does not match its gexp width")
        raise PanelMismatchError(msg)
    return values.astype(np.float32, copy=False).reshape(len(column), n_genes)


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Replace ``path/manifest.json`` atomically (a temporary file in the same directory, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=path)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path / MANIFEST)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def index_arrow_shards(path: str | os.PathLike, *, genes: list[str], gene_ids: list[str] | None = None,
                       split: str = "train", donor_column: str | None = "donor", overwrite: bool = False) -> dict:
    """Write a ``manifest.json`` for a directory of Arrow shards that lacks one (e.g. the official HESCAPE files).

    Every ``*.arrow`` file (IPC stream or file format) becomes a shard; it must have ``name``, ``image`` and
    ``gexp`` columns (``gexp`` as ``list<float>`` or the official ``(1, G)`` ``list<list<float>>``, ``name`` as
    strings or a ``ClassLabel``). ``genes`` is the gene order of ``gexp`` (the official files do not store it:
    take it from the config's ``nicheformer_reference.h5ad``). Donors come from ``donor_column`` when present,
    else each sample is its own donor. All samples go to ``split``; use ``hescape-data split`` afterwards.
    The shards themselves are not modified. Returns the manifest.
    """
    path = Path(path)
    if (path / MANIFEST).exists() and not overwrite:
        msg = f"{path} already has a {MANIFEST}; pass overwrite=True to re-index it"
        raise FileExistsError(msg)
    files = sorted(p for p in path.glob("*.arrow") if p.is_file())
    if not files:
        msg = f"{path}: expected Arrow shards (*.arrow), found none"
        raise DatasetFormatError(msg)
    samples: dict[str, dict] = {}
    shards = []
    for f in files:
        t = open_shard(f)
        missing = {"name", "image", "gexp"} - set(t.column_names)
        if missing:
            msg = f"shard {f}: expected columns name, image and gexp, missing {sorted(missing)}"
            raise DatasetFormatError(msg)
        gexp_matrix(t.column("gexp"), len(genes))
        names = string_column(t, "name")
        donors = string_column(t, donor_column) if donor_column and donor_column in t.column_names else names
        tissue = string_column(t, "tissue") if "tissue" in t.column_names else np.full(len(names), "unknown", object)
        source = string_column(t, "source") if "source" in t.column_names else np.full(len(names), "unknown", object)
        for n, d, ti, so in zip(names, donors, tissue, source, strict=True):
            s = samples.get(n)
            if s is None:
                samples[n] = {"name": str(n), "donor": str(d), "tissue": str(ti), "source": str(so), "split": split,
                              "n_spots": 1}
            else:
                if s["donor"] != str(d):
                    msg = (f"sample {n} has rows of donors {s['donor']!r} and {d!r}; expected one donor per sample: "
                           f"fix the {donor_column!r} column")
                    raise DatasetFormatError(msg)
                s["n_spots"] += 1
        shards.append({"file": f.name, "rows": t.num_rows, "sha256": _sha256(f)})
    manifest = {"schema_version": SCHEMA_VERSION, "genes": list(genes),
                "gene_ids": list(gene_ids) if gene_ids is not None else [""] * len(genes),
                "n_rows": sum(s["rows"] for s in shards), "samples": list(samples.values()), "shards": shards,
                "indexed_from": "existing shards"}
    write_manifest(path, manifest)
    return manifest


def pyarrow_dataset(path: str | os.PathLike):
    """All shards of a dataset as one zero-copy :class:`pyarrow.dataset.Dataset` (memory-mapped tables).

    ``pyarrow.dataset.dataset(dir, format="ipc")`` reads only the IPC *file* format, while the shards use
    the IPC *stream* format, which Hugging Face ``datasets`` requires; this builds the equivalent dataset.
    """
    import pyarrow.dataset as pads

    path = Path(path)
    manifest = read_manifest(path)
    tables = [open_shard(path / s["file"], s["rows"]) for s in manifest["shards"]]
    return pads.dataset(tables)
