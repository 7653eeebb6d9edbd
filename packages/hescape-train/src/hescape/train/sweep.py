"""Sweeps: ``hescape-train sweep GRID.yaml`` trains one run per point of a grid of options.

A grid file (YAML or JSON) holds::

    out_dir: sweeps/encoders          # the sweep folder: one run directory per grid point, sweep.json, report.*
    base:                             # options of every run, the keys of `hescape-train key=value`
      data.path: datasets/breast      #   (dotted keys, or nested mappings of the sections data/model/optim/log)
      epochs: 8
    grid:                             # key → list of values; the runs are the cartesian product, in file order
      model.image: [uni, conch]       #   (the last key varies fastest)
      model.gene: [mlp, drvi]
      seed: [0, 1, 2]
    name: "{image}-{gene}-s{seed}"    # optional run-name template ({key}: a grid/base key or its last part)

Every grid point becomes the overrides ``base + point + out_dir=<sweep folder> + run_name=<name>`` and is checked
with :func:`hescape.train.config.load_config` before anything runs or is created. A run's name is derived from its
grid point alone (``image=uni__gene=mlp__seed=0``: each grid key by the last part of its dotted name, then its value
made file-safe; a value that had to be changed, or is longer than 40 characters, ends in 8 hex digits of its SHA-1),
so that the same grid point always lands in the same directory: adding values to a grid keeps the existing runs.

Relative paths in a grid file (``out_dir``, ``data.path``, ``model.*_weights``, ``model.init_checkpoint``, and the
paths inside ``model.*_options``) mean what they mean on the command line: relative to the current directory the
sweep is started in, not to the grid file's folder. This is deliberate: each entry is a ``hescape-train key=value``
override, ``--emit`` prints commands for the same directory, a run's ``config.json`` records the values as given
(and is compared with the grid to recognise the run), and the paths inside encoder options are read by the encoders
themselves, which know nothing of the grid file. Start the sweep and every array task from one folder, or give
absolute paths. A missing path is refused before anything runs, in one line naming the grid file, the grid point and
the path resolved against the current directory, and saying so when the path does exist beside the grid file.

What a run's directory says about it (read afresh each time; ``sweep.json`` is a record of it, never trusted):

``finished``
    ``results.json`` is there: skipped.
``interrupted``
    ``config.json`` but no ``results.json`` (killed, a time limit, or running in another process): resumed with
    :func:`hescape.train.config.resume_config`, ending exactly where an uninterrupted run would have.
``pending``
    no directory yet: trained as a new run.
``failed``
    the last attempt stopped with a one-line error (a refused option, a diverged loss), kept in
    ``<sweep>/.errors/<name>.txt``: tried again (resumed when it has a ``config.json``) by the next sweep.
``conflict``
    the directory holds a run made with other options than the grid now gives it (or is not a run): never touched;
    change ``out_dir`` or remove the directory.

Importing this module loads no torch: ``--list`` and ``--emit`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import sys
import textwrap
import time
import typing
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .config import (
    RESUMABLE_KEYS,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    file_relative_hint,
    load_config,
    resume_config,
)
from .errors import HescapeConfigError

__all__ = ["Sweep", "SweepRun", "load_sweep", "check_encoder_names", "run_status", "sweep_statuses", "train_run",
           "run_sweep", "write_sweep_index", "write_sweep_report", "build_parser", "main", "STATUSES", "SWEEP_FORMAT"]

SWEEP_FORMAT = "hescape-train-sweep/1"
#: Every status a run of a sweep can have (see the module docstring); ``running`` only in ``sweep.json``, for the
#: run the writing process is training.
STATUSES = ("finished", "interrupted", "pending", "failed", "conflict", "running")
#: Top-level keys of a grid file.
_GRID_KEYS = ("out_dir", "base", "grid", "name")
#: Options the sweep sets itself.
_SET_BY_SWEEP = ("out_dir", "run_name")
#: Options the report table already shows (the row's encoders and fine-tuning modes, the column's panel) or that it
#: aggregates over (seed); the other keys a grid varies become the row's variant.
_SHOWN_BY_REPORT = ("model.image", "model.gene", "model.image_finetune", "model.gene_finetune", "data.path",
                    "data.panel", "seed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_VALUE = 40
_MAX_NAME = 200


@dataclass(frozen=True)
class SweepRun:
    """One grid point.

    ``point`` maps each grid key to its value as an override string (grid order); ``overrides`` are every
    ``key=value`` of the run (base, point, ``out_dir``, ``run_name``), as :func:`load_config` takes them.
    """

    index: int
    name: str
    point: dict[str, str]
    overrides: tuple[str, ...]
    run_dir: Path

    def describe(self) -> str:
        """The grid point as ``key=value`` pairs (the full keys)."""
        return ", ".join(f"{k}={v}" for k, v in self.point.items())


@dataclass(frozen=True)
class Sweep:
    """A grid file, expanded and checked: ``runs`` in grid order (``index`` = position)."""

    grid_file: Path
    out_dir: Path
    base: dict[str, str]
    grid: dict[str, list[str]]
    short: dict[str, str]
    runs: list[SweepRun]

    @property
    def errors_dir(self) -> Path:
        return self.out_dir / ".errors"

    def error_file(self, run: SweepRun) -> Path:
        return self.errors_dir / f"{run.name}.txt"


# -- reading a grid file ------------------------------------------------------------------------------------------

def _is_section(dotted: str) -> bool:
    """Whether ``dotted`` names a section of :class:`TrainConfig` (``model``, ``data``…), not an option."""
    obj: typing.Any = TrainConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj):
            return False
        hints = typing.get_type_hints(obj)
        if part not in hints:
            return False
        obj = hints[part]
    return dataclasses.is_dataclass(obj)


def _flatten(mapping: dict, where: str, prefix: str = "") -> dict[str, typing.Any]:
    """Nested section mappings (``model: {image: uni}``) as dotted keys (``model.image``)."""
    out: dict[str, typing.Any] = {}
    for k, v in mapping.items():
        if not isinstance(k, str) or not k.strip():
            msg = f"{where}: expected option names as keys (e.g. model.image), found {k!r}"
            raise HescapeConfigError(msg)
        key = prefix + k.strip()
        items = _flatten(v, where, key + ".") if isinstance(v, dict) and _is_section(key) else {key: v}
        for kk, vv in items.items():
            if kk in out:
                msg = f"{where}: option {kk!r} is given twice (as a dotted key and inside its section); keep one"
                raise HescapeConfigError(msg)
            out[kk] = vv
    return out


def _override_text(value: typing.Any, where: str) -> str:
    """A YAML value as the text of a ``key=value`` override (what :func:`load_config` parses back)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr of a float reads back to the same float
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return ",".join(_override_text(v, where) for v in value)
    msg = f"{where}: expected a number, text, true/false, a list or a mapping, found {type(value).__name__}"
    raise HescapeConfigError(msg)


def _file_safe(value: str) -> str:
    """``value`` as part of a directory name: kept when it is short and made of ``A-Za-z0-9._+-``, else its safe
    characters (at most 24) and 8 hex digits of the SHA-1 of the original, so two values never share a name."""
    safe = _UNSAFE.sub("-", value).strip("-.")
    if safe == value and 0 < len(safe) <= _MAX_VALUE:
        return safe
    digest = hashlib.sha1(value.encode("utf-8")).hexdigest()[:8]
    head = safe[:24].rstrip("-.")
    return f"{head}-{digest}" if head else digest


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each key by its last dotted part (``model.image`` → ``image``), or in full when two keys share that part."""
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts = Counter(last.values())
    return {k: last[k] if counts[last[k]] == 1 else k for k in keys}


def _default_name(point: dict[str, str], short: dict[str, str]) -> str:
    name = "__".join(f"{short[k]}={_file_safe(v)}" for k, v in point.items())
    if len(name) > _MAX_NAME:
        name = f"{name[:150]}__{hashlib.sha1(name.encode('utf-8')).hexdigest()[:12]}"
    return name


def _template_name(template: str, values: dict[str, str], short: dict[str, str], where: str) -> str:
    lookup = dict(values)
    lookup.update({s: values[k] for k, s in short.items()})

    def sub(m: re.Match) -> str:
        key = m.group(1).strip()
        if key not in lookup:
            close = difflib.get_close_matches(key, list(lookup), n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            msg = (f"{where}: name template {template!r} uses {{{key}}}, which is no grid or base key{hint}; "
                   f"use one of {', '.join('{' + k + '}' for k in lookup)}")
            raise HescapeConfigError(msg)
        return _file_safe(lookup[key])

    return re.sub(r"\{([^{}]*)\}", sub, template)


def _read_grid_file(path: Path) -> dict:
    import yaml

    if not path.is_file():
        msg = f"grid file {path} does not exist; give a YAML or JSON file with out_dir, base and grid"
        raise HescapeConfigError(msg)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        msg = f"grid file {path} is not valid YAML/JSON: {' '.join(str(e).split())}"
        raise HescapeConfigError(msg) from None
    if not isinstance(data, dict):
        msg = (f"grid file {path}: expected a mapping with out_dir, base and grid at the top level, found "
               f"{type(data).__name__}")
        raise HescapeConfigError(msg)
    unknown = [k for k in data if k not in _GRID_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _GRID_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = (f"grid file {path}: unknown top-level key {unknown[0]!r}{hint}; expected {', '.join(_GRID_KEYS)} "
               "(run options go under base: or grid:)")
        raise HescapeConfigError(msg)
    return data


def load_sweep(grid_file: str | os.PathLike) -> Sweep:
    """Read a grid file, expand the grid and check every run's configuration; creates nothing.

    Parameters
    ----------
    grid_file
        YAML/JSON with ``out_dir`` (the sweep folder, relative to the current directory as hescape-train's
        ``out_dir`` is), ``base`` (options of every run), ``grid`` (option → list of values) and an optional
        ``name`` template (see the module docstring). Every relative path in it is read from the current directory,
        as on the command line, not from the grid file's folder.

    Returns
    -------
    Sweep
        The runs in grid order: the cartesian product of the grid's lists, the last key varying fastest.

    Raises
    ------
    HescapeConfigError
        A malformed grid file, an option the sweep sets itself (``out_dir``, ``run_name``), an option both in
        ``base`` and ``grid``, an empty or repeated value list, two runs with the same name, or any option
        :func:`load_config` refuses — one line naming the grid point and the option.
    """
    path = Path(grid_file)
    data = _read_grid_file(path)
    where = f"grid file {path}"
    out_dir = data.get("out_dir")
    if not isinstance(out_dir, str) or not out_dir.strip():
        msg = f"{where}: expected out_dir: the sweep folder (e.g. out_dir: sweeps/encoders), found {out_dir!r}"
        raise HescapeConfigError(msg)
    base_raw, grid_raw = data.get("base") or {}, data.get("grid")
    for key, value in (("base", base_raw), ("grid", grid_raw)):
        if not isinstance(value, dict) or (key == "grid" and not value):
            msg = (f"{where}: expected {key}: a mapping of options to "
                   f"{'values' if key == 'base' else 'lists of values (e.g. seed: [0, 1, 2])'}, found {value!r}")
            raise HescapeConfigError(msg)
    base = {k: _override_text(v, f"{where}, base {k}") for k, v in _flatten(base_raw, f"{where}, base").items()}
    grid: dict[str, list[str]] = {}
    for k, values in _flatten(grid_raw, f"{where}, grid").items():
        if _is_section(k):
            msg = (f"{where}: grid {k!r} is a section of options; list the values of its options instead "
                   f"(e.g. {k}.…: [a, b])")
            raise HescapeConfigError(msg)
        if not isinstance(values, list) or not values:
            msg = f"{where}: grid {k!r}: expected a non-empty list of values (e.g. {k}: [a, b]), found {values!r}"
            raise HescapeConfigError(msg)
        texts = [_override_text(v, f"{where}, grid {k}") for v in values]
        repeated = [t for t, n in Counter(texts).items() if n > 1]
        if repeated:
            msg = f"{where}: grid {k!r} lists {repeated[0]!r} more than once; list each value once"
            raise HescapeConfigError(msg)
        grid[k] = texts
    for k in (*base, *grid):
        if k in _SET_BY_SWEEP:
            msg = (f"{where}: {k!r} is set by the sweep (out_dir: the sweep folder; run_name: derived from the grid "
                   "point or the name: template); remove it from base/grid")
            raise HescapeConfigError(msg)
    both = [k for k in grid if k in base]
    if both:
        msg = f"{where}: {both[0]!r} is in both base and grid; keep it in one of them"
        raise HescapeConfigError(msg)
    template = data.get("name")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        msg = f"{where}: name: expected a run-name template such as '{{image}}-s{{seed}}', found {template!r}"
        raise HescapeConfigError(msg)
    out = Path(out_dir.strip())
    base_overrides = [f"{k}={v}" for k, v in base.items()]
    try:  # the base alone first, so that its mistakes are named once
        load_config(None, [*base_overrides, f"out_dir={out}"])
    except HescapeConfigError as e:
        key = getattr(e, "key", None)
        msg = f"{where}, base: {e}{file_relative_hint(key, base.get(key or ''), path, 'grid file')}"
        raise HescapeConfigError(msg) from None
    short = _short_names(list(grid))
    runs: list[SweepRun] = []
    names: dict[str, int] = {}
    for i, values in enumerate(itertools.product(*grid.values())):
        point = dict(zip(grid, values, strict=True))
        pt = ", ".join(f"{k}={v}" for k, v in point.items())
        name = (_template_name(template, {**base, **point}, short, where) if template
                else _default_name(point, short))
        if name in names:
            msg = (f"{where}: runs {names[name]} and {i} ({pt}) would both be named {name!r}; put every grid key in "
                   "the name: template (or drop name: to use the derived names)")
            raise HescapeConfigError(msg)
        names[name] = i
        overrides = (*base_overrides, *(f"{k}={v}" for k, v in point.items()), f"out_dir={out}", f"run_name={name}")
        try:
            load_config(None, list(overrides))
        except HescapeConfigError as e:
            key = getattr(e, "key", None)
            hint = file_relative_hint(key, {**base, **point}.get(key or ""), path, "grid file")
            msg = f"{where}, run {i} ({pt}): {e}{hint}"
            raise HescapeConfigError(msg) from None
        runs.append(SweepRun(index=i, name=name, point=point, overrides=overrides, run_dir=out / name))
    return Sweep(grid_file=path, out_dir=out, base=base, grid=grid, short=short, runs=runs)


def check_encoder_names(sweep: Sweep) -> None:
    """Every run's model preset and encoder names against the hescape-models registries (imports hescape.models).

    Raises
    ------
    HescapeConfigError
        An unknown preset or encoder, naming the grid point.
    """
    from hescape.models import get_model_cfg
    from hescape.models.errors import HescapeModelError
    from hescape.models.zoo import get_encoder_entry

    for run in sweep.runs:
        cfg = load_config(None, list(run.overrides), validate=False)
        try:
            get_model_cfg(cfg.model.name)
            for modality in ("image", "gene"):
                if getattr(cfg.model, modality):
                    get_encoder_entry(getattr(cfg.model, modality), modality)
        except HescapeModelError as e:
            msg = f"grid file {sweep.grid_file}, run {run.index} ({run.describe()}): {' '.join(str(e).split())}"
            raise HescapeConfigError(msg) from None


# -- the state of each run, read from its directory -----------------------------------------------------------------

def _dotted(d: dict, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and _is_section(prefix + k):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _config_conflict(run: SweepRun) -> str | None:
    """Why the run in ``run.run_dir`` is not this grid point's run (options that differ), or None."""
    cfg_file = run.run_dir / "config.json"
    try:
        found = _dotted(config_to_dict(config_from_dict(json.loads(cfg_file.read_text()), source=str(cfg_file))))
    except (OSError, ValueError, HescapeConfigError) as e:
        return f"{cfg_file} cannot be read ({' '.join(str(e).split())})"
    want = _dotted(config_to_dict(load_config(None, list(run.overrides), validate=False)))
    ignore = {*_SET_BY_SWEEP, *RESUMABLE_KEYS}
    diff = [k for k in want if k not in ignore and want[k] != found.get(k)]
    if not diff:
        return None
    shown = "; ".join(f"{k} is {json.dumps(found.get(k))} there, {json.dumps(want[k])} in the grid" for k in diff[:3])
    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
    return f"{run.run_dir} holds a run with other options: {shown}{more}"


def run_status(sweep: Sweep, run: SweepRun) -> tuple[str, str | None]:
    """``(status, detail)`` of one run, from its directory (see the module docstring); ``detail`` is the error of a
    failed run or the reason of a conflict."""
    d = run.run_dir
    err = sweep.error_file(run)
    error = " ".join(err.read_text().split()) if err.is_file() else None
    if (d / "config.json").is_file():
        conflict = _config_conflict(run)
        if conflict:
            return "conflict", f"{conflict}; change out_dir or remove that directory"
        if (d / "results.json").is_file():
            return "finished", None
        return ("failed", error) if error else ("interrupted", None)
    if d.is_symlink() or (d.exists() and (not d.is_dir() or any(d.iterdir()))):
        return "conflict", f"{d} exists but is not a hescape-train run (no config.json); remove it to train this run"
    return ("failed", error) if error else ("pending", None)


def sweep_statuses(sweep: Sweep) -> list[tuple[str, str | None]]:
    """:func:`run_status` of every run, in grid order."""
    return [run_status(sweep, r) for r in sweep.runs]


def _is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun/srun launch (only rank 0 writes the sweep's own files and prints)."""
    from .cli import launch_rank

    return launch_rank() == 0


def write_sweep_index(sweep: Sweep, running: int | None = None) -> Path:
    """Write ``<sweep>/sweep.json`` atomically from the runs' directories as they are now.

    It lists every run: ``index``, ``name``, ``overrides`` (the grid point), ``run_dir``, ``status`` and ``error``
    (with the grid file, ``base`` and the time). Several processes of a Slurm array may write it; each write is a
    whole snapshot of the disk, so the last one is right. ``running``: the index this process is about to train.
    """
    from .atomic import atomic_write_json  # loads hescape.data (and torch): only when writing

    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for run, (status, detail) in zip(sweep.runs, sweep_statuses(sweep), strict=True):
        if run.index == running and status in ("pending", "interrupted", "failed"):
            status, detail = "running", None
        runs.append({"index": run.index, "name": run.name, "overrides": [f"{k}={v}" for k, v in run.point.items()],
                     "run_dir": str(run.run_dir), "status": status, "error": detail})
    doc = {"format": SWEEP_FORMAT, "grid_file": str(sweep.grid_file), "out_dir": str(sweep.out_dir),
           "base": [f"{k}={v}" for k, v in sweep.base.items()], "grid": sweep.grid,
           "updated": datetime.now(UTC).isoformat(timespec="seconds"),
           "counts": dict(Counter(r["status"] for r in runs)), "runs": runs}
    return atomic_write_json(sweep.out_dir / "sweep.json", doc)


# -- running -----------------------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _recall_text(run_dir: Path, k: int) -> str:
    try:
        res = json.loads((run_dir / "results.json").read_text())
        return f"R@{k} image → gene {res[f'i2g_R@{k}']:.3f}, gene → image {res[f'g2i_R@{k}']:.3f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "results.json unreadable"


def train_run(sweep: Sweep, run: SweepRun) -> tuple[str, str | None]:
    """Train one run: resumed when its directory holds a ``config.json`` (``interrupted``, or ``failed`` after it
    started), else a new run; returns ``("finished", None)`` or ``("failed", error)``.

    A user error (a refused option, a diverged loss, a missing file: the exceptions ``hescape-train`` prints as one
    line) is recorded in ``<sweep>/.errors/<name>.txt`` and returned; any other exception propagates.
    """
    from .cli import _user_error_types
    from .trainer import train  # the training stack loads only when a run starts

    main_proc = _is_main_process()
    try:
        if (run.run_dir / "config.json").is_file():
            result = train(resume_config(run.run_dir), resume=run.run_dir)
        else:
            if main_proc and run.run_dir.is_dir() and not any(run.run_dir.iterdir()):
                run.run_dir.rmdir()  # claimed but never filled (killed between mkdir and config.json)
            result = train(load_config(None, list(run.overrides)))
    except Exception as e:
        if not isinstance(e, _user_error_types()):
            raise
        error = _one_line(e)
        if main_proc:
            from .atomic import atomic_write_text

            sweep.errors_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(sweep.error_file(run), error + "\n")
        return "failed", error
    if main_proc and result is not None:
        sweep.error_file(run).unlink(missing_ok=True)
    return "finished", None


def run_sweep(sweep: Sweep, indices: list[int] | None = None, *, k: int = 5,
              log=print) -> dict[int, tuple[str, str | None]]:
    """Train the runs of ``sweep`` (all, or ``indices``) one after the other in this process.

    Finished runs are skipped, interrupted ones resumed, failed and pending ones trained; a run that fails with a
    user error is recorded and the sweep goes on; ``conflict`` runs are left alone. ``sweep.json`` is rewritten
    before and after each run. The statuses are read once, before the first run.

    Returns
    -------
    dict
        index → ``(status, detail)`` after this call, for the runs asked for.
    """
    check_encoder_names(sweep)
    main_proc = _is_main_process()
    todo = sweep.runs if indices is None else [sweep.runs[i] for i in indices]
    statuses = {r.index: run_status(sweep, r) for r in todo}
    n = len(sweep.runs)
    out: dict[int, tuple[str, str | None]] = {}
    for run in todo:
        status, detail = statuses[run.index]
        head = f"[{run.index + 1}/{n}] {run.name}"
        if status == "finished":
            log(f"{head}: finished, skipped ({_recall_text(run.run_dir, k)})")
            out[run.index] = (status, detail)
            continue
        if status == "conflict":
            log(f"{head}: conflict, left alone: {detail}")
            out[run.index] = (status, detail)
            continue
        action = "resuming" if (run.run_dir / "config.json").is_file() else "training"
        log(f"{head}: {action} ({run.describe()})")
        if main_proc:
            write_sweep_index(sweep, running=run.index)
        t0 = time.time()
        out[run.index] = train_run(sweep, run)
        if main_proc:
            write_sweep_index(sweep)
        status, detail = out[run.index]
        if status == "finished":
            log(f"{head}: finished in {time.time() - t0:.0f} s ({_recall_text(run.run_dir, k)})")
        else:
            log(f"{head}: failed: {detail}")
    return out


# -- the combined table ---------------------------------------------------------------------------------------------

def _variants(sweep: Sweep, runs: list[SweepRun], k: int) -> list[str]:
    """Row variants for :func:`hescape.eval.report.write_report`: the grid keys with more than one value, other than
    those the table shows or aggregates over (:data:`_SHOWN_BY_REPORT`); all varying keys but ``seed`` when that
    is needed to keep runs that differ only in their seed apart (two datasets of one panel, say)."""
    from hescape.eval.report import load_runs

    varying = [key for key, values in sweep.grid.items() if len(values) > 1 and key != "seed"]
    records = load_runs([r.run_dir for r in runs], k=k)
    labels: list[str] = []
    for keys in ([key for key in varying if key not in _SHOWN_BY_REPORT], varying):
        labels = [", ".join(f"{sweep.short[key]}={r.point[key]}" for key in keys) for r in runs]
        groups = {(rec.model, rec.panel, rec.seed, lab) for rec, lab in zip(records, labels, strict=True)}
        if len(groups) == len(runs):
            break
    return labels


def write_sweep_report(sweep: Sweep, *, k: int = 5, figures: bool = True) -> dict | None:
    """The combined table of the finished runs, through :func:`hescape.eval.report.write_report`: one row per
    encoders and variant (the other grid keys that vary), mean(std) of test Recall@k over seeds, into
    ``<sweep>/report.md``, ``report.csv``, ``report_long.csv`` and ``recall_at_<k>.png``. None when no run has
    finished.

    Raises
    ------
    HescapeEvalError
        As :func:`hescape.eval.report.write_report` (e.g. runs whose test galleries differ in one column).
    """
    finished = [r for r, (s, _) in zip(sweep.runs, sweep_statuses(sweep), strict=True) if s == "finished"]
    if not finished:
        return None
    from hescape.eval.report import write_report

    title = f"Sweep {sweep.out_dir}: test Recall@{k} ({len(finished)} of {len(sweep.runs)} runs finished)"
    return write_report([r.run_dir for r in finished], sweep.out_dir, k=k, figures=figures, title=title,
                        variants=_variants(sweep, finished, k))


# -- the command ---------------------------------------------------------------------------------------------------

_EPILOG = """\
GRID.yaml:
  out_dir: sweeps/encoders              the sweep folder (run directories, sweep.json, report.md/.csv)
  base: {data.path: datasets/breast, epochs: 8}      options of every run (the keys of hescape-train key=value)
  grid: {model.image: [uni, conch], seed: [0, 1, 2]} the runs: every combination, in file order
  name: "{image}-s{seed}"                optional run-name template (default: image=uni__seed=0)
  relative paths (out_dir, data.path, weights) are read from the current directory, as on the command line,
  not from the grid file's folder: start the sweep (and every array task) from one folder, or use absolute paths

examples:
  hescape-train sweep grid.yaml                   train every run in turn (skip finished, resume interrupted),
                                                  then write report.md / report.csv (mean(std) over seeds)
  hescape-train sweep grid.yaml --list            each run with its status
  hescape-train sweep grid.yaml --emit            one command per run still to train (for a job array)
  hescape-train sweep grid.yaml --index $SLURM_ARRAY_TASK_ID   one run (one Slurm array task)
  hescape-train sweep grid.yaml --report          the combined table of the runs finished so far
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hescape-train sweep",
        description=textwrap.dedent("""\
            Train one run per point of a grid of options (encoders × panels × seeds × any option), each in its own
            directory of the sweep folder, named after its grid point. Finished runs are skipped and interrupted
            ones resumed, so the same command continues a sweep after a crash. Every run's options are checked
            before the first run starts."""),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid_file", metavar="GRID.yaml", help="the grid file (YAML or JSON)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print every run with its status and exit")
    mode.add_argument("--emit", action="store_true",
                      help="print one shell command per run still to train (hescape-train sweep GRID --index I)")
    mode.add_argument("--index", type=int, metavar="I", help="train only run I (0-based; e.g. $SLURM_ARRAY_TASK_ID)")
    mode.add_argument("--report", action="store_true", help="only write the combined table of the finished runs")
    p.add_argument("--k", type=int, default=5, help="the k of Recall@k in the table (default 5)")
    p.add_argument("--no-figures", action="store_true", help="no recall_at_K.png beside the table")
    return p


def _print_list(sweep: Sweep) -> None:
    statuses = sweep_statuses(sweep)
    counts = Counter(s for s, _ in statuses)
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    print(f"sweep {sweep.out_dir}: {len(sweep.runs)} runs ({summary})")
    width = max(len(r.name) for r in sweep.runs)
    for run, (status, detail) in zip(sweep.runs, statuses, strict=True):
        line = f"{run.index:>4}  {status:<11}  {run.name:<{width}}"
        print(f"{line}  {detail}" if detail else line.rstrip())


def _emit(sweep: Sweep, grid_arg: str) -> None:
    for run, (status, detail) in zip(sweep.runs, sweep_statuses(sweep), strict=True):
        if status == "conflict":
            print(f"# run {run.index} ({run.name}) left out: {detail}", file=sys.stderr)
        elif status != "finished":
            print(f"hescape-train sweep {shlex.quote(grid_arg)} --index {run.index}")


def _report(sweep: Sweep, k: int, figures: bool) -> bool:
    res = write_sweep_report(sweep, k=k, figures=figures)
    if res is None:
        print(f"report: no finished run in {sweep.out_dir} yet")
        return False
    print()
    print(res["table"].to_markdown())
    print()
    print("report: " + ", ".join(str(res[key]) for key in ("markdown", "csv", "long_csv")))
    return True


def main(argv: list[str] | None = None) -> int:
    """``hescape-train sweep GRID.yaml [--list | --emit | --index I | --report]``; returns the exit status (2: a bad
    grid, or a run that failed)."""
    from .cli import user_error_exit

    args = build_parser().parse_args(argv)
    try:
        if args.k < 1:
            msg = f"--k: expected a positive integer (e.g. --k 5), found {args.k}"
            raise HescapeConfigError(msg)
        sweep = load_sweep(args.grid_file)
        if args.index is not None and not 0 <= args.index < len(sweep.runs):
            msg = (f"--index {args.index}: the sweep has {len(sweep.runs)} runs, expected 0 to {len(sweep.runs) - 1} "
                   f"(#SBATCH --array=0-{len(sweep.runs) - 1})")
            raise HescapeConfigError(msg)
        if args.list:
            _print_list(sweep)
            return 0
        if args.emit:
            _emit(sweep, args.grid_file)
            return 0
        if args.report:
            return 0 if _report(sweep, args.k, not args.no_figures) else 2
        indices = None if args.index is None else [args.index]
        results = run_sweep(sweep, indices, k=args.k, log=print if _is_main_process() else lambda line: None)
        bad = {i: r for i, r in results.items() if r[0] in ("failed", "conflict")}
        if args.index is None and _is_main_process():
            _report(sweep, args.k, not args.no_figures)
            done = sum(r[0] == "finished" for r in results.values())
            print(f"sweep {sweep.out_dir}: {done} of {len(sweep.runs)} runs finished"
                  + (f", {len(bad)} failed or in conflict (see {sweep.out_dir / 'sweep.json'})" if bad else ""))
        return 2 if bad else 0
    except Exception as e:
        return user_error_exit("hescape-train sweep", e)
