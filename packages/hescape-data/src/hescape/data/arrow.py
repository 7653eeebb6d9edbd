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
only after the last shard and the manifest are complete; a replaced dataset is renamed aside first and
deleted last, so ``<out>`` is never half-written. An output that is, contains or lies inside an input, or an
existing folder that is not a HESCAPE dataset, is refused before anything is written
(:func:`check_output_location`). Opening a dataset checks the manifest's structure and each shard's size and
``gexp`` width cheaply (:func:`read_manifest`); :func:`verify_dataset` reads everything and checks SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import DatasetFormatError, HescapeDataError, PanelMismatchError, brief
from .outputs import (
    MANIFEST,
    _interrupted_hint,
    check_output_location,
    clean_stale_siblings,
    dir_mode,
    file_mode,
    fsync_path,
    safe_filename,
    temp_sibling,
)

__all__ = ["SCHEMA_VERSION", "HF_FEATURES", "SPLITS", "SpotRecords", "DatasetWriter", "read_manifest",
           "check_shards", "verify_dataset", "zero_gene_columns", "check_output_location", "clean_stale_siblings",
           "safe_filename", "temp_sibling", "open_shard", "string_column", "gexp_matrix", "index_arrow_shards",
           "write_manifest", "pyarrow_dataset"]

SCHEMA_VERSION = "hescape-arrow/1"


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
    spot_ids: list[str] | None = None  # each row's identity in the source (barcode, grid id, HEST spot, row index)


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
    "spot_id": {"dtype": "string", "_type": "Value"},
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
            ("spot_id", pa.string()),
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


#: Split names a sample may be assigned to.
SPLITS = ("train", "val", "test")


class DatasetWriter:
    """Write samples into a sharded dataset directory, atomically.

    Use as a context manager; the directory appears only when the ``with`` block exits cleanly::

        with DatasetWriter(out, genes=..., gene_ids=..., inputs=[bundle]) as w:
            w.add(records, split="train")
            qc_png = w.file_path("qc", "sample.png")  # extra files go in before the rename

    Everything is written to a hidden sibling ``.<out>.tmp-<pid>-<host>-<random>``; on a clean exit it is moved
    to ``out`` by ``rename``. With ``overwrite`` an existing dataset is replaced with no moment where ``out``
    is half-written: the old one is renamed aside, the new one renamed in, then the old one deleted. Before
    anything is written, :func:`check_output_location` refuses an ``out`` that is, contains or lies inside one
    of ``inputs``, and an existing ``out`` that is neither a HESCAPE dataset nor empty. Leftovers of killed
    builds of the same ``out`` are cleaned on entry (:func:`clean_stale_siblings`). Directories and files get
    the modes the umask gives (a lab group can read a dataset when the umask lets it).

    Parameters
    ----------
    out_dir
        The dataset directory to create (or replace, with ``overwrite``).
    genes, gene_ids
        The gene panel of the ``gexp`` column (unique names).
    rows_per_shard
        Rows per shard file (at least 1).
    overwrite
        Replace an existing HESCAPE dataset (or empty directory) at ``out_dir``.
    extra
        Extra top-level keys of ``manifest.json``.
    inputs
        The files and folders the dataset is built from; ``out_dir`` may not be, contain or lie inside one.
    """

    def __init__(self, out_dir: str | os.PathLike, *, genes: list[str], gene_ids: list[str],
                 rows_per_shard: int = 2048, overwrite: bool = False, extra: dict | None = None,
                 inputs: Iterable[str | os.PathLike | None] = ()):
        if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, (int, np.integer)) or rows_per_shard < 1:
            msg = f"rows per shard: expected a whole number >= 1, found {rows_per_shard!r}; pass e.g. 2048"
            raise HescapeDataError(msg)
        if len(genes) != len(set(genes)):
            dup = sorted({g for g in genes if genes.count(g) > 1})
            msg = f"gene names must be unique; found duplicates {dup[:10]}; deduplicate the panel first"
            raise DatasetFormatError(msg)
        self.inputs = [i for i in inputs if i is not None]
        self.overwrite = overwrite
        self.out_dir = check_output_location(out_dir, overwrite=overwrite, inputs=self.inputs)
        self.genes, self.gene_ids = list(genes), list(gene_ids)
        self.schema = _schema(self.genes, self.gene_ids)
        self.rows_per_shard = int(rows_per_shard)
        self.extra = extra or {}
        self._samples: list[dict] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._shard_files: list[str] = []
        self._tmp: Path | None = None
        self._made_parents: list[Path] = []

    @property
    def samples(self) -> list[dict]:
        """The sample table written so far (name, donor, tissue, source, split, n_spots)."""
        return list(self._samples)

    @property
    def tmp_dir(self) -> Path:
        """The temporary directory being written (inside the ``with`` block only); it becomes ``out_dir``."""
        if self._tmp is None:
            msg = "DatasetWriter.tmp_dir is only available inside the `with` block"
            raise RuntimeError(msg)
        return self._tmp

    def file_path(self, *parts: str) -> Path:
        """Path of an extra file (e.g. ``file_path("qc", name + ".png")``) inside the temporary directory.

        Each part is made a safe file name (:func:`safe_filename`), so names taken from inputs cannot lead
        outside the dataset; parent folders are created. The file moves with the dataset on the final rename,
        so a failure while writing it leaves nothing behind. ``manifest.json`` and ``shard-*`` are reserved.
        """
        if not parts:
            msg = "file_path: expected at least one path part"
            raise ValueError(msg)
        clean = [safe_filename(p, default="file") for p in parts]
        if clean[0] == MANIFEST or clean[0].startswith("shard-"):
            msg = f"file_path: {clean[0]!r} is reserved for the dataset's own files; choose another name"
            raise ValueError(msg)
        path = self.tmp_dir.joinpath(*clean)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def __enter__(self) -> DatasetWriter:
        self._made_parents = [p for p in reversed(self.out_dir.parents) if not p.exists()]
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            for p in self._made_parents:
                os.chmod(p, dir_mode())
            clean_stale_siblings(self.out_dir)
            # the location may have changed since __init__ (another process; a restored interrupted replace)
            check_output_location(self.out_dir, overwrite=self.overwrite, inputs=self.inputs)
            self._tmp = temp_sibling(self.out_dir, "tmp")
        except BaseException:
            self._remove_made_parents()
            raise
        return self

    def _remove_made_parents(self) -> None:
        for p in reversed(self._made_parents):  # the parents this writer created, deepest first, if still empty
            try:
                p.rmdir()
            except OSError:
                break

    def add(self, rec: SpotRecords, *, split: str) -> None:
        """Append the spots of one sample, assigned to ``split`` (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            msg = f"sample {rec.name}: expected a split among {list(SPLITS)}, found {split!r}; use lower case"
            raise HescapeDataError(msg)
        if self._tmp is None:
            msg = "DatasetWriter.add must be called inside the `with` block"
            raise RuntimeError(msg)
        g = rec.gexp
        if g.ndim != 2 or g.shape[1] != len(self.genes):
            msg = f"sample {rec.name}: expected gexp of shape (spots, {len(self.genes)}), found {g.shape}"
            raise PanelMismatchError(msg)
        if not np.isfinite(g).all() or (g < 0).any():
            msg = f"sample {rec.name}: gene counts must be finite and >= 0; found NaN/inf or negative values"
            raise DatasetFormatError(msg)
        if any(s["name"] == rec.name for s in self._samples):
            msg = f"sample {rec.name}: expected unique sample names in a dataset, found it twice; rename one"
            raise DatasetFormatError(msg)
        n = g.shape[0]
        if not (len(rec.images) == n == len(rec.coords_um) == len(rec.n_cells)):
            msg = f"sample {rec.name}: images, gexp, coords and n_cells must have one row per spot"
            raise DatasetFormatError(msg)
        spot_ids = [str(i) for i in range(n)] if rec.spot_ids is None else [str(s) for s in rec.spot_ids]
        if len(spot_ids) != n or len(set(spot_ids)) != n:
            msg = (f"sample {rec.name}: expected one unique spot id per spot ({n}), found {len(spot_ids)} ids, "
                   f"{len(set(spot_ids))} distinct; give each row its source identity (barcode, grid id, row index)")
            raise DatasetFormatError(msg)
        gexp = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * g.shape[1], g.shape[1]), pa.int32()),
                                        pa.array(g.astype(np.float32).ravel()))
        coords = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(rec.coords_um, np.float64).ravel()), 2)
        image = pa.StructArray.from_arrays(
            [pa.array(rec.images, pa.binary()), pa.array([f"{safe_filename(rec.name)}_{i}.png" for i in range(n)])],
            names=["bytes", "path"])
        batch = pa.RecordBatch.from_arrays(
            [pa.array([rec.name] * n), image, gexp, coords, pa.array([rec.source] * n), pa.array([rec.tissue] * n),
             pa.array([rec.donor] * n), pa.array(np.asarray(rec.n_cells, np.int32)), pa.array(spot_ids, pa.string())],
            schema=self.schema)
        self._samples.append({**rec.meta, "name": rec.name, "donor": rec.donor, "tissue": rec.tissue,
                              "source": rec.source, "split": split, "n_spots": n})
        self._pending.append(batch)
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n_rows: int | None = None) -> None:
        if not self._pending or self._pending_rows == 0:
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

    def _finish(self) -> None:
        self._flush()
        n = len(self._shard_files)
        if n == 0:
            msg = f"dataset {self.out_dir}: expected at least one spot to write, found none; nothing was written"
            raise DatasetFormatError(msg)
        shards = []
        for i, old in enumerate(self._shard_files):
            new = f"shard-{i:05d}-of-{n:05d}.arrow"
            os.replace(self._tmp / old, self._tmp / new)
            with pa.memory_map(str(self._tmp / new)) as src:
                rows = pa.ipc.open_stream(src).read_all().num_rows
            fsync_path(self._tmp / new)
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
        with open(self._tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        # replace with no gap: the old dataset is renamed aside, the new one renamed in, then the old one deleted
        old_aside = None
        if os.path.lexists(self.out_dir):
            check_output_location(self.out_dir, overwrite=self.overwrite, inputs=self.inputs)
            old_aside = temp_sibling(self.out_dir, "old")
            os.replace(self.out_dir, old_aside)  # onto the empty placeholder directory
        try:
            os.replace(self._tmp, self.out_dir)
        except BaseException:
            if old_aside is not None:
                os.replace(old_aside, self.out_dir)
            raise
        self._tmp = None
        fsync_path(self.out_dir.parent)
        if old_aside is not None:
            shutil.rmtree(old_aside, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
                self._remove_made_parents()


def _bad(mf: Path, what: str) -> DatasetFormatError:
    return DatasetFormatError(f"{mf}: {what}; the manifest is damaged or was edited by hand: rebuild the dataset")


def _check_manifest(manifest: object, mf: Path) -> dict:
    """Structural checks of a parsed manifest: required keys, types, and that its counts agree with each other."""
    if not isinstance(manifest, dict):
        raise _bad(mf, f"expected a JSON object, found a JSON {type(manifest).__name__}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        msg = (f"{mf}: expected schema_version {SCHEMA_VERSION!r}, found {manifest.get('schema_version')!r}; "
               "rebuild the dataset with this version of hescape-data")
        raise DatasetFormatError(msg)
    missing = [k for k in ("genes", "n_rows", "samples", "shards") if k not in manifest]
    if missing:
        raise _bad(mf, f"expected the keys genes, n_rows, samples and shards, missing {missing}")
    genes = manifest["genes"]
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise _bad(mf, f"expected 'genes' to be a non-empty list of gene names, found {str(genes)[:60]}")
    if len(set(genes)) != len(genes):
        raise _bad(mf, f"expected unique gene names, found {len(genes) - len(set(genes))} duplicates")
    gene_ids = manifest.get("gene_ids", [""] * len(genes))
    if not isinstance(gene_ids, list) or len(gene_ids) != len(genes):
        raise _bad(mf, f"expected 'gene_ids' to list one id per gene ({len(genes)}), found {str(gene_ids)[:60]}")
    n_rows = manifest["n_rows"]
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise _bad(mf, f"expected 'n_rows' to be a whole number >= 0, found {n_rows!r}")
    samples, shards = manifest["samples"], manifest["shards"]
    if not isinstance(samples, list) or not samples:
        raise _bad(mf, f"expected 'samples' to be a non-empty list, found {str(samples)[:60]}")
    for s in samples:
        ok = isinstance(s, dict) and all(isinstance(s.get(k), str) for k in ("name", "donor", "split")) \
            and isinstance(s.get("n_spots"), int) and not isinstance(s.get("n_spots"), bool) and s["n_spots"] >= 0
        if not ok:
            raise _bad(mf, "expected every sample to have string name, donor and split and a whole n_spots, "
                           f"found {str(s)[:80]}")
    names = [s["name"] for s in samples]
    if len(set(names)) != len(names):
        raise _bad(mf, f"expected unique sample names, found {sorted({n for n in names if names.count(n) > 1})[:5]} "
                       "more than once")
    if not isinstance(shards, list) or not shards:
        raise _bad(mf, f"expected 'shards' to list at least one shard file, found {str(shards)[:60]}")
    for s in shards:
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int) \
            and not isinstance(s.get("rows"), bool) and s["rows"] >= 0
        if not ok:
            raise _bad(mf, f"expected every shard to have a string 'file' and a whole 'rows', found {str(s)[:80]}")
        if s["file"] != Path(s["file"]).name or s["file"] in ("", ".", "..") or "\\" in s["file"]:
            raise _bad(mf, f"expected shard files to be plain file names inside the dataset, found {s['file']!r}")
    total = sum(s["rows"] for s in shards)
    if total != n_rows:
        raise _bad(mf, f"n_rows says {n_rows} rows, its shards list {total}")
    spots = sum(s["n_spots"] for s in samples)
    if spots != n_rows:
        raise _bad(mf, f"n_rows says {n_rows} rows, its samples' n_spots add up to {spots}")
    return manifest


def _gexp_width(path: Path) -> int | None:
    """Values in the first row's ``gexp`` of a shard (None: no rows), reading only its schema and first batch."""
    with pa.memory_map(str(path)) as src:
        if src.read(6) == b"ARROW1":
            src.seek(0)
            reader = pa.ipc.open_file(src)
            schema = reader.schema
            batch = reader.get_batch(0) if reader.num_record_batches else None
        else:
            src.seek(0)
            reader = pa.ipc.open_stream(src)
            schema = reader.schema
            try:
                batch = reader.read_next_batch()
                while batch.num_rows == 0:
                    batch = reader.read_next_batch()
            except StopIteration:
                batch = None
        missing = {"name", "image", "gexp"} - set(schema.names)
        if missing:
            msg = f"shard {path}: expected columns name, image and gexp, missing {sorted(missing)}; rebuild the dataset"
            raise DatasetFormatError(msg)
        if batch is None or batch.num_rows == 0:
            return None
        col = batch.column(schema.get_field_index("gexp")).slice(0, 1)
        while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            col = col.flatten()
        return len(col)


def check_shards(path: str | os.PathLike, manifest: dict) -> None:
    """Cheap checks of a dataset's shards against its manifest (no full read, no checksum).

    Every shard file exists and is not empty, has the ``name``/``image``/``gexp`` columns, and its first row's
    ``gexp`` holds one value per manifest gene; a shard the manifest says has rows has at least one batch.
    """
    path = Path(path)
    n_genes = len(manifest["genes"])
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            msg = f"shard {f} listed in the manifest is missing; the dataset is incomplete: rebuild it"
            raise DatasetFormatError(msg)
        if f.stat().st_size == 0:
            msg = f"shard {f} is empty (0 bytes); the dataset is truncated: rebuild it"
            raise DatasetFormatError(msg)
        try:
            width = _gexp_width(f)
        except (OSError, pa.ArrowInvalid, IndexError) as e:
            msg = f"shard {f} cannot be read ({brief(e, 200)}); it is missing, truncated or corrupt: rebuild the dataset"
            raise DatasetFormatError(msg) from None
        if width is None and s["rows"] > 0:
            msg = f"shard {f}: manifest says {s['rows']} rows, found none; rebuild the dataset"
            raise DatasetFormatError(msg)
        if width is not None and width != n_genes:
            msg = (f"shard {f}: expected {n_genes} gexp values per row (one per manifest gene), found {width}; the "
                   "manifest's gene list does not match the shards: rebuild the dataset")
            raise PanelMismatchError(msg)


def read_manifest(path: str | os.PathLike, *, check: bool = True) -> dict:
    """Read and check a dataset's ``manifest.json``.

    Parameters
    ----------
    path
        The dataset directory.
    check
        Also run the cheap shard checks of :func:`check_shards` (files present and non-empty, ``gexp`` width
        equal to the number of genes). The manifest itself is always checked: required keys and types, shard
        rows adding up to ``n_rows``, samples' ``n_spots`` adding up to ``n_rows``.

    Raises
    ------
    DatasetFormatError, PanelMismatchError
        One line saying what is wrong and that the dataset should be rebuilt.
    """
    path = Path(path)
    if not path.is_dir():
        msg = (f"dataset directory {path} does not exist; build one with `hescape-train` (the default dataset) "
               f"or point data.path at a directory that holds manifest.json{_interrupted_hint(path)}")
        raise DatasetFormatError(msg)
    mf = path / MANIFEST
    if not mf.is_file():
        msg = (f"{path} has no {MANIFEST}: it is not a HESCAPE dataset, or it was not written completely"
               f"{_interrupted_hint(path)}")
        raise DatasetFormatError(msg)
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        msg = f"{mf} is not valid JSON ({type(e).__name__}: {brief(e, 80)}); rebuild the dataset"
        raise DatasetFormatError(msg) from None
    except OSError as e:
        msg = f"{mf} cannot be read ({brief(e, 200)}); check its permissions"
        raise DatasetFormatError(msg) from None
    manifest = _check_manifest(manifest, mf)
    if check:
        check_shards(path, manifest)
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
        msg = f"shard {path} cannot be read ({brief(e, 200)}); it is missing, truncated or corrupt: rebuild the dataset"
        raise DatasetFormatError(msg) from None
    if expected_rows is not None and table.num_rows != expected_rows:
        msg = f"shard {path}: manifest says {expected_rows} rows, found {table.num_rows}; rebuild the dataset"
        raise DatasetFormatError(msg)
    return table


def verify_dataset(path: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Check every shard against the manifest; returns the manifest.

    On top of :func:`read_manifest`'s checks, every shard is read in full: its row count, every row's ``gexp``
    length (one value per gene), finite non-negative counts, and rows per sample equal to the manifest's
    ``n_spots``; with ``checksums`` (default) also each shard's SHA-256.
    """
    import pyarrow.compute as pc

    path = Path(path)
    manifest = read_manifest(path, check=False)
    n_genes = len(manifest["genes"])
    if checksums:
        for s in manifest["shards"]:
            f = path / s["file"]
            if not f.is_file():
                msg = f"shard {f} listed in the manifest is missing; the dataset is incomplete: rebuild it"
                raise DatasetFormatError(msg)
            if not isinstance(s.get("sha256"), str):
                msg = f"shard {f}: the manifest holds no SHA-256 to check it against; rebuild the dataset"
                raise DatasetFormatError(msg)
            if _sha256(f) != s["sha256"]:
                msg = f"shard {f} does not match its SHA-256 in the manifest: it is corrupt; rebuild the dataset"
                raise DatasetFormatError(msg)
    check_shards(path, manifest)
    rows_of: Counter = Counter()
    for s in manifest["shards"]:
        f = path / s["file"]
        t = open_shard(f, s["rows"])
        col = t.column("gexp")
        if pa.types.is_list(col.type) and not pa.types.is_list(col.type.value_type) and t.num_rows:
            lengths = pc.list_value_length(col)
            if pc.min(lengths).as_py() != n_genes or pc.max(lengths).as_py() != n_genes:
                msg = (f"shard {f}: expected {n_genes} gexp values in every row (one per gene), found rows of "
                       f"{pc.min(lengths).as_py()} to {pc.max(lengths).as_py()}; rebuild the dataset")
                raise PanelMismatchError(msg)
        g = gexp_matrix(col, n_genes)
        if not np.isfinite(g).all() or (g < 0).any():
            msg = f"shard {f}: expected finite counts >= 0, found NaN/inf or negative values; rebuild the dataset"
            raise DatasetFormatError(msg)
        rows_of.update(string_column(t, "name").tolist())
    want = {s["name"]: s["n_spots"] for s in manifest["samples"]}
    got = {str(k): v for k, v in rows_of.items()}
    if got != {k: v for k, v in want.items() if v}:
        bad = sorted(set(got) ^ {k for k, v in want.items() if v}) or \
            sorted(k for k in got if got[k] != want.get(k))
        msg = (f"{path}: expected the shards to hold each manifest sample's n_spots rows, found a mismatch for "
               f"{bad[:5]}; rebuild the dataset")
        raise DatasetFormatError(msg)
    return manifest


def zero_gene_columns(path: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """The genes whose ``gexp`` column is zero in every row of the dataset (e.g. zero-filled panel genes)."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    n_genes = len(manifest["genes"])
    total = np.zeros(n_genes, dtype=np.float64)
    for s in manifest["shards"]:
        total += np.abs(gexp_matrix(open_shard(path / s["file"], s["rows"]).column("gexp"), n_genes)).sum(0)
    return [g for g, v in zip(manifest["genes"], total, strict=True) if v == 0]


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
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the manifest is as readable as the shards
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
