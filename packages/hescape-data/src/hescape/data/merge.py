"""Merge HESCAPE datasets built separately into one, re-using their shard files.

The inputs must share one gene list (same genes in the same order; Ensembl ids equal where both give one) and
one spot geometry (the manifest's ``geometry`` entry, compared field by field, the preset name aside), and their
sample names must be unique across them; a donor may not end up in two splits. Shards are taken as they are:
hard-linked into the new dataset where the file system allows, else copied (the inputs are never modified, and a
shard is never written in place afterwards, so a link is as safe as a copy); no image is decoded or re-encoded,
and every row, ``spot_id`` included, is carried through unchanged. Each shard's SHA-256 is checked against its
input manifest on the way, so a damaged input is refused rather than merged. A shard written before a column
was added to the schema (``spot_id``) gets that column as :class:`~hescape.data.arrow.DatasetWriter` would have
written it (the row's index within its sample); its other columns are copied as they are.

The output is written atomically by :class:`~hescape.data.arrow.DatasetWriter` (a hidden sibling renamed into
place; ``overwrite`` replaces a HESCAPE dataset only). Sample entries keep their split, donor and metadata; QC
figures (``qc/*.png``) are copied; each input's own manifest entries (``ingest``, ``filters``, ``generator``, …)
are kept under ``merged_from``. :func:`hescape.data.samplesheet.build_from_samplesheet` assembles its per-sample
parts with :func:`assemble`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from .arrow import DatasetWriter, open_shard, read_manifest, string_column
from .errors import DatasetFormatError, HescapeDataError, PanelMismatchError, SplitLeakageError, brief
from .outputs import check_output_location
from .splits import SPLITS, check_no_donor_leakage

__all__ = ["merge_datasets", "assemble", "check_compatible"]

#: Manifest keys that describe the merged dataset itself; every other key of an input goes under ``merged_from``.
_CORE = ("schema_version", "genes", "gene_ids", "n_rows", "samples", "shards", "geometry")


def _geometry_text(g: dict | None) -> str:
    if g is None:
        return "no geometry recorded"
    try:
        return (f"{g.get('name')} ({g['shape']} {g['diameter_um']:g} µm, pitch {g['pitch_um']:g} µm, {g['grid']} grid; "
                f"patches {g['fov_um']:g} µm at {g['um_per_px']:g} µm/px)")
    except (KeyError, TypeError, ValueError):
        return str(g)[:120]


def _geometry_key(g: dict | None):
    if g is None:
        return None
    return {k: v for k, v in g.items() if k != "name"}


def _gene_difference(a: list[str], b: list[str]) -> str:
    if len(a) != len(b):
        extra = [g for g in a if g not in set(b)][:3]
        return f"{len(a)} vs {len(b)} genes" + (f" (e.g. {extra} only in the first)" if extra else "")
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    how = "the same genes in another order" if sorted(a) == sorted(b) else "different genes"
    return f"{how}: first difference at position {i}, {a[i]!r} vs {b[i]!r}"


def check_compatible(manifests: Sequence[dict], labels: Sequence[str]) -> tuple[list[str], list[str], dict | None]:
    """The shared genes, gene ids and geometry of datasets to be merged; refuse when they differ.

    Raises
    ------
    PanelMismatchError
        Different gene lists (or order), conflicting Ensembl ids, or different spot geometries; the message names
        both datasets and the differing values.
    """
    m0, l0 = manifests[0], labels[0]
    genes = list(m0["genes"])
    gene_ids = list(m0.get("gene_ids") or [""] * len(genes))
    geometry = m0.get("geometry")
    for m, label in zip(manifests[1:], labels[1:], strict=True):
        if list(m["genes"]) != genes:
            msg = (f"expected the same genes in the same order in every dataset, found {l0} and {label} with "
                   f"{_gene_difference(genes, list(m['genes']))}; build them with the same --panel")
            raise PanelMismatchError(msg)
        ids = list(m.get("gene_ids") or [""] * len(genes))
        for i, (a, b) in enumerate(zip(gene_ids, ids, strict=True)):
            if a and b and a != b:
                msg = (f"expected one Ensembl id per gene, found gene {genes[i]!r} with id {a!r} in {l0} and {b!r} in "
                       f"{label}; build them with the same --panel")
                raise PanelMismatchError(msg)
            if not a and b:
                gene_ids[i] = b
        if _geometry_key(m.get("geometry")) != _geometry_key(geometry):
            msg = (f"expected one spot geometry in every dataset, found {l0}: {_geometry_text(geometry)} and {label}: "
                   f"{_geometry_text(m.get('geometry'))}; rebuild one with the other's geometry (--geometry, "
                   "--fov-um, --um-per-px, ...)")
            raise PanelMismatchError(msg)
    return genes, gene_ids, geometry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst``; a copy where the file system refuses links (another device, no support)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _shard_schema(path: Path) -> tuple[pa.Schema, bool]:
    """A shard's schema, and whether it is in the IPC stream format (ours) rather than the IPC file format."""
    with pa.memory_map(str(path)) as src:
        if src.read(6) == b"ARROW1":
            src.seek(0)
            return pa.ipc.open_file(src).schema, False
        src.seek(0)
        return pa.ipc.open_stream(src).schema, True


class _ShardLinker(DatasetWriter):
    """A :class:`DatasetWriter` that takes whole shard files and sample entries of existing datasets."""

    def add_shard(self, src: Path, *, rows: int, sha256: str | None, label: str, counters: dict) -> None:
        """Link (or copy) one input shard into the dataset being written; rewrite it only if its schema is older."""
        if sha256 is not None and _sha256(src) != sha256:
            msg = (f"{label}: shard {src} does not match its SHA-256 in the manifest: it is corrupt; rebuild that "
                   "dataset (hescape-data info --verify names every damaged shard)")
            raise DatasetFormatError(msg)
        dst = self.tmp_dir / f"shard-{len(self._shard_files):05d}.arrow"
        try:
            schema, stream = _shard_schema(src)
        except (OSError, pa.ArrowInvalid) as e:
            msg = f"{label}: shard {src} cannot be read ({brief(e, 200)}); it is truncated or corrupt: rebuild that dataset"
            raise DatasetFormatError(msg) from None
        if stream and schema.equals(self.schema, check_metadata=True):
            _link_or_copy(src, dst)
        else:
            self._rewrite(src, dst, rows, label, counters)
        self._shard_files.append(dst.name)

    def _rewrite(self, src: Path, dst: Path, rows: int, label: str, counters: dict) -> None:
        """Copy a shard's columns into this schema, as an IPC stream (same columns with other metadata, the IPC file
        format, or ``spot_id`` missing)."""
        t = open_shard(src, rows)
        cols = []
        for f in self.schema:
            if f.name in t.column_names and t.schema.field(f.name).type == f.type:
                cols.append(t.column(f.name))
            elif f.name == "spot_id" and f.name not in t.column_names:
                ids = []
                for name in string_column(t, "name").tolist():
                    ids.append(str(counters.get(name, 0)))
                    counters[name] = counters.get(name, 0) + 1
                cols.append(pa.chunked_array([pa.array(ids, pa.string())]))
            else:
                found = str(t.schema.field(f.name).type) if f.name in t.column_names else "no such column"
                msg = (f"{label}: shard {src}: expected column {f.name!r} of type {f.type}, found {found}; merge "
                       "takes datasets written by hescape-data (re-index or rebuild this one)")
                raise DatasetFormatError(msg)
        table = pa.Table.from_arrays(cols, schema=self.schema)
        with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as w:
            w.write_table(table, max_chunksize=256)

    def add_entries(self, entries: list[dict]) -> None:
        """Sample entries of the shards added (name, donor, split, n_spots, …), in shard order."""
        self._samples.extend(entries)


def assemble(items: Sequence[tuple[Path, dict]], out: str | os.PathLike, *, overwrite: bool = False,
             inputs: Sequence[str | os.PathLike] = (), labels: Sequence[str] | None = None,
             split_of: dict[str, str] | None = None, extra: dict | None = None) -> Path:
    """Write one dataset at ``out`` from the shards of ``items`` (``(dataset path, its manifest)``), atomically.

    ``labels`` name the items in messages (default: their paths); ``split_of`` replaces the split of the samples
    it names; ``extra`` adds top-level manifest keys. ``inputs`` are the paths ``out`` may not be, contain or lie
    inside (the datasets themselves are always added). Checks before anything is written: compatible genes and
    geometry (:func:`check_compatible`), unique sample names, known splits, no donor in two splits.

    Raises
    ------
    PanelMismatchError, DatasetFormatError, SplitLeakageError, HescapeDataError
        One line naming the datasets involved.
    """
    if not items:
        msg = "merge: expected at least one dataset to merge, found none"
        raise HescapeDataError(msg)
    paths = [Path(p) for p, _ in items]
    manifests = [m for _, m in items]
    labels = list(labels) if labels is not None else [str(p) for p in paths]
    genes, gene_ids, geometry = check_compatible(manifests, labels)
    owner: dict[str, str] = {}
    entries_of: list[list[dict]] = []
    for m, label in zip(manifests, labels, strict=True):
        entries = []
        for s in m["samples"]:
            if s["name"] in owner:
                msg = (f"expected unique sample names across the datasets, found sample {s['name']!r} in both "
                       f"{owner[s['name']]} and {label}; rebuild one with another --sample name")
                raise DatasetFormatError(msg)
            owner[s["name"]] = label
            entries.append({**s, "split": (split_of or {}).get(s["name"], s["split"])})
        entries_of.append(entries)
    all_entries = [e for es in entries_of for e in es]
    bad = sorted({e["split"] for e in all_entries} - set(SPLITS))
    if bad:
        msg = f"expected splits among {list(SPLITS)}, found {bad}; fix them with hescape-data split first"
        raise DatasetFormatError(msg)
    try:
        check_no_donor_leakage(all_entries)
    except SplitLeakageError as e:
        msg = f"merge: {e} (re-split the inputs with hescape-data split, or the merged dataset after merging)"
        raise SplitLeakageError(msg) from None
    record = []
    for p, m, entries in zip(paths, manifests, entries_of, strict=True):
        record.append({"dataset": str(p.resolve()), "samples": [e["name"] for e in entries],
                       **{k: v for k, v in m.items() if k not in _CORE}})
    manifest_extra = {**({"geometry": geometry} if geometry is not None else {}), "merged_from": record,
                      **(extra or {})}
    with _ShardLinker(out, genes=genes, gene_ids=gene_ids, overwrite=overwrite, extra=manifest_extra,
                      inputs=[*paths, *inputs]) as w:
        qc_names: set[str] = set()
        for p, m, entries, label in zip(paths, manifests, entries_of, labels, strict=True):
            counters: dict = {}
            for s in m["shards"]:
                w.add_shard(p / s["file"], rows=s["rows"], sha256=s.get("sha256"), label=label, counters=counters)
            w.add_entries(entries)
            qc = p / "qc"
            if qc.is_dir() and not qc.is_symlink():
                for f in sorted(qc.glob("*.png")):
                    name = f.name
                    k = 1
                    while name in qc_names:
                        name, k = f"{f.stem}-{k}{f.suffix}", k + 1
                    qc_names.add(name)
                    shutil.copyfile(f, w.file_path("qc", name))
    return w.out_dir


def merge_datasets(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Merge datasets built separately (same genes, same spot geometry) into one dataset at ``out``.

    Parameters
    ----------
    inputs
        Dataset directories, in the order their samples and shards take in the result.
    out
        The merged dataset directory (written atomically; never an input or inside one).
    overwrite
        Replace an existing HESCAPE dataset at ``out``.

    Returns
    -------
    Path
        ``out``, absolute.

    Raises
    ------
    PanelMismatchError
        Different genes or gene order, or different spot geometries (naming both datasets and the values).
    DatasetFormatError
        A sample name in two inputs, an input given twice, an input that is not a readable HESCAPE dataset,
        a shard whose SHA-256 differs from its manifest.
    SplitLeakageError
        A donor in two splits across the inputs.
    FileExistsError, OutputLocationError
        ``out`` exists (without ``overwrite``), or may not be written.
    """
    paths = [Path(os.path.abspath(p)) for p in inputs]
    if not paths:
        msg = "merge: expected at least one dataset directory, found none; pass e.g. merge A B --out C"
        raise HescapeDataError(msg)
    seen: dict[Path, Path] = {}
    for p in paths:
        r = p.resolve()
        if r in seen:
            msg = f"merge: expected each dataset once, found {p} given twice; drop the repeat"
            raise DatasetFormatError(msg)
        seen[r] = p
    check_output_location(out, overwrite=overwrite, inputs=paths)
    items = [(p, read_manifest(p)) for p in paths]
    return assemble(items, out, overwrite=overwrite, inputs=paths)
