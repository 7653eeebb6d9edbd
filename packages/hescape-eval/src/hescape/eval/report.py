"""Paper-style result tables over many runs: ``hescape-eval report RUN_DIR ... --out DIR``.

Layout (HESCAPE paper, Table 2: "Complete Test Recall@5 Results for both Image-to-Gene (I2G) and Gene-to-Image
(G2I) tasks across different tissue panels ... Best results are in **bold**, second-best are underlined"; the seed
copy is ``shared/seed/hescape-paper.txt``): one row per model, named ``<gene encoder>-<image encoder>`` as the paper
does (``DRV1-Gigapath``), one column per (panel, direction), each cell ``mean(std)`` over the runs' seeds. Runs of
the same encoders that differ in other settings (a sweep over the loss or the learning rate) are told apart by a
``variant`` given with each run (:func:`load_run`), shown after the model name: ``mlp-uni [loss=siglip]``.

What a run directory holds (written by ``hescape-train``; ``hescape/train/trainer.py``, read only):

``config.json``
    The resolved :class:`TrainConfig`: ``seed``, ``model.name`` (preset), ``model.image`` / ``model.gene`` (encoder
    names, ``null`` = the preset's), ``data.path`` (dataset directory holding ``manifest.json``, ``null`` = the
    embedded synthetic default of ``data.panel``), ``format`` ``"hescape-train-config/1"``.
``results.json``
    Test retrieval of the best checkpoint: ``i2g_R@5``, ``i2g_R@5_chance``, ``i2g_protocol`` (``"full"``),
    ``i2g_pool`` (gallery size), the same with ``g2i_``, and ``last`` (the last checkpoint's record).
``embeddings/test.npz``
    The best checkpoint's test embeddings (:mod:`hescape.eval.io`), from which any protocol can be recomputed.

Aggregation rules (all stated in the table caption):

* ``mean`` over seeds and the *sample* standard deviation (``ddof=1``); a cell of fewer than 3 seeds shows
  ``n``, a single seed shows ``—`` for the std.
* Best (higher mean) in **bold**, second-best ``<u>underlined</u>`` per column, comparing means rounded to the
  printed precision, so equal printed values share a mark (the next distinct value is second).
* A column never mixes retrieval protocols or pool sizes: a Recall@k of 0.3 in a gallery of 64 and in one of
  5,000 are different quantities (chance 0.078 against 0.001); such a request fails with
  :class:`~hescape.eval.errors.HescapeEvalError`, naming the runs.
* Chance (``k / pool`` for one positive, :func:`hescape.eval.chance_recall`) is given in a row of its own.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError
from .io import remove_if_empty

__all__ = ["ReportTable", "RunRecord", "build_table", "config_variants", "load_run", "load_runs", "plot_recall",
           "existing_report_files", "report_files", "write_report"]

DIRECTIONS = ("i2g", "g2i")
_DIR_LABEL = {"i2g": "I2G", "g2i": "G2I"}
#: Column names of the paper's Table 2 for the vendored panel names, in the paper's column order.
PAPER_PANEL_NAMES = {
    "human-5k-panel": "5K", "human-multi-tissue-panel": "Multi", "human-immuno-oncology-panel": "ImmOnc",
    "human-colon-panel": "Colon", "human-breast-panel": "Breast", "human-lung-healthy-panel": "Lung",
    "human-skin-panel": "Skin",
}
_DIGITS = 3


@dataclass(frozen=True)
class RunRecord:
    """One run's test Recall@k in both directions, with what the table groups it by.

    ``recall`` and ``chance`` map ``"i2g"`` / ``"g2i"`` to fractions in [0, 1]; ``pool`` is the gallery size (the
    test set under ``"full"``, the batch size ``B`` under ``"batch:B"``); ``source`` is ``"results.json"`` or
    ``"embeddings"`` (recomputed); ``n_test`` the number of test spots (``None`` when unknown).
    """

    path: Path
    image: str
    gene: str
    seed: int
    panel: str
    k: int
    recall: dict[str, float]
    chance: dict[str, float]
    protocol: str
    pool: int | None
    source: str
    variant: str = ""
    n_test: int | None = None

    @property
    def model(self) -> str:
        """Row label in the paper's style, ``<gene encoder>-<image encoder>``, then ``[variant]`` when the run has
        one (runs of the same encoders that differ in other settings, e.g. ``mlp-uni [loss=siglip]``)."""
        label = f"{self.gene}-{self.image}"
        return f"{label} [{self.variant}]" if self.variant else label


def _fail(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise _fail(what=what, expected=f"a readable JSON object in {path}", found=f"{type(exc).__name__}: {exc}",
                    fix="rerun the training, or remove this run from the report") from None
    if not isinstance(data, dict):
        raise _fail(what=what, expected=f"a JSON object in {path}", found=type(data).__name__,
                    fix="rerun the training, or remove this run from the report")
    return data


def _encoder_names(model: dict, run: Path) -> tuple[str, str]:
    """``(image, gene)`` encoder names from ``config.json``'s ``model`` section, filling ``null`` from the preset.

    The preset's towers come from ``hescape.models.get_model_cfg`` when that package is installed (lazy import);
    without it the preset name stands in (``"<preset>:image"``) so the run still gets a distinct row.
    """
    image, gene = model.get("image"), model.get("gene")
    if image and gene:
        return str(image), str(gene)
    preset = str(model.get("name") or "?")
    try:
        from hescape.models import get_model_cfg  # optional sibling package

        cfg = get_model_cfg(preset)
        image, gene = image or cfg.image.name, gene or cfg.gene.name
    except Exception:  # noqa: BLE001 - absent package or unknown preset: fall back to a preset-based label
        image, gene = image or f"{preset}:image", gene or f"{preset}:gene"
    return str(image), str(gene)


def _recorded_model(run: Path) -> dict | None:
    """The model configuration in the header of the run's best ``model.safetensors`` (None when absent/unreadable)."""
    try:
        from safetensors import safe_open

        name = json.loads((run / "checkpoints" / "index.json").read_text(encoding="utf-8-sig")).get("best")
        with safe_open(str(run / "checkpoints" / name / "model.safetensors"), framework="numpy") as f:
            cfg = json.loads((f.metadata() or {})["model_cfg"])
    except Exception:  # noqa: BLE001 - no checkpoint, no safetensors, a foreign file: fall back to config.json
        return None
    return cfg if isinstance(cfg, dict) else None


def _tower_label(tower: dict) -> str:
    """``name`` of a recorded tower, with its fine-tuning mode when that is not full training (``uni:lora``)."""
    mode = tower.get("finetune")
    return str(tower.get("name", "?")) + (f":{mode}" if mode not in (None, "full") else "")


def _panel_of(cfg: dict, run: Path) -> str:
    """Column group of a run: the gene panel recorded in the dataset manifest, else the dataset's directory name.

    Looked up in ``manifest.json`` of ``data_resolved`` (hescape-train's absolute path, so a relative ``data.path``
    need not resolve from the report's working directory) or ``data.path``: ``panel``, ``ingest.panel``
    (hescape-data ingest), ``generator.config.panel`` (the synthetic builder). With no dataset path (the embedded
    synthetic default) it is ``data.panel``.
    """
    data = cfg.get("data") or {}
    path = data.get("path") or cfg.get("data_resolved")
    if not path:
        return str(data.get("panel") or "unknown")
    found = [Path(p) / "manifest.json" for p in (cfg.get("data_resolved"), data.get("path")) if p]
    manifest = next((m for m in found if m.is_file()), found[0])
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            m = {}
        for value in (m.get("panel"), (m.get("ingest") or {}).get("panel"),
                      ((m.get("generator") or {}).get("config") or {}).get("panel")):
            if isinstance(value, str) and value:
                return value
    if not data.get("path") and data.get("panel"):
        return str(data["panel"])  # the embedded default, resolved into a cache folder
    return Path(path).name


def load_run(run_dir: str | os.PathLike, *, k: int = 5, protocol: str | None = None, backend: str = "auto",
             panel: str | None = None, variant: str = "") -> RunRecord:
    """Read one run directory into a :class:`RunRecord`.

    Parameters
    ----------
    run_dir
        A ``hescape-train`` run directory (``config.json`` plus ``results.json`` and/or ``embeddings/test.npz``).
    k
        The ``k`` of Recall@k (default 5, the paper's Table 2).
    protocol
        ``None``: take the numbers from ``results.json`` (protocol ``full``). A protocol spec (``"full"``,
        ``"batch:64"``, ``"batch:64x4"``, :mod:`hescape.eval.protocol`): recompute from ``embeddings/test.npz``
        with :func:`hescape.eval.retrieval_metrics` when the run has them, else fall back to ``results.json``
        (whose protocol is then recorded, so :func:`build_table` refuses to mix it with the requested one). A run
        without ``results.json`` (unfinished: its embeddings may be of any checkpoint) is refused in both modes.
    backend
        Rank backend for recomputation.
    panel
        Override of the column group (default: the dataset's panel, see :func:`_panel_of`).
    variant
        What else sets this run apart from runs of the same encoders, panel and seed (e.g. ``"loss=siglip"``, as
        ``hescape-train sweep`` writes it); part of the row label, so runs are aggregated over seeds only within
        one variant. Empty (the default): rows are the encoders alone.

    Raises
    ------
    HescapeEvalError
        Not a run directory (no ``config.json``), a run with neither results nor embeddings, no ``R@k`` for this
        ``k`` in ``results.json``, an unreadable file.
    """
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not run.is_dir() or not cfg_path.is_file():
        found = "no such directory" if not run.exists() else ("a file" if run.is_file() else "no config.json")
        raise _fail(what=f"run directory {run}", expected="a hescape-train run directory holding config.json",
                    found=found, fix="pass the directories hescape-train created (out_dir/run_name), e.g. runs/*/")
    cfg = _read_json(cfg_path, f"config of run {run}")
    recorded = _recorded_model(run)
    if recorded is not None:  # the towers the run trained, as its own checkpoint records them
        image, gene = (_tower_label(recorded.get(key) or {}) for key in ("image", "gene"))
    elif (cfg.get("model") or {}).get("init_checkpoint"):
        raise _fail(what=f"run {run}", expected="its checkpoint (checkpoints/index.json + model.safetensors) to name "
                    "its encoders", found="none readable, and it started from model.init_checkpoint, so config.json "
                    "does not name its model", fix="pass run directories with their checkpoints (pip install safetensors)")
    else:
        image, gene = _encoder_names(cfg.get("model") or {}, run)
    seed = cfg.get("seed")
    if not isinstance(seed, int):
        raise _fail(what=f"config of run {run}", expected="an integer 'seed'", found=repr(seed),
                    fix="pass run directories written by hescape-train")
    col = panel or _panel_of(cfg, run)
    common = {"path": run, "image": image, "gene": gene, "seed": seed, "panel": col, "k": int(k),
              "variant": str(variant)}

    from .io import embeddings_path

    emb_file = embeddings_path(run, "test")
    res_path = run / "results.json"
    if not res_path.is_file():  # an unfinished run, refused whether or not its numbers would be recomputed
        raise _fail(what=f"run {run}", expected="results.json (written when training finishes)",
                    found="no results.json",
                    fix="let the run finish (or resume it with hescape-train --resume), or leave it out")
    if protocol is not None and emb_file.is_file():
        from .io import load_embeddings
        from .protocol import RetrievalProtocol
        from .retrieval import retrieval_metrics

        proto = RetrievalProtocol.parse(protocol)
        emb = load_embeddings(emb_file)
        rep = retrieval_metrics(emb.image, emb.gene, ks=[int(k)], protocol=proto, backend=backend)
        return RunRecord(**common, recall={d: rep[d].recall[int(k)] for d in DIRECTIONS},
                         chance={d: rep[d].chance[int(k)] for d in DIRECTIONS}, protocol=str(proto),
                         pool=rep["i2g"].pool, source="embeddings", n_test=len(emb.image))

    res = _read_json(res_path, f"results of run {run}")
    recall, chance = {}, {}
    for d in DIRECTIONS:
        key = f"{d}_R@{k}"
        if not isinstance(res.get(key), int | float):
            have = sorted({int(x.split("@")[1]) for x in res
                           if x.startswith(f"{d}_R@") and x.split("@")[1].isdigit()})
            # the saved test embeddings are the best checkpoint's, the same model results.json scored: protocol
            # full recomputes any k over the same gallery
            recompute = (f"pass --protocol full to recompute Recall@{k} from {emb_file} (the same full gallery), "
                         if emb_file.is_file() else "")
            raise _fail(what=f"results of run {run}", expected=f"a number under {key!r}",
                        found=f"Recall@k for k in {have}",
                        fix=f"choose --k among {have}, {recompute}or retrain with recall_ks including {k}")
        recall[d] = float(res[key])
        c = res.get(f"{key}_chance")
        pool = res.get(f"{d}_pool")
        if not isinstance(c, int | float):
            from .retrieval import chance_recall

            c = chance_recall(int(pool), int(k)) if isinstance(pool, int) and pool > 0 else math.nan
        chance[d] = float(c)
    pool = res.get("i2g_pool")
    res_protocol = str(res.get("i2g_protocol", "full"))
    pool = int(pool) if isinstance(pool, int) else None
    return RunRecord(**common, recall=recall, chance=chance, protocol=res_protocol, pool=pool, source="results.json",
                     n_test=pool if res_protocol == "full" else None)


#: ``config.json`` keys that never set a run apart in a report: the seed (aggregated over), where the run was written,
#: and the options hescape-train documents as not changing results (its ``RESUMABLE_KEYS``: progress bars, loader
#: workers, the feature-cache folder, loggers).
_NOT_A_VARIANT = frozenset({"seed", "out_dir", "run_name", "format", "progress", "data.num_workers",
                            "data.feature_cache", "data.feature_cache_dir", "log.tensorboard", "log.wandb",
                            "log.wandb_project"})


def _flat_config(run: Path) -> dict[str, str]:
    """``config.json`` flattened to dotted keys with JSON-text values (``{"optim": {"lr": 0.001}}`` →
    ``{"optim.lr": "0.001"}``), without the keys of :data:`_NOT_A_VARIANT`; ``data.path`` gives way to
    ``data_resolved`` (the same dataset named by a relative and an absolute path is one dataset)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}{key}.", sub)
        else:
            flat[prefix[:-1]] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    walk("", _read_json(run / "config.json", f"config of run {run}"))
    if "data_resolved" in flat:
        flat.pop("data.path", None)
    return {k: v for k, v in flat.items() if k not in _NOT_A_VARIANT}


def config_variants(records: Sequence[RunRecord]) -> list[str]:
    """What sets each record apart from the other runs of its row, from the runs' ``config.json``.

    Runs of the same encoders, panel and ``variant`` (one row of the table, aggregated over seeds) must differ in
    nothing but their seed, else a mean over "seeds" would average, say, a CLIP and a SigLIP run. For each such group
    the keys of ``config.json`` (flattened, :func:`_flat_config`) whose values differ between its runs are returned
    for each run as ``key=value`` joined by ``", "`` in key order (the key's last part, ``loss=siglip``, when that is
    unambiguous); ``""`` for a run whose group agrees on every key. One string per record, in order. A record whose
    ``config.json`` cannot be read counts as having no settings.
    """
    configs, shown_paths = [], []
    for r in records:
        try:
            configs.append(_flat_config(Path(r.path)))
            data = _read_json(Path(r.path) / "config.json", f"config of run {r.path}").get("data") or {}
            shown_paths.append(data.get("path") if isinstance(data, dict) else None)
        except HescapeEvalError:
            configs.append({})
            shown_paths.append(None)
    out = [""] * len(records)
    groups: dict[tuple[str, str, str, str], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.gene, r.image, r.panel, r.variant), []).append(i)
    for members in groups.values():
        keys = sorted({k for i in members for k in configs[i]})
        varying = [k for k in keys if len({configs[i].get(k, "<unset>") for i in members}) > 1]
        if not varying:
            continue
        # data_resolved (hescape-train's absolute form of data.path) tells datasets apart, but the label shows the
        # user's own data.path when that tells them apart just as well
        shown = {i: dict(configs[i]) for i in members}
        if "data_resolved" in varying:
            resolved = [configs[i].get("data_resolved", "<unset>") for i in members]
            given = [shown_paths[i] for i in members]
            if all(isinstance(g, str) and g for g in given) and len(set(given)) == len(set(resolved)) == len(
                    set(zip(given, resolved, strict=True))):
                varying = sorted(("data.path" if k == "data_resolved" else k) for k in varying)
                for i in members:
                    shown[i]["data.path"] = shown_paths[i]
        tails = [k.rsplit(".", 1)[-1] for k in varying]
        names = [t if tails.count(t) == 1 and k != "data.path" else k for k, t in zip(varying, tails, strict=True)]
        for i in members:
            out[i] = ", ".join(f"{name}={shown[i].get(key, '<unset>')}"
                               for key, name in zip(varying, names, strict=True))
    return out


def load_runs(run_dirs: Sequence[str | os.PathLike], *, variants: Sequence[str] | None = None,
              **kwargs) -> list[RunRecord]:
    """:func:`load_run` of every directory (same keyword arguments; ``variants``: one ``variant`` per directory, in
    the same order); an empty list is an error. (:func:`build_table` adds to each variant the settings that still
    set runs of one row apart, :func:`config_variants`.)"""
    if not run_dirs:
        raise _fail(what="report", expected="at least one run directory", found="none", fix="pass RUN_DIR ...")
    if variants is None:
        variants = [""] * len(run_dirs)
    if len(variants) != len(run_dirs):
        raise _fail(what="report variants", expected=f"one per run directory ({len(run_dirs)})",
                    found=f"{len(variants)}", fix="pass as many variants as run directories, in the same order")
    return [load_run(r, variant=v, **kwargs) for r, v in zip(run_dirs, variants, strict=True)]


@dataclass
class Cell:
    """Aggregate of one (model, panel, direction): ``mean`` and sample ``std`` (``ddof=1``; NaN for one seed)."""

    values: list[float]
    seeds: list[int]
    chance: float
    mean: float = field(init=False)
    std: float = field(init=False)

    def __post_init__(self) -> None:
        a = np.asarray(self.values, dtype=np.float64)
        self.mean = float(a.mean())
        self.std = float(a.std(ddof=1)) if a.size > 1 else math.nan

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class ReportTable:
    """The aggregated table: ``cells[(model, (panel, direction))]``, column metadata and best/second marks.

    ``columns`` are ``(panel, direction)`` pairs (paper panel order first, then by name; I2G before G2I);
    ``rows`` are model labels (sorted by gene, then image encoder); ``protocol``/``pool``/``chance`` are per column;
    ``marks[(model, column)]`` is ``"best"`` or ``"second"``.
    """

    rows: list[str]
    columns: list[tuple[str, str]]
    cells: dict[tuple[str, tuple[str, str]], Cell]
    protocol: dict[tuple[str, str], str]
    pool: dict[tuple[str, str], int | None]
    chance: dict[tuple[str, str], float]
    k: int
    encoders: dict[str, tuple[str, str]]
    marks: dict[tuple[str, tuple[str, str]], str] = field(default_factory=dict)
    has_variants: bool = False

    # ------------------------------------------------------------------ labels
    @staticmethod
    def panel_label(panel: str) -> str:
        return PAPER_PANEL_NAMES.get(panel, panel)

    def column_label(self, col: tuple[str, str]) -> str:
        return f"{self.panel_label(col[0])} {_DIR_LABEL[col[1]]}"

    def cell_text(self, cell: Cell | None, mark: str | None = None, markdown: bool = True) -> str:
        if cell is None:
            return "—"
        std = "—" if math.isnan(cell.std) else f"{cell.std:.{_DIGITS}f}"
        text = f"{cell.mean:.{_DIGITS}f}({std}" + (f", n={cell.n})" if cell.n < 3 else ")")
        if markdown and mark == "best":
            return f"**{text}**"
        if markdown and mark == "second":
            return f"<u>{text}</u>"
        return text

    def caption(self) -> str:
        """What the numbers are: metric, aggregation, protocol and pool (per column when they differ), marks."""
        protos = sorted(set(self.protocol.values()))
        from .protocol import RetrievalProtocol

        def pools(cols) -> str:
            per = {self.panel_label(c[0]): self.pool[c] for c in cols}
            vals = set(per.values())
            if len(vals) == 1:
                return f"pool {next(iter(vals))}"
            return "pool " + ", ".join(f"{p} {n}" for p, n in per.items())

        if len(protos) == 1:
            proto = RetrievalProtocol.parse(protos[0])
            where = f"Protocol `{proto}`: {proto.describe()}; {pools(self.columns)}."
        else:
            parts = []
            for p in protos:
                cols = [c for c in self.columns if self.protocol[c] == p]
                parts.append(f"`{p}` ({RetrievalProtocol.parse(p).describe()}; {pools(cols)}) for "
                             + ", ".join(self.column_label(c) for c in cols))
            where = "Protocols differ between columns: " + "; ".join(parts) + "."
        variants = (" Rows marked [key=value] are runs of the same encoders that differ in those settings (of "
                    "config.json, or as given); each is aggregated over its own seeds." if self.has_variants else "")
        return (f"Test Recall@{self.k} for image-to-gene (I2G) and gene-to-image (G2I) retrieval, mean(std) over "
                f"seeds (sample std, ddof=1; n shown when fewer than 3 seeds; — for a single seed or a missing run)."
                f"{variants} {where} Chance Recall@{self.k} is in the last row. Best results are in **bold**, second-best are "
                f"<u>underlined</u> (per column, on the printed means).")

    # ------------------------------------------------------------------ outputs
    def to_markdown(self, title: str | None = None) -> str:
        lines = [f"### {title}", ""] if title else []
        lines += [self.caption(), ""]
        lines.append("| Model | " + " | ".join(self.column_label(c) for c in self.columns) + " |")
        lines.append("|---|" + "---:|" * len(self.columns))
        for m in self.rows:
            cells = [self.cell_text(self.cells.get((m, c)), self.marks.get((m, c))) for c in self.columns]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("| *chance* | " + " | ".join(_fmt(self.chance[c]) for c in self.columns) + " |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """Paper layout, machine-readable: one row per model, ``<panel> <dir> mean/std/n`` columns, a chance row."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = ["model", "image_encoder", "gene_encoder"]
        for c in self.columns:
            lab = self.column_label(c)
            head += [f"{lab} mean", f"{lab} std", f"{lab} n", f"{lab} mark"]
        w.writerow(head)
        for m in self.rows:
            row = [m, *self.encoders[m]]
            for c in self.columns:
                cell = self.cells.get((m, c))
                row += ["", "", 0, ""] if cell is None else [_num(cell.mean), _num(cell.std), cell.n,
                                                             self.marks.get((m, c), "")]
            w.writerow(row)
        row = ["chance", "", ""]
        for c in self.columns:
            row += [_num(self.chance[c]), "", "", ""]
        w.writerow(row)
        return buf.getvalue()

    def to_long_csv(self) -> str:
        """One line per (model, panel, direction): protocol, pool, k, mean, std, n, seeds, chance, mark."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["model", "image_encoder", "gene_encoder", "panel", "direction", "protocol", "pool", "k", "mean",
                    "std", "n", "seeds", "chance", "mark"])
        for m in self.rows:
            for c in self.columns:
                cell = self.cells.get((m, c))
                if cell is None:
                    continue
                w.writerow([m, *self.encoders[m], c[0], c[1], self.protocol[c], self.pool[c], self.k,
                            _num(cell.mean), _num(cell.std), cell.n, " ".join(map(str, cell.seeds)),
                            _num(cell.chance), self.marks.get((m, c), "")])
        return buf.getvalue()


def _fmt(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{_DIGITS}f}"


def _num(x: float) -> str:
    return "" if x is None or math.isnan(x) else repr(float(x))


def _column_order(panels: set[str]) -> list[str]:
    order = list(PAPER_PANEL_NAMES)
    return sorted(panels, key=lambda p: (order.index(p) if p in order else len(order), p))


def _mixed_column_fix(group: Sequence[RunRecord]) -> str:
    """What to do about a column whose runs differ in protocol or pool (the end of :func:`build_table`'s message)."""
    sizes = [r.n_test for r in group if r.n_test]
    smallest = min(sizes) if sizes else None
    batch = (f"batch:B with B <= {smallest} (the smallest test set, so every pool is B)" if smallest
             else "batch:B with B no larger than the smallest test set")
    protocols = {r.protocol for r in group}
    if all(r.source == "embeddings" for r in group) and len(protocols) == 1:
        # recomputed the same way, yet the pools differ: the test sets differ in size (a full gallery is the test set;
        # a batch larger than a test set is cut to it)
        return (f"these runs' test sets differ in size, so --protocol {next(iter(protocols))} gives them different "
                f"pools: pass --protocol {batch} instead, or report the runs separately")
    return (f"save test embeddings for every run and pass --protocol {batch} to recompute them all the same way, "
            "or report the runs separately")


def build_table(records: Sequence[RunRecord]) -> ReportTable:
    """Group runs into rows (gene, image encoder) and columns (panel, direction); aggregate seeds; mark best.

    Raises
    ------
    HescapeEvalError
        Two runs of the same model, panel, seed and settings (a duplicate would count twice); a column mixing
        protocols, pool sizes or ``k``.

    Runs of the same encoders and panel whose ``config.json`` differ in more than the seed (and the settings that do
    not change results) are told apart by those settings (:func:`config_variants`), never averaged together.
    """
    if not records:
        raise _fail(what="report", expected="at least one run", found="none", fix="pass RUN_DIR ...")
    ks = sorted({r.k for r in records})
    if len(ks) > 1:
        raise _fail(what="report", expected="one k for every run", found=f"k in {ks}", fix="report one --k at a time")
    # runs of one row that differ in a setting (a sweep over the loss, the learning rate, two datasets of one
    # panel) get that setting appended to their variant: rows are never a mean over different experiments
    records = [dataclasses.replace(r, variant=", ".join(x for x in (r.variant, extra) if x))
               for r, extra in zip(records, config_variants(records), strict=True)]
    seen: dict[tuple[str, str, int], Path] = {}
    for r in records:
        key = (r.model, r.panel, r.seed)
        if key in seen:
            raise _fail(what=f"runs {seen[key]} and {r.path}", expected="one run per (model, panel, seed)",
                        found=f"both are {r.model} on {r.panel} with seed {r.seed}",
                        fix="drop the duplicate (e.g. a copied or re-run directory) or give them different seeds")
        seen[key] = r.path
    for panel in {r.panel for r in records}:
        group = [r for r in records if r.panel == panel]
        kinds = {(r.protocol, r.pool) for r in group}
        if len(kinds) > 1:
            listing = "; ".join(f"{r.path} ({r.source}: protocol {r.protocol}, pool {r.pool})" for r in group)
            raise _fail(what=f"column {panel}",
                        expected="one retrieval protocol and pool size for every run in a column", found=listing,
                        fix="Recall@k of different galleries are not comparable (chance is k/pool); "
                            + _mixed_column_fix(group))
    rows = sorted({r.model for r in records}, key=lambda m: (m.split("-", 1)[0].lower(), m.lower()))
    encoders = {r.model: (r.image, r.gene) for r in records}
    columns = [(p, d) for p in _column_order({r.panel for r in records}) for d in DIRECTIONS]
    cells, protocol, pool, chance = {}, {}, {}, {}
    for col in columns:
        group = [r for r in records if r.panel == col[0]]
        protocol[col], pool[col] = group[0].protocol, group[0].pool
        chance[col] = float(np.mean([r.chance[col[1]] for r in group]))
        for m in rows:
            runs = sorted((r for r in group if r.model == m), key=lambda r: r.seed)
            if runs:
                cells[(m, col)] = Cell([r.recall[col[1]] for r in runs], [r.seed for r in runs],
                                       float(np.mean([r.chance[col[1]] for r in runs])))
    table = ReportTable(rows, columns, cells, protocol, pool, chance, ks[0], encoders,
                        has_variants=any(r.variant for r in records))
    for col in columns:
        means = {m: round(cells[(m, col)].mean, _DIGITS) for m in rows if (m, col) in cells}
        distinct = sorted(set(means.values()), reverse=True)
        for m, v in means.items():
            if v == distinct[0]:
                table.marks[(m, col)] = "best"
            elif len(distinct) > 1 and v == distinct[1]:
                table.marks[(m, col)] = "second"
    return table


def plot_recall(table: ReportTable, path: str | os.PathLike) -> Path | None:
    """Bar chart of Recall@k per model (one panel per subplot, I2G and G2I side by side), sample-std error bars
    (none for a single seed) and a dashed chance line per direction. Returns the PNG path, or ``None`` when
    matplotlib is not installed (``pip install 'hescape-eval[batch]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys(p for p, _ in table.columns))
    n = len(table.rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.9 * n + 1.5) * len(panels), 4.2), squeeze=False,
                             sharey=True)
    width = 0.38
    colours = {"i2g": "#3b6fb6", "g2i": "#e0873a"}
    x = np.arange(n)
    for ax, panel in zip(axes[0], panels, strict=True):
        for j, d in enumerate(DIRECTIONS):
            col = (panel, d)
            cells = [table.cells.get((m, col)) for m in table.rows]
            mean = [c.mean if c else np.nan for c in cells]
            err = [0.0 if (c is None or math.isnan(c.std)) else c.std for c in cells]
            ax.bar(x + (j - 0.5) * width, mean, width, yerr=err, capsize=3, color=colours[d], label=_DIR_LABEL[d])
        chances = {d: table.chance[(panel, d)] for d in DIRECTIONS}
        # the chance level is named in the legend (outside the axes), never written over the bars
        if math.isclose(chances["i2g"], chances["g2i"], rel_tol=1e-9):
            ax.axhline(chances["i2g"], color="black", linestyle="--", linewidth=1,
                       label=f"chance {chances['i2g']:.3f}" if len(panels) == 1 else "chance")
        else:
            for d in DIRECTIONS:
                ax.axhline(chances[d], color=colours[d], linestyle="--", linewidth=1,
                           label=f"chance {_DIR_LABEL[d]}" + (f" {chances[d]:.3f}" if len(panels) == 1 else ""))
        few = [min((table.cells[(m, (panel, d))].n for d in DIRECTIONS if (m, (panel, d)) in table.cells),
                   default=0) for m in table.rows]
        ticks = [m if c >= 3 else f"{m} (n={c})" for m, c in zip(table.rows, few, strict=True)]
        ax.set_xticks(x, ticks, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, n - 0.4)
        col = (panel, "i2g")
        title = f"{table.panel_label(panel)} ({table.protocol[col]}, pool {table.pool[col]})"
        if len(panels) > 1:  # one legend for all panels: each panel's chance level goes in its title
            title += "\nchance " + " / ".join(f"{chances[d]:.3f}" for d in DIRECTIONS if d == "i2g" or
                                                not math.isclose(chances["i2g"], chances[d], rel_tol=1e-9))
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"test Recall@{table.k} (mean ± sd over seeds)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[0][-1].legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    from .io import atomic_write

    try:  # atomic: an interrupted or failed save leaves no half-written PNG
        # bbox_inches="tight" grows the canvas to every artist: long rotated row labels and the legend are never cut
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=120, format="png", bbox_inches="tight", pad_inches=0.1))
    finally:
        plt.close(fig)
    return path


def report_files(out: str | os.PathLike, k: int = 5, *, figures: bool = True) -> list[Path]:
    """The files :func:`write_report` writes into ``out`` (the PNG only with ``figures``)."""
    out = Path(out)
    names = ["report.md", "report.csv", "report_long.csv"] + ([f"recall_at_{k}.png"] if figures else [])
    return [out / n for n in names]


_REPORT_FILE = re.compile(r"(report\.md|report\.csv|report_long\.csv|recall_at_[1-9][0-9]*\.png)")


def existing_report_files(out: str | os.PathLike) -> list[Path]:
    """Files in ``out`` with the name of an output of :func:`write_report` for any ``k`` (``report.md``,
    ``report.csv``, ``report_long.csv``, ``recall_at_<k>.png``), sorted; no other file is ever listed."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if _REPORT_FILE.fullmatch(p.name) and (p.is_file() or p.is_symlink()))


def _atomic_text(path: Path, text: str) -> None:
    from ._write import atomic_write_text

    atomic_write_text(path, text)


def _commit(out: Path, staged: dict[str, Path]) -> None:
    """Replace the report in ``out`` by the ``staged`` files (final name → finished temporary file in ``out``).

    ``report.md`` is removed first and moved into place last: a folder holding ``report.md`` always holds one
    complete report, never new files beside old ones (an interruption between the two leaves no ``report.md``).
    Previous report outputs that this report does not write again (a figure of another ``k``, or one skipped now)
    are removed in between; other files in ``out`` are never touched.
    """
    md = out / "report.md"
    md.unlink(missing_ok=True)
    for name, tmp in staged.items():
        if name != "report.md":
            os.replace(tmp, out / name)
    for old in existing_report_files(out):
        if old.name not in staged:
            old.unlink(missing_ok=True)
    os.replace(staged["report.md"], md)


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, k: int = 5,
                 protocol: str | None = None, backend: str = "auto", figures: bool = True,
                 title: str | None = None, variants: Sequence[str] | None = None) -> dict[str, Path | str]:
    """Load the runs, build the table and write ``report.md``, ``report.csv`` (paper layout), ``report_long.csv``
    (one line per cell) and ``recall_at_k.png`` into ``out``. ``variants``: one per run directory, see
    :func:`load_run` (rows are then one per encoders and variant).

    Every file is first written completely as a hidden temporary file in ``out``; only then is the previous report
    replaced (:func:`_commit`): its files are overwritten, and its outputs this report does not write again (the
    figure of another ``k``, or any figure with ``figures=False``) are removed, so ``out`` never shows a stale file
    beside the new report. A failure before that leaves the previous report as it was.

    Returns ``{"markdown": path, "csv": path, "long_csv": path, "figure": path or a note, "table": ReportTable}``.
    Raises :class:`HescapeEvalError` as :func:`load_run` and :func:`build_table` do.
    """
    if protocol is not None:
        from .protocol import RetrievalProtocol

        protocol = str(RetrievalProtocol.parse(protocol))  # fail before reading any run
    table = build_table(load_runs(run_dirs, k=k, protocol=protocol, backend=backend, variants=variants))
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}

    def stage(name: str) -> Path:
        staged[name] = out / f".{name}.{os.getpid()}.partial"
        return staged[name]

    result: dict = {"markdown": out / "report.md", "csv": out / "report.csv", "long_csv": out / "report_long.csv",
                    "table": table}
    try:
        _atomic_text(stage("report.md"), table.to_markdown(title or f"Test Recall@{k}") + "\n")
        _atomic_text(stage("report.csv"), table.to_csv())
        _atomic_text(stage("report_long.csv"), table.to_long_csv())
        if figures:
            name = f"recall_at_{k}.png"
            if plot_recall(table, stage(name)) is None:
                staged.pop(name)
                result["figure"] = "figures skipped: matplotlib is not installed (pip install 'hescape-eval[batch]')"
            else:
                result["figure"] = out / name
        _commit(out, staged)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created:
            remove_if_empty(out)  # nothing of ours is left
        raise
    return result
