"""Build one dataset from many samples listed in a CSV samplesheet, sample by sample in worker processes.

Samplesheet (comma-separated, UTF-8, one header line, one row per sample)::

    technology,path,sample,donor,tissue,panel,split,he_image,alignment,options
    xenium,runs/s1/outs,S1,P1,breast,human-breast-panel,train,,,
    xenium,runs/s2/outs,S2,P1,breast,human-breast-panel,train,s2_he.ome.tif,s2_align.csv,min_counts=5
    xenium,runs/s3/outs,S3,P2,breast,human-breast-panel,test,,,"{""outside_spots"": ""drop""}"

Required columns: ``technology`` (``xenium``, ``visium`` or ``visium-hd``), ``path`` (the Xenium bundle, or the
Space Ranger ``outs/`` folder), ``sample`` (unique id), ``donor``, ``tissue`` (may be empty: the builder's
default), ``panel`` (a vendored HESCAPE panel, or empty for the data's own genes; one value for all rows) and
``split`` (``train``, ``val`` or ``test``; one donor in one split). Optional columns: ``he_image`` (the H&E image;
for Visium and Visium HD required, a file or ``hires``/``lowres``), ``alignment`` (Xenium only) and ``options``,
per-sample build options as a JSON object or ``key=value;key=value`` (keys of :data:`OPTION_KEYS`, the
``hescape-data build`` options with ``_`` for ``-``; values checked by
:func:`~hescape.data.ingest.check_build_options`). Relative paths are read from the samplesheet's folder.

Every row is checked before any work (:func:`read_samplesheet`): one line per fault (expected / found / fix),
and nothing is written when one is found. All samples must share one panel and one spot geometry.

How a build runs (:func:`build_from_samplesheet`): each sample is built by the single-sample builder of its
technology (:mod:`hescape.data.ingest`) into its own *part*, a one-sample dataset written atomically into the
hidden folder ``.<out>.parts/`` next to ``out``, named by the sample and a fingerprint: SHA-256 of the row (split
excepted), the effective options, the size and modification time of every input file and the hescape-data
version. A part whose fingerprint matches is not built again; a failed sample leaves no part, so a re-run retries
it. With ``jobs`` > 1 the parts are built in ``jobs`` worker processes (``spawn``: ``hescape.data`` imports torch,
and a ``fork`` after threads have started is unsafe); a worker that dies (out of memory, a signal) breaks the
pool, after which the unfinished samples are built one at a time, each in a fresh worker, so only the sample that
kills its worker fails. ``jobs=1`` builds in this process. The dataset is then assembled from the finished parts
by :func:`hescape.data.merge.assemble` (shard files hard-linked or copied, no image re-encoded; splits as the
samplesheet gives them) and written atomically. A failed sample is named with its one-line error in the summary,
and the dataset is written from the others; ``hescape-data build --samplesheet`` then exits with code 2 (the
dataset is usable, but not what the samplesheet asked for). Called from a script, the call must sit under
``if __name__ == "__main__":`` when ``jobs`` > 1 (worker processes re-import the main module).

Re-running: an ``out`` whose manifest records failed samples of a build of the same ``out`` is replaced without
``overwrite`` (the re-run completes it); an ``out`` already built from the same rows, options and input files is
left as it is ("up to date"); any other existing ``out`` needs ``overwrite`` (finished parts are still reused).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .arrow import SCHEMA_VERSION, read_manifest
from .errors import HescapeDataError, InputFormatError, OutputLocationError, SplitLeakageError, brief
from .geometry import SpotGeometry, get_geometry
from .ingest import PatchOptions, SpotOptions, check_build_options
from .outputs import MANIFEST, check_output_location, dir_mode, is_hescape_dataset, safe_filename
from .splits import SPLITS, check_no_donor_leakage

__all__ = ["COLUMNS", "OPTIONAL_COLUMNS", "TECHNOLOGIES", "OPTION_KEYS", "SampleRow", "SampleStatus",
           "SamplesheetResult", "read_samplesheet", "parse_options", "fingerprint", "parts_dir",
           "build_from_samplesheet"]

#: Required samplesheet columns.
COLUMNS = ("technology", "path", "sample", "donor", "tissue", "panel", "split")
#: Optional samplesheet columns.
OPTIONAL_COLUMNS = ("he_image", "alignment", "options")
#: Values of the ``technology`` column, and the single-sample builder each one runs.
TECHNOLOGIES = ("xenium", "visium", "visium-hd")

_ALL = frozenset(TECHNOLOGIES)
_POOLED = frozenset({"xenium", "visium-hd"})
#: Per-sample option -> (type, technologies it applies to, default). Types: ``number``, ``int``, ``bool``, ``str``.
#: Defaults are those of ``hescape-data build`` (``None``: the builder's own, e.g. the technology's geometry).
OPTION_KEYS: dict[str, tuple[str, frozenset, object]] = {
    "min_counts": ("number", _ALL, 1.0),
    "min_cells": ("int", _POOLED, 1),
    "min_tissue_fraction": ("number", _ALL, 0.0),
    "outside_spots": ("str", _ALL, "error"),
    "max_upsample": ("number", _ALL, 2.0),
    "skip_registration_check": ("bool", _ALL, False),
    "duplicate_genes": ("str", _ALL, "error"),
    "missing_genes": ("str", _ALL, "error"),
    "max_missing": ("number", _ALL, 0.1),
    "allow_non_integer_counts": ("bool", _ALL, False),
    "source": ("str", _ALL, None),
    "counts_from": ("str", frozenset({"xenium"}), "cells"),
    "min_qv": ("number", frozenset({"xenium"}), 20.0),
    "matrix": ("str", frozenset({"visium", "visium-hd"}), "filtered"),
    "bin_size": ("int", frozenset({"visium-hd"}), None),
    "geometry": ("str", _POOLED, None),
    "spot_shape": ("str", _POOLED, None),
    "grid": ("str", _POOLED, None),
    "pitch_um": ("number", _POOLED, None),
    "spot_diameter_um": ("number", _POOLED, None),
    "fov_um": ("number", _ALL, None),
    "um_per_px": ("number", _ALL, None),
}
_GEOMETRY_KEYS = ("geometry", "spot_shape", "grid", "pitch_um", "spot_diameter_um", "fov_um", "um_per_px")


@dataclass(frozen=True)
class SampleRow:
    """One checked samplesheet row (paths absolute; ``options`` complete: every applicable key, defaults filled)."""

    line: int  # line of the samplesheet the row ends on (the header is line 1)
    technology: str
    path: Path
    sample: str
    donor: str
    tissue: str | None
    panel: str | None
    split: str
    he_image: str | None  # an absolute path, or "hires" / "lowres" (Visium, Visium HD)
    alignment: Path | None
    options: dict = field(default_factory=dict)

    def inputs(self) -> list[Path]:
        """The files and folders this sample is built from."""
        extra = [] if self.he_image in (None, "hires", "lowres") else [Path(self.he_image)]
        return [self.path, *extra, *([self.alignment] if self.alignment else [])]

    def geometry(self) -> SpotGeometry:
        """The spot geometry this row builds with (the technology's default preset, changed by the options)."""
        o = self.options
        base = o.get("geometry") or ("visium" if self.technology == "visium" else "hescape")
        return get_geometry(base).with_(shape=o.get("spot_shape"), grid=o.get("grid"), pitch_um=o.get("pitch_um"),
                                        diameter_um=o.get("spot_diameter_um"), fov_um=o.get("fov_um"),
                                        um_per_px=o.get("um_per_px"))

    def where(self, csv_path: Path | str) -> str:
        return f"samplesheet {csv_path}, line {self.line} (sample {self.sample!r})"


# ------------------------------------------------------------------------------------------------ reading


def _value(key: str, v, where: str):
    """A per-sample option value converted to its type (strings from ``key=value`` are parsed)."""
    kind = OPTION_KEYS[key][0]
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return v.strip().lower() in ("true", "yes", "1")
        msg = f"{where}: options: {key}: expected true or false, found {v!r}"
        raise InputFormatError(msg)
    if kind in ("number", "int"):
        x = v
        if isinstance(v, str):
            try:
                x = float(v.strip())
            except ValueError:
                x = None
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or x in (float("inf"), float("-inf")):
            msg = f"{where}: options: {key}: expected a finite number, found {v!r}"
            raise InputFormatError(msg)
        if kind == "int":
            if float(x) != int(x):
                msg = f"{where}: options: {key}: expected a whole number, found {v!r}"
                raise InputFormatError(msg)
            return int(x)
        return float(x)
    if not isinstance(v, str) or not v.strip():
        msg = f"{where}: options: {key}: expected a non-empty text value, found {v!r}"
        raise InputFormatError(msg)
    return v.strip()


def parse_options(text: str | dict | None, where: str = "options") -> dict:
    """Per-sample options from a JSON object (``{"min_counts": 5}``) or ``key=value;key=value`` text.

    Keys are those of :data:`OPTION_KEYS` (``-`` may stand for ``_``, a leading ``--`` is ignored); values are
    converted to the key's type. Ranges and choices are checked later, with the row's technology
    (:func:`read_samplesheet`).

    Raises
    ------
    InputFormatError
        Not a JSON object / not ``key=value`` pairs, an unknown or repeated key, a value of the wrong type.
    """
    if text is None:
        return {}
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        text = text.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                msg = f"{where}: expected a JSON object or key=value;key=value, found invalid JSON ({e.msg}) in {text!r}"
                raise InputFormatError(msg) from None
            if not isinstance(obj, dict):
                msg = f"{where}: expected a JSON object, found a JSON {type(obj).__name__}"
                raise InputFormatError(msg)
            pairs = list(obj.items())
        else:
            pairs = []
            for part in (p.strip() for p in text.split(";")):
                if not part:
                    continue
                if "=" not in part:
                    msg = (f"{where}: expected key=value pairs separated by ';' (or a JSON object), found {part!r}; "
                           "write e.g. min_counts=5;outside_spots=drop")
                    raise InputFormatError(msg)
                k, v = part.split("=", 1)
                pairs.append((k, v))
    out: dict = {}
    for k, v in pairs:
        key = str(k).strip().lstrip("-").replace("-", "_").lower()
        if key not in OPTION_KEYS:
            msg = (f"{where}: expected option keys among {sorted(OPTION_KEYS)}, found {str(k)!r}; fix the key "
                   "(the hescape-data build options, with _ for -)")
            raise InputFormatError(msg)
        if key in out:
            msg = f"{where}: expected each option once, found {key!r} twice; keep one"
            raise InputFormatError(msg)
        out[key] = None if v is None else _value(key, v, where)
    return out


def _complete_options(technology: str, given: dict, where: str) -> dict:
    """Every option that applies to ``technology``: the given values over the defaults; others refused."""
    wrong = sorted(k for k in given if technology not in OPTION_KEYS[k][1])
    if wrong:
        msg = (f"{where}: options: expected options that apply to {technology}, found {wrong} (they apply to "
               f"{sorted({t for k in wrong for t in OPTION_KEYS[k][1]})} only); drop them")
        raise InputFormatError(msg)
    out = {k: d for k, (_, techs, d) in OPTION_KEYS.items() if technology in techs and k not in _GEOMETRY_KEYS}
    out.update({k: v for k, v in given.items() if v is not None})
    if out.get("source") is None:
        out["source"] = technology
    return out


def _check_row_options(row: SampleRow, rows_per_shard: int) -> None:
    """The checks of ``hescape-data build`` on one row's options (ranges, choices, the panel, the geometry)."""
    o = row.options
    patch = PatchOptions(min_tissue_fraction=o["min_tissue_fraction"], outside_spots=o["outside_spots"],
                         max_upsample=o["max_upsample"], registration_check=not o["skip_registration_check"])
    spots = SpotOptions(min_counts=o["min_counts"], min_cells=o["min_cells"]) if "min_cells" in o else None
    check_build_options(split=row.split, rows_per_shard=rows_per_shard, patch=patch, spots=spots,
                        min_counts=o["min_counts"], duplicate_genes=o["duplicate_genes"],
                        missing_genes=o["missing_genes"], max_missing=o["max_missing"],
                        counts_from=o.get("counts_from", "cells"), min_qv=o.get("min_qv", 20.0), panel=row.panel)
    if o.get("matrix") not in (None, "filtered", "raw"):
        msg = f"matrix: expected 'filtered' or 'raw', found {o['matrix']!r}"
        raise HescapeDataError(msg)
    if o.get("bin_size") not in (None, 2, 8, 16):
        msg = f"bin_size: expected 2, 8 or 16 (µm), found {o['bin_size']!r}"
        raise HescapeDataError(msg)
    if any(not c.isprintable() for c in o["source"]):
        msg = f"source: expected a printable name, found {o['source']!r}"
        raise HescapeDataError(msg)
    row.geometry()


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return Path(os.path.abspath(p if p.is_absolute() else base / p))


def _name_ok(v: str) -> bool:
    return bool(v) and all(c.isprintable() for c in v)


def _open_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header (lower-cased, stripped) and ``(line, {column: value})`` rows of a CSV file; one-line errors."""
    if not path.is_file():
        msg = (f"samplesheet {path}: expected a CSV file, found "
               f"{'a directory' if path.is_dir() else 'no such file'}; pass the path of the samplesheet")
        raise InputFormatError(msg)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        msg = f"samplesheet {path}: expected UTF-8 text, found undecodable bytes at offset {e.start}; save it as UTF-8 CSV"
        raise InputFormatError(msg) from None
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    rows: list[tuple[int, dict]] = []
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            msg = (f"samplesheet {path}: expected a header line naming the columns ({', '.join(COLUMNS)}), found an "
                   "empty file; add the header and one row per sample")
            raise InputFormatError(msg)
        header = [h.strip().lower() for h in header]
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                msg = (f"samplesheet {path}, line {reader.line_num}: expected {len(header)} comma-separated values "
                       f"(one per header column), found {len(values)}; quote values that contain commas")
                raise InputFormatError(msg)
            rows.append((reader.line_num, {h: v.strip() for h, v in zip(header, values, strict=True)}))
    except csv.Error as e:
        msg = f"samplesheet {path}, line {reader.line_num}: expected CSV, found malformed quoting ({brief(e, 200)}); fix the quotes"
        raise InputFormatError(msg) from None
    return header, rows


def _check_header(path: Path, header: list[str]) -> None:
    if len(header) == 1 and any(sep in header[0] for sep in ("\t", ";")):
        msg = (f"samplesheet {path}: expected comma-separated columns, found one column {header[0]!r} (tab- or "
               "semicolon-separated?); save it as CSV with commas")
        raise InputFormatError(msg)
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        msg = f"samplesheet {path}: expected each column once, found {dup} more than once; remove the duplicates"
        raise InputFormatError(msg)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        msg = (f"samplesheet {path}: expected the columns {', '.join(COLUMNS)} (optional: "
               f"{', '.join(OPTIONAL_COLUMNS)}), found no {', '.join(repr(m) for m in missing)} column (header: "
               f"{', '.join(header)}); add {'it' if len(missing) == 1 else 'them'} to the header, one value per row")
        raise InputFormatError(msg)
    unknown = [h for h in header if h not in COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        msg = (f"samplesheet {path}: expected columns among {', '.join(COLUMNS + OPTIONAL_COLUMNS)}, found unknown "
               f"{', '.join(repr(u) for u in unknown)}; rename or remove {'it' if len(unknown) == 1 else 'them'}")
        raise InputFormatError(msg)


def _parse_row(path: Path, line: int, r: dict, defaults: dict, rows_per_shard: int) -> SampleRow:
    """One row checked (one fault raised as a one-line :class:`InputFormatError`)."""
    where = f"samplesheet {path}, line {line}"
    sample = r["sample"]
    if not _name_ok(sample):
        msg = f"{where}: sample: expected a non-empty printable sample id, found {sample!r}; give every row an id"
        raise InputFormatError(msg)
    where = f"{where} (sample {sample!r})"
    tech = r["technology"].lower().replace("_", "-")
    if tech not in TECHNOLOGIES:
        msg = f"{where}: technology: expected one of {', '.join(TECHNOLOGIES)}, found {r['technology']!r}"
        raise InputFormatError(msg)
    for col in ("donor", "split"):
        if not _name_ok(r[col]):
            msg = f"{where}: {col}: expected a non-empty printable value, found {r[col]!r}; fill it in"
            raise InputFormatError(msg)
    if r["tissue"] and not _name_ok(r["tissue"]):
        msg = f"{where}: tissue: expected a printable name (or empty), found {r['tissue']!r}"
        raise InputFormatError(msg)
    if r["split"] not in SPLITS:
        msg = f"{where}: split: expected one of {', '.join(SPLITS)} (lower case), found {r['split']!r}"
        raise InputFormatError(msg)
    base = path.parent
    what = {"xenium": "Xenium bundle folder (the XOA output holding experiment.xenium)",
            "visium": "Space Ranger outs/ folder", "visium-hd": "Space Ranger outs/ (or binned_outputs/) folder"}
    if not r["path"]:
        msg = f"{where}: path: expected the {what[tech]}, found an empty value; fill it in"
        raise InputFormatError(msg)
    data = _resolve(base, r["path"])
    if not data.is_dir():
        found = "a file" if data.exists() else "no such path"
        msg = (f"{where}: path: expected an existing {what[tech]}, found {found} at {data}; fix the path "
               "(relative paths are read from the samplesheet's folder)")
        raise InputFormatError(msg)
    he = r.get("he_image") or None
    if he is not None and not (tech != "xenium" and he in ("hires", "lowres")):
        he_path = _resolve(base, he)
        if not he_path.is_file():
            msg = (f"{where}: he_image: expected an existing image file{'' if tech == 'xenium' else ' or hires/lowres'}"
                   f", found {'a directory' if he_path.is_dir() else 'no such file'} at {he_path}; fix the path")
            raise InputFormatError(msg)
        he = str(he_path)
    if he is None and tech != "xenium":
        msg = (f"{where}: he_image: expected the full-resolution H&E image given to Space Ranger (or hires / "
               "lowres) for a {tech} sample, found an empty value; fill it in")
        raise InputFormatError(msg.replace("{tech}", tech))
    alignment = None
    if r.get("alignment"):
        if tech != "xenium":
            msg = f"{where}: alignment: expected it only for xenium samples, found one for {tech}; leave it empty"
            raise InputFormatError(msg)
        alignment = _resolve(base, r["alignment"])
        if not alignment.is_file():
            msg = (f"{where}: alignment: expected an existing alignment CSV, found "
                   f"{'a directory' if alignment.is_dir() else 'no such file'} at {alignment}; fix the path")
            raise InputFormatError(msg)
    own = parse_options(r.get("options"), f"{where}: options")
    given = {**{k: v for k, v in defaults.items() if tech in OPTION_KEYS[k][1]}, **own}
    options = _complete_options(tech, given, where)
    row = SampleRow(line=line, technology=tech, path=data, sample=sample, donor=r["donor"],
                    tissue=r["tissue"] or None, panel=r["panel"] or None, split=r["split"], he_image=he,
                    alignment=alignment, options=options)
    try:
        _check_row_options(row, rows_per_shard)
    except HescapeDataError as e:
        text = re.sub(r"^--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(e))
        msg = f"{where}: {'panel: ' if text.startswith('unknown gene panel') else 'options: '}{text}"
        raise InputFormatError(msg) from None
    return row


def _geometry_text(g: SpotGeometry) -> str:
    return (f"{g.name} ({g.shape} {g.diameter_um:g} µm, pitch {g.pitch_um:g} µm, {g.grid} grid; patches "
            f"{g.fov_um:g} µm at {g.um_per_px:g} µm/px)")


def _same_geometry(a: SpotGeometry, b: SpotGeometry) -> bool:
    da, db = a.to_dict(), b.to_dict()
    da.pop("name", None)
    db.pop("name", None)
    return da == db


def read_samplesheet(path: str | os.PathLike, *, options: str | dict | None = None,
                     rows_per_shard: int = 2048) -> list[SampleRow]:
    """Read and check a samplesheet (see the module docstring); every row is checked before it returns.

    Parameters
    ----------
    path
        The CSV file.
    options
        Options for every row (JSON object, ``key=value;…`` or a dict); a row's own ``options`` override them.
        Keys that do not apply to a row's technology are ignored for that row.
    rows_per_shard
        Checked like ``hescape-data build --rows-per-shard``.

    Returns
    -------
    list[SampleRow]
        In file order.

    Raises
    ------
    InputFormatError
        One line per fault (``samplesheet <file>, line <n> (sample <id>): <column>: expected …, found …; fix``):
        an unreadable file, a missing or unknown column, an empty or unknown value, a duplicate sample id, a path
        that does not exist, a bad option, two panels, two spot geometries. Several faults: one line each.
    SplitLeakageError
        One donor's samples in two splits (:func:`~hescape.data.splits.check_no_donor_leakage`).
    """
    path = Path(os.path.abspath(os.path.expanduser(path)))
    header, raw = _open_rows(path)
    _check_header(path, header)
    if not raw:
        msg = f"samplesheet {path}: expected one row per sample under the header, found none; add the samples"
        raise InputFormatError(msg)
    defaults = parse_options(options, "--options")
    faults: list[str] = []
    rows: list[SampleRow] = []
    first_line: dict[str, int] = {}
    for line, r in raw:
        if r["sample"] and r["sample"] in first_line:
            faults.append(f"samplesheet {path}, line {line}: sample: expected a unique sample id, found "
                          f"{r['sample']!r} again (first on line {first_line[r['sample']]}); give every row its own id")
            continue
        first_line.setdefault(r["sample"], line)
        try:
            rows.append(_parse_row(path, line, r, defaults, rows_per_shard))
        except InputFormatError as e:
            faults.append(str(e))
    if not faults and rows:
        by_input: dict[str, SampleRow] = {}
        for row in rows:  # one tissue section twice (e.g. in train and in test) would leak it across splits
            key = os.path.realpath(row.path)
            if key in by_input:
                other = by_input[key]
                faults.append(f"samplesheet {path}, line {row.line}: path: expected each input once, found {row.path} "
                              f"again (line {other.line}, sample {other.sample}); one section under two sample names "
                              "would be counted twice and can leak across splits — remove one row")
            by_input.setdefault(key, row)
    if not faults and rows:
        panels = {}
        for row in rows:
            panels.setdefault(row.panel, row)
        if len(panels) > 1:
            (pa_, ra), (pb, rb) = list(panels.items())[:2]
            faults.append(f"samplesheet {path}: panel: expected one panel for all samples (a dataset has one gene "
                          f"list), found {pa_ or '(none: the data genes)'!r} (line {ra.line}, {ra.sample}) and "
                          f"{pb or '(none: the data genes)'!r} (line {rb.line}, {rb.sample}); give every row the "
                          "same panel, or build two datasets")
        first = rows[0]
        for row in rows[1:]:
            if not _same_geometry(first.geometry(), row.geometry()):
                faults.append(f"samplesheet {path}: expected one spot geometry for all samples (a dataset has one), "
                              f"found line {first.line} ({first.sample}, {first.technology}): "
                              f"{_geometry_text(first.geometry())} and line {row.line} ({row.sample}, "
                              f"{row.technology}): {_geometry_text(row.geometry())}; give every row the same "
                              "geometry options, or build two datasets")
                break
    if faults:
        raise InputFormatError("\n".join(faults))
    try:
        check_no_donor_leakage([{"name": r.sample, "donor": r.donor, "split": r.split} for r in rows])
    except SplitLeakageError as e:
        msg = f"samplesheet {path}: {e}"
        raise SplitLeakageError(msg) from None
    return rows


# ------------------------------------------------------------------------------------------------ fingerprints


def _stat_tree(p: Path) -> list:
    """``[relative path, size, mtime_ns]`` of a file, or of every file under a folder (sorted)."""
    try:
        if p.is_file():
            st = p.stat()
            return [[".", st.st_size, st.st_mtime_ns]]
    except OSError:
        return []
    out = []
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for f in sorted(files):
            q = Path(root, f)
            try:
                st = q.stat()
            except OSError:
                continue  # a dangling link: not an input the builder can read
            out.append([str(q.relative_to(p)), st.st_size, st.st_mtime_ns])
    return out


def _build_spec(row: SampleRow, rows_per_shard: int, qc: bool) -> dict:
    """What a part is built from, as JSON: the row (split excepted: it lives in the manifest only) and options."""
    from . import __version__

    return {"hescape_data": __version__, "schema": SCHEMA_VERSION, "technology": row.technology,
            "path": str(row.path), "sample": row.sample, "donor": row.donor, "tissue": row.tissue,
            "panel": row.panel, "he_image": row.he_image, "alignment": None if row.alignment is None else str(row.alignment),
            "options": dict(sorted(row.options.items())), "geometry": row.geometry().to_dict(),
            "rows_per_shard": int(rows_per_shard), "qc": bool(qc)}


def fingerprint(row: SampleRow, *, rows_per_shard: int = 2048, qc: bool = True) -> str:
    """SHA-256 (hex) of a row's build: the row (split excepted), its options, the geometry, the hescape-data
    version, and the relative path, size and modification time (ns) of every input file."""
    files = {str(p): _stat_tree(p) for p in row.inputs()}
    blob = json.dumps({"build": _build_spec(row, rows_per_shard, qc), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def parts_dir(out: str | os.PathLike) -> Path:
    """The hidden folder of finished per-sample parts of a samplesheet build of ``out``: ``.<out name>.parts``."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.parts"


def _part_path(parts: Path, row: SampleRow, fp: str) -> Path:
    return parts / f"{safe_filename(row.sample)}-{fp[:16]}"


_PART_RE = re.compile(r"^.+-[0-9a-f]{16}$")


def _finished(part: Path, sample: str) -> dict | None:
    """The manifest of a finished part of ``sample`` (a readable one-sample dataset), else None."""
    if not (part / MANIFEST).is_file():
        return None
    try:
        m = read_manifest(part)
    except HescapeDataError:
        return None
    return m if [s["name"] for s in m["samples"]] == [sample] else None


# ------------------------------------------------------------------------------------------------ building


@dataclass
class SampleStatus:
    """What happened to one sample: ``built``, ``skipped`` (a finished part was reused), ``up to date``, ``failed``."""

    sample: str
    technology: str
    status: str
    n_spots: int | None = None
    seconds: float | None = None
    error: str | None = None
    part: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class SamplesheetResult:
    """The outcome of :func:`build_from_samplesheet`: the dataset (None when nothing was written) and each sample."""

    out: Path | None
    samples: list[SampleStatus]
    jobs: int = 1

    @property
    def failed(self) -> list[SampleStatus]:
        return [s for s in self.samples if s.status == "failed"]

    def table(self) -> str:
        """The summary table (one line per sample; a failed sample with its one-line error)."""
        w = max([len("sample")] + [len(s.sample) for s in self.samples])
        lines = [f"{'sample':<{w}}  {'technology':<10}  {'status':<10}  {'spots':>7}  {'time':>8}  error"]
        for s in self.samples:
            spots = "-" if s.n_spots is None else str(s.n_spots)
            secs = "-" if s.seconds is None else f"{s.seconds:.1f} s"
            lines.append(f"{s.sample:<{w}}  {s.technology:<10}  {s.status:<10}  {spots:>7}  {secs:>8}  "
                         f"{s.error or ''}".rstrip())
        return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, (HescapeDataError, FileExistsError)):
        return text
    if isinstance(e, OSError):
        return f"{e.strerror or text}{f': {e.filename}' if e.filename else ''}; check the paths, permissions and free space"
    return f"{type(e).__name__}: {text} (an unexpected error: please report it with this line)"


def _run_part(task: dict) -> dict:
    """Build one sample's part (in a worker process, or in this one); never raises for a failed sample."""
    import warnings

    from .ingest import build_visium_dataset, build_visium_hd_dataset, build_xenium_dataset

    t0 = time.perf_counter()
    o, tech = task["options"], task["technology"]
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            geometry = SpotGeometry.from_dict(task["geometry"])
            patch = PatchOptions(min_tissue_fraction=o["min_tissue_fraction"], outside_spots=o["outside_spots"],
                                 max_upsample=o["max_upsample"],
                                 registration_check=not o["skip_registration_check"])
            common = {"sample": task["sample"], "donor": task["donor"], "source": o["source"], "split": "train",
                      "geometry": geometry, "patch": patch, "panel": task["panel"],
                      "duplicate_genes": o["duplicate_genes"], "missing_genes": o["missing_genes"],
                      "max_missing": o["max_missing"], "allow_non_integer_counts": o["allow_non_integer_counts"],
                      "overwrite": True, "progress": task["progress"], "qc": task["qc"],
                      "rows_per_shard": task["rows_per_shard"]}
            if tech == "xenium":
                build_xenium_dataset(task["path"], task["part"], he_image=task["he_image"],
                                     alignment=task["alignment"], tissue=task["tissue"],
                                     spots=SpotOptions(min_counts=o["min_counts"], min_cells=o["min_cells"]),
                                     counts_from=o["counts_from"], min_qv=o["min_qv"], **common)
            elif tech == "visium-hd":
                build_visium_hd_dataset(task["path"], task["part"], image=task["he_image"],
                                        bin_size_um=o["bin_size"], tissue=task["tissue"] or "unknown",
                                        matrix=o["matrix"],
                                        spots=SpotOptions(min_counts=o["min_counts"], min_cells=o["min_cells"]),
                                        **common)
            else:
                build_visium_dataset(task["path"], task["part"], image=task["he_image"],
                                     tissue=task["tissue"] or "unknown", matrix=o["matrix"],
                                     min_counts=o["min_counts"], **common)
        m = read_manifest(task["part"])
        return {"sample": task["sample"], "status": "built", "n_spots": m["n_rows"],
                "seconds": time.perf_counter() - t0, "warnings": _messages(caught)}
    except Exception as e:  # noqa: BLE001 - one failed sample must not stop the others; reported on one line
        return {"sample": task["sample"], "status": "failed", "error": _one_line(e),
                "seconds": time.perf_counter() - t0, "warnings": _messages(caught)}


def _messages(caught: list) -> list[str]:
    """The distinct messages of the recorded user warnings (the builders' checks), each on one line; library
    deprecation notices are left out."""
    return list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught or []
                              if issubclass(w.category, UserWarning)))


def _task(row: SampleRow, part: Path, rows_per_shard: int, qc: bool, progress: bool) -> dict:
    return {"sample": row.sample, "technology": row.technology, "path": str(row.path), "part": str(part),
            "donor": row.donor, "tissue": row.tissue, "panel": row.panel, "he_image": row.he_image,
            "alignment": None if row.alignment is None else str(row.alignment), "options": dict(row.options),
            "geometry": row.geometry().to_dict(), "rows_per_shard": int(rows_per_shard), "qc": bool(qc),
            "progress": bool(progress)}


_KILLED = ("its worker process was terminated abruptly (killed by a signal, e.g. the out-of-memory killer) while "
           "building it; build it alone (--jobs 1) to see why, or give the machine more memory")


def _log(msg: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"hescape-data: {msg}", file=sys.stderr)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
    """Set up a worker process: its builds cut patches on ``threads`` threads (the CPUs shared out among the
    workers) instead of one per CPU each, so that ``jobs`` workers do not oversubscribe the machine. The
    single-sample builders take no thread count, so the patch module's default is replaced, in this worker only."""
    from . import patches

    if hasattr(patches, "default_workers"):
        patches.default_workers = lambda: threads


def _run_pool(tasks: list[dict], jobs: int, run, progress: bool, on_done) -> None:
    """Run ``run(task)`` for every task in ``jobs`` spawned worker processes; ``on_done(task, result)`` for each.

    Each worker gets ``max(1, CPUs // jobs)`` patch threads (:func:`_init_worker`). A worker that dies breaks
    the pool: the unfinished tasks are then run one at a time, each in a fresh one-worker pool (all CPUs), so
    only a task that kills its own worker is reported failed (``_KILLED``).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    broken: list[dict] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(max(1, _cpus() // jobs),)) as ex:
        futures = {ex.submit(run, t): t for t in tasks}
        for f in as_completed(futures):
            t = futures[f]
            try:
                res = f.result()
            except BrokenProcessPool:
                broken.append(t)
                continue
            except Exception as e:  # noqa: BLE001 - a task function that raised (ours never does)
                res = {"sample": t["sample"], "status": "failed", "error": _one_line(e), "seconds": None}
            on_done(t, res)
    if broken:
        _log(f"a worker process died; building the {len(broken)} unfinished sample(s) one at a time", progress)
    for t in sorted(broken, key=lambda t: tasks.index(t)):
        if _finished(Path(t["part"]), t["sample"]):
            m = read_manifest(t["part"])
            on_done(t, {"sample": t["sample"], "status": "built", "n_spots": m["n_rows"], "seconds": None})
            continue
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker,
                                 initargs=(_cpus(),)) as ex:
            try:
                res = ex.submit(run, t).result()
            except BrokenProcessPool:
                res = {"sample": t["sample"], "status": "failed", "error": _KILLED, "seconds": None}
            except Exception as e:  # noqa: BLE001 - as above
                res = {"sample": t["sample"], "status": "failed", "error": _one_line(e), "seconds": None}
        on_done(t, res)


def _assembly_key(rows: list[SampleRow], fps: dict[str, str]) -> str:
    blob = json.dumps([[r.sample, fps[r.sample], r.split] for r in rows])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _existing_build(out: Path, parts: Path) -> dict | None:
    """The ``samplesheet`` record of an existing dataset at ``out`` built from a samplesheet into ``out``."""
    if not is_hescape_dataset(out):
        return None
    try:
        rec = json.loads((out / MANIFEST).read_text()).get("samplesheet")
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("parts") == str(parts) else None


def build_from_samplesheet(samplesheet: str | os.PathLike, out: str | os.PathLike, *, jobs: int = 1,
                           options: str | dict | None = None, overwrite: bool = False, rows_per_shard: int = 2048,
                           qc: bool = True, progress: bool = True, _run=None) -> SamplesheetResult:
    """Build one dataset at ``out`` from every sample of a samplesheet (see the module docstring).

    Parameters
    ----------
    samplesheet
        The CSV file (columns: :data:`COLUMNS`, optionally :data:`OPTIONAL_COLUMNS`).
    out
        The dataset directory. Finished per-sample parts are kept in :func:`parts_dir` (``.<out>.parts``) for
        re-runs; their shard files are hard-linked into ``out`` where the file system allows (no extra space).
    jobs
        Worker processes building samples at once (``spawn`` start method); 1 builds in this process.
    options
        Options for every row (JSON object, ``key=value;…`` or a dict), overridden by a row's ``options``.
    overwrite
        Replace an existing dataset at ``out`` (finished parts are still reused). Not needed to complete a
        dataset whose earlier build of this samplesheet had failed samples.
    rows_per_shard, qc, progress
        As ``hescape-data build`` (``--rows-per-shard``, ``--no-qc``, ``--quiet``).
    _run
        Tests only: the function that builds one part (default: this module's ``_run_part``); it must be
        importable by name in a worker process.

    Returns
    -------
    SamplesheetResult
        ``out`` (None when no sample could be built) and every sample's :class:`SampleStatus`. Samples that
        failed are not in the dataset; the others are.

    Raises
    ------
    InputFormatError, SplitLeakageError
        A bad samplesheet (:func:`read_samplesheet`); nothing is written.
    FileExistsError, OutputLocationError
        ``out`` exists and may not be replaced; nothing is written.
    PanelMismatchError
        Samples built with different genes (no ``panel`` given); the parts are kept.
    """
    from .merge import assemble

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        msg = f"--jobs: expected a whole number >= 1, found {jobs!r}; pass e.g. 2"
        raise HescapeDataError(msg)
    csv_path = Path(os.path.abspath(os.path.expanduser(samplesheet)))
    rows = read_samplesheet(csv_path, options=options, rows_per_shard=rows_per_shard)
    out = Path(os.path.abspath(out))
    parts = parts_dir(out)
    fps = {r.sample: fingerprint(r, rows_per_shard=rows_per_shard, qc=qc) for r in rows}
    key = _assembly_key(rows, fps)
    inputs = [csv_path] + [p for r in rows for p in r.inputs()]
    previous = _existing_build(out, parts)
    if previous is not None and previous.get("key") == key and not previous.get("failed") and not overwrite:
        check_output_location(out, overwrite=True, inputs=inputs)
        statuses = [SampleStatus(r.sample, r.technology, "up to date", n_spots=None) for r in rows]
        m = read_manifest(out)
        spots = {s["name"]: s["n_spots"] for s in m["samples"]}
        for s in statuses:
            s.n_spots = spots.get(s.sample)
        _log(f"{out} is up to date with {csv_path.name} (same rows, options and input files); nothing to do",
             progress)
        return SamplesheetResult(out, statuses, jobs)
    resume = previous is not None and bool(previous.get("failed"))
    replace_ok = overwrite or resume
    check_output_location(out, overwrite=replace_ok, inputs=inputs)
    if os.path.lexists(parts) and (parts.is_symlink() or not parts.is_dir()):
        msg = (f"--out {out}: expected {parts} to be the folder of this build's finished samples, found a "
               f"{'link' if parts.is_symlink() else 'file'}; move it away")
        raise OutputLocationError(msg)

    made = [p for p in reversed(parts.parents) if not p.exists()] + ([parts] if not parts.exists() else [])
    parts.mkdir(parents=True, exist_ok=True)
    for p in made:
        os.chmod(p, dir_mode())
    status: dict[str, SampleStatus] = {}
    todo: list[tuple[SampleRow, dict]] = []
    for r in rows:
        part = _part_path(parts, r, fps[r.sample])
        m = _finished(part, r.sample)
        if m is not None:
            status[r.sample] = SampleStatus(r.sample, r.technology, "skipped", n_spots=m["n_rows"], part=str(part))
        else:
            todo.append((r, _task(r, part, rows_per_shard, qc, progress and jobs == 1)))
    n = len(rows)
    skipped = [s.sample for s in status.values()]
    if skipped:
        _log(f"{len(skipped)} of {n} sample(s) already built with the same inputs and options, reused: "
             f"{', '.join(skipped)}", progress)
    run = _run or _run_part
    done = [len(skipped)]

    def on_done(task: dict, res: dict) -> None:
        row = next(r for r, t in todo if t is task)
        done[0] += 1
        st = SampleStatus(row.sample, row.technology, res["status"], n_spots=res.get("n_spots"),
                          seconds=res.get("seconds"), error=res.get("error"), part=task["part"],
                          warnings=list(res.get("warnings") or []))
        status[row.sample] = st
        for w in st.warnings:
            _log(f"{row.sample}: warning: {w}", progress)
        if st.status == "built":
            _log(f"[{done[0]}/{n}] {row.sample}: built, {st.n_spots} spots"
                 + (f" in {st.seconds:.1f} s" if st.seconds is not None else ""), progress)
        else:
            _log(f"[{done[0]}/{n}] {row.sample}: FAILED: {st.error}", progress)

    if todo:
        n_workers = min(jobs, len(todo))
        _log(f"building {len(todo)} sample(s) "
             + (f"in {n_workers} worker processes" if jobs > 1 else "in this process"), progress)
        if jobs == 1:
            for row, task in todo:
                _log(f"[{done[0] + 1}/{n}] {row.sample}: building ({row.technology}, {row.path})", progress)
                on_done(task, run(task))
        else:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n, initial=len(skipped), desc="samples", unit="sample", file=sys.stderr)
            try:
                def tick(task, res):
                    on_done(task, res)
                    if bar is not None:
                        bar.update(1)

                _run_pool([t for _, t in todo], n_workers, run, progress, tick)
            finally:
                if bar is not None:
                    bar.close()

    results = [status[r.sample] for r in rows]
    ok = [r for r in rows if status[r.sample].status in ("built", "skipped")]
    failed = {s.sample: s.error for s in results if s.status == "failed"}
    if not ok:
        if not any(parts.iterdir()):
            for p in reversed(made):
                try:
                    p.rmdir()
                except OSError:
                    break
        return SamplesheetResult(None, results, jobs)
    items = []
    for r in ok:
        part = Path(status[r.sample].part)
        items.append((part, read_manifest(part)))
    extra = {"samplesheet": {"path": str(csv_path), "parts": str(parts), "key": key, "fingerprints": fps,
                             "failed": failed, "jobs": jobs}}
    written = assemble(items, out, overwrite=replace_ok, inputs=inputs,
                       labels=[f"sample {r.sample} (line {r.line})" for r in ok],
                       split_of={r.sample: r.split for r in ok}, extra=extra)
    keep = {Path(status[r.sample].part).name for r in ok}
    for d in parts.iterdir():  # parts of earlier fingerprints of these (or removed) samples
        if d.name not in keep and _PART_RE.match(d.name) and d.is_dir() and not d.is_symlink() \
                and (is_hescape_dataset(d) or not any(d.iterdir())):
            shutil.rmtree(d, ignore_errors=True)
    return SamplesheetResult(written, results, jobs)
