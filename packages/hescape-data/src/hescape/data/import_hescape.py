"""Import the official HESCAPE dataset (``hescape-data import hescape DIR --panel PANEL --out OUT``).

The authors publish each panel as a Hugging Face dataset config (``Peng-AI/hescape-pyarrow``; dataset card, and
``peng-lab/hescape`` ``src/hescape/constants.py`` / ``data_modules/image_gexp_dataset.py``). One row is one
image–expression pair with the columns

``name``
    sample id (``ClassLabel``: int64 codes, the names in the ``huggingface`` schema metadata), e.g. ``TENX95``;
``image``
    the patch, a Hugging Face ``Image``: struct ``{bytes, path}`` holding the encoded PNG/JPEG; the authors'
    training centre-crops 512 or 256 px, so patches are at least 512 px;
``gexp``
    raw counts ("data X is always raw"), one ``(1, G)`` row per pair, in the gene order of the panel's
    ``nicheformer_reference.h5ad`` (the vendored :func:`~hescape.data.panels.load_panel` order, converted from it);
``cell_coords``
    the pair's position in the tissue (two numbers; units not stated by the authors: copied as they are);
``source``, ``tissue``
    strings or ``ClassLabel``; and about 16 metadata columns (``atlas``, ``age``, ``diagnosis``, ``cancer``, …).

A directory of the config's parquet shards (as downloaded from the Hub) or Arrow IPC shards (``save_to_disk`` or
the ``datasets`` cache) is read shard by shard with pyarrow, in batches, with no Python loop over rows for the
counts (the nested lists are flattened and reshaped) nor for the images: their bytes are copied as they are (not
re-encoded); PNG sizes are read from the IHDR header of every row with pyarrow compute, other formats by opening
their header, and the first and last image of every batch are decoded in full (every image with
``check_images="all"``). Rows are written through :class:`~hescape.data.arrow.DatasetWriter` (atomic: a failure
leaves nothing).

* ``spot_id`` = the row's index in the official dataset: its position over the shards sorted by path (the order
  in which ``datasets`` concatenates them), counting the rows of every sample, kept or not.
* Splits = the panel's preset (``train.csv`` / ``val.csv`` / ``test.csv`` ids matched against ``name``, as the
  authors' ``_split_indices`` does); donors = the preset's ``patient`` column
  (:func:`~hescape.data.splits.preset_donors`). Samples in no preset split are left out by default (the authors'
  training never reads them), ``unlisted="error"`` refuses them.
* Patch µm/px = the preset's ``pixel_size_um_estimated`` of the sample (the patches are cut at the scan's native
  resolution, 0.14–0.36 µm/px across the presets), or ``um_per_px`` when given; a sample without one gets
  :data:`DEFAULT_UM_PER_PX`, and the manifest says so (``patch_um_per_px_source``).
* ``n_cells`` is -1 (the official dataset does not say).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from .arrow import DatasetWriter, SpotRecords
from .counts import check_counts
from .errors import HescapeDataError, InputFormatError, PanelMismatchError, brief
from .outputs import check_output_location
from .panels import list_panels, load_panel, load_split_preset
from .splits import check_no_donor_leakage, preset_donors, preset_split_assignment

__all__ = ["import_hescape", "find_shards", "DEFAULT_UM_PER_PX", "SPOT_DIAMETER_UM", "CHECK_IMAGES"]

#: µm/px stated for a sample whose preset row gives no ``pixel_size_um_estimated``: 0.2125, the value of the
#: 10x samples (``TENX*``) in every preset and the most common one (paper, supplement 7: "most datasets having pixel
#: sizes around 0.213 µm or 0.274 µm").
DEFAULT_UM_PER_PX = 0.2125
#: Pseudo-spot diameter of the official dataset (paper, supplement 7: "a 10x Visium patch of size 55 µm").
SPOT_DIAMETER_UM = 55.0
#: How many images are decoded in full: ``"some"`` (first and last of every batch) or ``"all"``.
CHECK_IMAGES = ("some", "all")

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_CORE = ("name", "image", "gexp", "cell_coords", "source", "tissue")


class _ChunkedWriter(DatasetWriter):
    """A :class:`DatasetWriter` that takes one sample in several parts (rows of a sample may span shards)."""

    def add_part(self, rec: SpotRecords, *, split: str) -> None:
        prev = next((i for i, s in enumerate(self._samples) if s["name"] == rec.name), None)
        if prev is None:
            self.add(rec, split=split)
            return
        entry = self._samples.pop(prev)
        try:
            self.add(rec, split=split)
        except BaseException:
            self._samples.insert(prev, entry)
            raise
        entry["n_spots"] += self._samples.pop()["n_spots"]
        self._samples.insert(prev, entry)

    def update_sample(self, name: str, **meta) -> None:
        for s in self._samples:
            if s["name"] == name:
                s.update(meta)


def find_shards(src: str | os.PathLike) -> list[Path]:
    """The ``*.parquet`` or ``*.arrow`` files under ``src`` (recursively), sorted by their path relative to it.

    Raises
    ------
    InputFormatError
        No shards, or both kinds (two copies of the data: pass the folder of one).
    """
    src = Path(src)
    if not src.is_dir():
        msg = f"expected a directory of the official HESCAPE shards at {src}, found no such directory"
        raise InputFormatError(msg)
    parquet = sorted(p for p in src.rglob("*.parquet") if p.is_file())
    arrow = sorted(p for p in src.rglob("*.arrow") if p.is_file() and not p.name.startswith("cache-"))
    if parquet and arrow:
        msg = (f"{src}: expected shards of one kind, found {len(parquet)} parquet and {len(arrow)} Arrow files (two "
               "copies of the dataset?); pass the folder that holds one of them")
        raise InputFormatError(msg)
    files = parquet or arrow
    if not files:
        msg = (f"{src}: expected the official HESCAPE shards (*.parquet from the Hub, or *.arrow from save_to_disk), "
               "found none; download a config with huggingface-cli / datasets and pass its folder")
        raise InputFormatError(msg)
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def _hf_features(schema: pa.Schema) -> dict:
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feats = json.loads(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        feats = {}
    return feats if isinstance(feats, dict) else {}


def _class_names(feats: dict, column: str) -> list[str] | None:
    f = feats.get(column)
    if isinstance(f, dict) and f.get("_type") == "ClassLabel":
        return [str(n) for n in f.get("names", [])]
    return None


def _strings(col: pa.Array, names: list[str] | None, where: str) -> np.ndarray:
    """A column as an object array of str; ``ClassLabel`` codes become their names."""
    if pa.types.is_integer(col.type):
        codes = col.to_numpy(zero_copy_only=False)
        if names is None:
            return codes.astype(str).astype(object)
        if len(codes) and (codes.min() < 0 or codes.max() >= len(names)):
            msg = f"{where}: expected ClassLabel codes in [0, {len(names)}), found {codes.min()} to {codes.max()}"
            raise InputFormatError(msg)
        return np.asarray(names, dtype=object)[codes]
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return np.asarray(col.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)


class _Shard:
    """One parquet or Arrow IPC shard: its schema and row count; its file is open only while it is read (a config
    may have hundreds of shards, more than the open-file limit)."""

    def __init__(self, path: Path):
        self.path = path
        self.kind = "parquet" if path.suffix == ".parquet" else "arrow"
        with self._open() as (schema, rows, _read):
            self.schema, self.rows = schema, rows
        missing = [c for c in ("name", "image", "gexp") if c not in self.schema.names]
        if missing:
            msg = (f"shard {path}: expected the official HESCAPE columns name, image and gexp, missing {missing} "
                   f"(found {self.schema.names[:12]}); is this a HESCAPE config?")
            raise InputFormatError(msg)
        self.features = _hf_features(self.schema)

    def _damaged(self, e: Exception) -> InputFormatError:
        return InputFormatError(f"shard {self.path}: expected a readable {self.kind} file, found it damaged "
                                f"({brief(e, 120)}); download it again")

    @contextlib.contextmanager
    def _open(self):
        """``(schema, rows, read)``: ``read(columns, batch_rows)`` iterates record batches while the file is open."""
        try:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                with pq.ParquetFile(self.path) as pf:
                    yield (pf.schema_arrow, pf.metadata.num_rows,
                           lambda cols, n: pf.iter_batches(batch_size=n, columns=cols, use_threads=True))
            else:
                with pa.memory_map(str(self.path)) as src:
                    magic = src.read(6)
                    src.seek(0)
                    table = (pa.ipc.open_file(src) if magic == b"ARROW1" else pa.ipc.open_stream(src)).read_all()
                    yield table.schema, table.num_rows, lambda cols, n: table.select(cols).to_batches(max_chunksize=n)
        except (OSError, pa.ArrowInvalid) as e:
            raise self._damaged(e) from None

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._open() as (_schema, _rows, read):
            try:
                yield from read(columns, batch_rows)
            except (OSError, pa.ArrowInvalid) as e:
                raise self._damaged(e) from None

    def column(self, name: str) -> pa.ChunkedArray:
        chunks = [b.column(name) for b in self.batches([name], 1 << 16)]
        return pa.chunked_array(chunks, type=self.schema.field(name).type)


def _storage(col):
    """An extension-typed column (``datasets``' ``Array2D`` in ``save_to_disk`` shards, when ``datasets`` is
    imported) as its storage array (the nested lists); any other column as it is."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.storage if isinstance(col.type, pa.ExtensionType) else col


def _panel_hint(found: int) -> str:
    same = [p for p in list_panels() if load_panel(p).n_genes == found]
    return f"; panel(s) with {found} genes: {same}" if same else ""


def _gexp_matrix(col: pa.Array, n_genes: int, shard: Path, panel: str) -> np.ndarray:
    """``gexp`` as ``(rows, n_genes)`` float32: ``(1, G)`` nested lists or flat lists, lengths checked per row."""
    def bad(found) -> PanelMismatchError:
        return PanelMismatchError(
            f"shard {shard.name}: expected gexp rows of {n_genes} values (one per gene of panel {panel}), found "
            f"rows of {found}{_panel_hint(found) if isinstance(found, int) else ''}; choose the --panel of the "
            "config these shards come from (nothing was written)")

    col = _storage(col)
    if col.null_count:
        msg = (f"shard {shard.name}: expected a gexp value in every row, found {col.null_count} empty rows; "
               "download it again")
        raise InputFormatError(msg)
    n = len(col)
    flat, depth = col, 0
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        lengths = pc.list_value_length(flat).to_numpy(zero_copy_only=False)
        lo, hi = (int(lengths.min()), int(lengths.max())) if len(lengths) else (0, 0)
        inner = pa.types.is_list(flat.type.value_type) or pa.types.is_large_list(flat.type.value_type) or \
            pa.types.is_fixed_size_list(flat.type.value_type)
        if inner and (lo, hi) != (1, 1):
            msg = (f"shard {shard.name}: expected gexp as one (1, G) row per pair, found outer lengths {lo}..{hi}; "
                   "these are not the official shards")
            raise InputFormatError(msg)
        if not inner and (lo != n_genes or hi != n_genes):
            raise bad(lo if lo != n_genes else hi)
        flat = flat.flatten()
        depth += 1
    if depth == 0:
        msg = f"shard {shard.name}: expected gexp as lists of counts, found type {col.type}"
        raise InputFormatError(msg)
    values = flat.to_numpy(zero_copy_only=False)
    if values.size != n * n_genes:  # nulls inside lists
        raise bad(values.size / max(n, 1))
    return values.astype(np.float32, copy=False).reshape(n, n_genes)


def _coords(batch: pa.RecordBatch, shard: Path) -> tuple[np.ndarray, bool]:
    """``cell_coords`` as ``(rows, 2)`` float64 (two numbers per row, flat or nested); NaN when the column is absent."""
    n = batch.num_rows
    if "cell_coords" not in batch.schema.names:
        return np.full((n, 2), np.nan), False
    flat = _storage(batch.column("cell_coords"))
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()
    values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)
    if values.size != 2 * n:
        msg = (f"shard {shard.name}: expected two cell_coords values (x, y) per row, found {values.size} values for "
               f"{n} rows; these are not the official shards")
        raise InputFormatError(msg)
    return values.reshape(n, 2), True


def _image_bytes(batch: pa.RecordBatch, shard: Path) -> pa.BinaryArray:
    col = batch.column("image")
    if pa.types.is_struct(col.type):
        if col.type.get_field_index("bytes") < 0:
            msg = f"shard {shard.name}: expected the image struct to hold 'bytes', found fields {col.type}"
            raise InputFormatError(msg)
        col = pc.struct_field(col, "bytes")
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        msg = f"shard {shard.name}: expected encoded image bytes, found type {col.type}"
        raise InputFormatError(msg)
    if col.null_count:
        msg = (f"shard {shard.name}: expected the image bytes in every row, found {col.null_count} rows with none (an "
               "image given by path only?); download the parquet shards, which embed the images")
        raise InputFormatError(msg)
    return col.cast(pa.binary()) if pa.types.is_large_binary(col.type) else col


def _fixed(arr: pa.Array, start: int, length: int) -> np.ndarray:
    """Bytes ``[start, start+length)`` of every value as a ``(rows, length)`` uint8 array (values shorter: zeros)."""
    lens = pc.binary_length(arr).to_numpy(zero_copy_only=False)
    short = lens < start + length
    if short.any():
        arr = pc.if_else(pa.array(~short), arr, pa.scalar(b"\0" * (start + length), arr.type))
    sl = pc.binary_slice(arr, start, start + length).cast(pa.binary(length))
    buf = np.frombuffer(sl.buffers()[1], dtype=np.uint8)
    return buf[sl.offset * length:(sl.offset + len(sl)) * length].reshape(len(sl), length)


def _image_sizes(imgs: pa.BinaryArray, shard: Path, decode: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(formats, sizes)`` of every image: ``"png"``/``"jpeg"``/other PIL names and ``(w, h)``; decodes ``decode``."""
    from PIL import Image

    n = len(imgs)
    head = _fixed(imgs, 0, 8)
    is_png = (head == np.frombuffer(_PNG, np.uint8)).all(1)
    is_jpeg = (head[:, :3] == np.frombuffer(_JPEG, np.uint8)).all(1)
    fmt = np.where(is_png, "png", np.where(is_jpeg, "jpeg", "other")).astype(object)
    sizes = np.zeros((n, 2), dtype=np.int64)
    if is_png.any():
        ihdr = _fixed(imgs, 16, 8).astype(np.int64)  # width, height: big-endian uint32 at bytes 16..24
        wh = np.column_stack([ihdr[:, :4] @ [1 << 24, 1 << 16, 1 << 8, 1], ihdr[:, 4:] @ [1 << 24, 1 << 16, 1 << 8, 1]])
        sizes[is_png] = wh[is_png]
    for i in np.flatnonzero(~is_png | decode):
        data = imgs[int(i)].as_py()
        try:
            with Image.open(io.BytesIO(data)) as im:
                if decode[i]:
                    im.load()
                sizes[i] = im.size
                if fmt[i] == "other":
                    fmt[i] = (im.format or "unknown").lower()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged data; each becomes one line
            msg = (f"shard {shard.name}: expected decodable PNG/JPEG patches, found one that cannot be read "
                   f"({type(e).__name__}: {brief(e, 80)}); the shard is damaged: download it again")
            raise InputFormatError(msg) from None
    return fmt, sizes


def _rows(arr, sel: np.ndarray):
    """``arr`` at the positions ``sel``: a zero-copy slice when they are contiguous (the usual case), else a take."""
    if len(sel) and sel[-1] - sel[0] + 1 == len(sel):
        return arr.slice(int(sel[0]), len(sel))
    return arr.take(pa.array(sel))


def _json_value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def import_hescape(src: str | os.PathLike, out: str | os.PathLike, *, panel: str, um_per_px: float | None = None,
                   unlisted: str = "drop", conflict: str | None = None, check_images: str = "some",
                   rows_per_shard: int = 512, batch_rows: int = 256, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Turn a directory of official HESCAPE shards into a HESCAPE dataset at ``out`` (see the module docstring).

    Parameters
    ----------
    src
        Folder of one config's ``*.parquet`` (Hub) or ``*.arrow`` (``save_to_disk``) shards, searched recursively.
    out
        The dataset directory to write (never inside ``src``).
    panel
        The config's panel, e.g. ``"human-breast-panel"``: gene order, split preset, donors, µm/px.
    um_per_px
        Patch µm/px of every sample, overriding the preset's ``pixel_size_um_estimated``.
    unlisted
        Samples in no split of the preset: ``"drop"`` (default; recorded in the manifest) or ``"error"``.
    conflict
        Split of a sample the preset lists twice (``human-skin-panel``'s ``TENX117``), as in ``hescape-data split``.
    check_images
        ``"some"`` (first and last image of every batch decoded in full) or ``"all"``.
    rows_per_shard, batch_rows
        Rows per output shard; rows read per batch.
    overwrite
        Replace an existing HESCAPE dataset at ``out``.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    InputFormatError, PanelMismatchError, HescapeDataError
        Missing or damaged shards, ``gexp`` rows of another length than the panel (naming the shard, the expected
        and the found length), counts that are not raw, unknown samples, a donor in two splits. Nothing is written
        then.
    """
    if unlisted not in ("drop", "error"):
        msg = f"--unlisted: expected 'drop' or 'error', found {unlisted!r}"
        raise HescapeDataError(msg)
    if check_images not in CHECK_IMAGES:
        msg = f"--check-images: expected one of {list(CHECK_IMAGES)}, found {check_images!r}"
        raise HescapeDataError(msg)
    for name, v in (("--rows-per-shard", rows_per_shard), ("batch_rows", batch_rows)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            msg = f"{name}: expected a whole number >= 1, found {v!r}"
            raise HescapeDataError(msg)
    if um_per_px is not None and (isinstance(um_per_px, bool) or not np.isfinite(um_per_px) or um_per_px <= 0):
        msg = f"--um-per-px: expected a positive finite number of µm per patch pixel, found {um_per_px!r}"
        raise HescapeDataError(msg)
    p = load_panel(panel)
    src = Path(src)
    out = check_output_location(out, overwrite=overwrite, inputs=[src])
    files = find_shards(src)

    # pass 1 (the name column only): samples, their rows, splits and donors, before anything is written
    shards = [_Shard(f) for f in files]
    rows_of: Counter = Counter()
    for sh in shards:
        names = np.concatenate([_strings(c, _class_names(sh.features, "name"), f"shard {sh.path.name} name")
                                for c in sh.column("name").chunks] or [np.zeros(0, object)])
        rows_of.update(Counter(names.tolist()))
        for first in sh.batches(["gexp"], 1):  # the first row's width: a wrong --panel stops before any writing
            _gexp_matrix(first.column("gexp"), p.n_genes, sh.path, panel)
            break
    preset = load_split_preset(panel)
    ids = {r["id"] for rows in preset.values() for r in rows}
    listed = sorted(n for n in rows_of if n in ids)
    dropped = {n: int(rows_of[n]) for n in sorted(rows_of) if n not in ids}
    if not listed:
        msg = (f"{src}: expected samples of preset {panel!r} ({sorted(ids)}), found only {sorted(rows_of)[:10]}; "
               "choose the --panel of the config these shards come from")
        raise PanelMismatchError(msg)
    if dropped and unlisted == "error":
        msg = (f"{src}: expected every sample in a split of preset {panel!r}, found {len(dropped)} in none "
               f"({list(dropped)[:10]}); pass --unlisted drop to leave them out, as the authors' training does")
        raise HescapeDataError(msg)
    split_of, _absent = preset_split_assignment([{"name": n} for n in listed], panel, conflict=conflict)
    donor_of = preset_donors(panel)
    check_no_donor_leakage([{"name": n, "donor": donor_of[n], "split": split_of[n]} for n in listed])
    px_of: dict[str, tuple[float, str]] = {}
    for rows in preset.values():
        for r in rows:
            try:
                v = float(r.get("pixel_size_um_estimated") or "nan")
            except ValueError:
                v = float("nan")
            px_of[r["id"]] = (v, "preset pixel_size_um_estimated") if np.isfinite(v) and v > 0 else \
                (DEFAULT_UM_PER_PX, f"default {DEFAULT_UM_PER_PX} (the preset gives none)")
    if um_per_px is not None:
        px_of = {n: (float(um_per_px), "given (--um-per-px)") for n in px_of}

    # pass 2: every batch, vectorised; one part per (batch, sample)
    stats: dict[str, dict] = {n: {"formats": Counter(), "sizes": Counter(), "tissue": Counter(), "source": Counter(),
                                  "meta": {}} for n in listed}
    listed_set = np.asarray(listed, dtype=object)
    offset = 0
    coords_present = True
    extra = {"import": {"kind": "hescape-official", "input": str(src.resolve()), "panel": panel,
                        "shards": [{"file": sh.path.relative_to(src).as_posix(), "rows": sh.rows} for sh in shards],
                        "unlisted_samples_dropped": dropped,
                        "spot_id": "row index in the official dataset (shards sorted by path)",
                        "images": "the official encoded bytes, copied unchanged (not re-encoded)",
                        "n_cells": "-1: not given by the official dataset",
                        "um_per_px_default": DEFAULT_UM_PER_PX}}
    bar = tqdm(total=sum(rows_of[n] for n in listed), desc=f"import {panel}", unit="row", disable=not progress)
    with _ChunkedWriter(out, genes=list(p.genes), gene_ids=list(p.gene_ids), rows_per_shard=rows_per_shard,
                        overwrite=overwrite, extra=extra, inputs=[src]) as w:
        for sh in shards:
            cols = [c for c in sh.schema.names]
            meta_cols = [c for c in cols if c not in _CORE]
            name_labels = _class_names(sh.features, "name")
            for batch in sh.batches(cols, batch_rows):
                n = batch.num_rows
                names = _strings(batch.column("name"), name_labels, f"shard {sh.path.name} name")
                keep = np.isin(names, listed_set)
                if keep.any():
                    _write_batch(w, batch, names, keep, offset, sh, p, panel, meta_cols, split_of, donor_of, px_of,
                                 stats, check_images)
                    coords_present &= "cell_coords" in batch.schema.names
                    bar.update(int(keep.sum()))
                offset += n
        bar.close()
        umpp, fov, sizes = [], [], []
        for name in listed:
            st = stats[name]
            size = st["sizes"].most_common(1)[0][0] if st["sizes"] else (0, 0)
            mpp, how = px_of[name]
            umpp.append((mpp, rows_of[name]))
            sizes.append(size)
            w.update_sample(name, patch_um_per_px=mpp, patch_um_per_px_source=how, patch_px=list(size),
                            fov_um=round(size[0] * mpp, 3),
                            image_sizes={f"{a}x{b}": c for (a, b), c in st["sizes"].items()},
                            image_formats=dict(st["formats"]), metadata=st["meta"],
                            tissues=dict(st["tissue"]), sources=dict(st["source"]))
            fov.append(size[0] * mpp)
        order = np.argsort([m for m, _ in umpp])
        cum = np.cumsum([umpp[i][1] for i in order])
        median = umpp[order[int(np.searchsorted(cum, cum[-1] / 2))]][0]
        patch_px = Counter(s for s in sizes).most_common(1)[0][0]
        w.extra["geometry"] = {
            "name": "hescape-official", "diameter_um": SPOT_DIAMETER_UM, "um_per_px": median,
            "patch_px": int(patch_px[0]), "fov_um": round(patch_px[0] * median, 3),
            "per_sample": "patch_um_per_px, patch_px and fov_um of each sample in samples[]",
            "uniform_patches": len(set(sizes)) == 1 and len({m for m, _ in umpp}) == 1}
        if len(set(sizes)) > 1:
            import warnings

            by = ", ".join(f"{n}: {a}x{b}" for n, (a, b) in zip(listed, sizes, strict=True))
            warnings.warn(f"samples have patches of different sizes ({by}); a training batch stacks patches of one "
                          "size, so hescape-train cannot batch them together: import the samples of one size",
                          UserWarning, stacklevel=2)
        w.extra["import"]["cell_coords"] = ("copied from the official cell_coords (units not stated by the authors)"
                                            if coords_present else "absent from the official shards: NaN")
    return w.out_dir


def _write_batch(w: _ChunkedWriter, batch, names, keep, offset, sh: _Shard, p, panel, meta_cols, split_of, donor_of,
                 px_of, stats, check_images) -> None:
    idx = np.flatnonzero(keep)
    sub = batch if len(idx) == batch.num_rows else _rows(batch, idx)
    names = names[idx]
    gexp = _gexp_matrix(sub.column("gexp"), p.n_genes, sh.path, panel)
    check_counts(gexp, f"shard {sh.path.name} gexp")
    coords, _ = _coords(sub, sh.path)
    imgs = _image_bytes(sub, sh.path)
    decode = np.ones(len(idx), dtype=bool) if check_images == "all" else np.isin(np.arange(len(idx)), [0, len(idx) - 1])
    fmt, sizes = _image_sizes(imgs, sh.path, decode)
    tissue = _strings(sub.column("tissue"), _class_names(sh.features, "tissue"), "tissue") \
        if "tissue" in sub.schema.names else np.full(len(idx), "unknown", object)
    source = _strings(sub.column("source"), _class_names(sh.features, "source"), "source") \
        if "source" in sub.schema.names else np.full(len(idx), "unknown", object)
    for name in dict.fromkeys(names.tolist()):
        sel = np.flatnonzero(names == name)
        st = stats[name]
        st["formats"].update(Counter(fmt[sel].tolist()))
        st["sizes"].update(Counter(map(tuple, sizes[sel].tolist())))
        st["tissue"].update(Counter(tissue[sel].tolist()))
        st["source"].update(Counter(source[sel].tolist()))
        for c in meta_cols:
            col = _rows(sub.column(c), sel)
            names_c = _class_names(sh.features, c)
            vals = _strings(col, names_c, c) if names_c is not None else col
            uniq = pc.unique(pa.array(vals) if isinstance(vals, np.ndarray) else vals).to_pylist()
            seen = st["meta"].setdefault(c, [])
            for v in uniq:
                v = _json_value(v)
                if v not in seen:
                    seen.append(v)
        mpp = px_of[name][0]
        w.add_part(SpotRecords(
            name=name, donor=donor_of[name], tissue=str(st["tissue"].most_common(1)[0][0]),
            source=str(st["source"].most_common(1)[0][0]), images=_rows(imgs, sel), gexp=gexp[sel],
            coords_um=coords[sel], n_cells=np.full(len(sel), -1, np.int32),
            spot_ids=(offset + idx[sel]).astype(str).tolist(), meta={"patch_um_per_px": mpp}), split=split_of[name])
