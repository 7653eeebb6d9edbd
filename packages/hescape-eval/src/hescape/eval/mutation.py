"""Slide-level mutation prediction end to end: ``hescape-eval mutation SLIDES.csv --encoder NAME --out DIR``.

The pipeline of the HESCAPE paper §8.4 (Tables 3–5), wired from :mod:`hescape.eval.wsi` and :mod:`hescape.eval.mil`:

1. **Slide table** (:func:`read_slide_table`): a CSV with columns ``path`` (an Aperio SVS or OME-TIFF; relative paths
   are taken from the CSV's folder), ``patient``, ``site`` (tissue source site, the unit the folds keep together) and
   ``label`` (0/1, 1 = mutated); optional ``um_per_px`` (level-0 µm/px of slides whose file does not record it).
2. **Checks before any work**, in this order: the table (columns, at least one row, 0/1 labels); every slide exists,
   opens as a complete TIFF and has a level at 20× or finer (:func:`check_slides`: one error naming the first bad
   row's line number and path, and the rows of the others); the labels hold both classes and the five
   site-preserving folds (:func:`hescape.eval.mil.site_folds`) each hold both classes, no patient spans two sites
   (:func:`~hescape.eval.mil.check_folds`); the encoder builds; existing results are refused unless ``overwrite``.
   Nothing is written before all of these pass.
3. **Tiling** (:func:`hescape.eval.wsi.tile_slide`): 256 px tiles at 0.5 µm/px with ≥ 50 % tissue, tiles at the
   slide's right/bottom edge included (padded with white; the padding counts as background); a slide without a
   single tile is refused.
4. **Tile features** (:func:`hescape.eval.wsi.slide_features`): batched through the encoder, one ``.npz`` per slide in
   the feature folder (``DIR/features`` by default), written atomically and reused when present, so an interrupted
   run resumes at the first slide not yet encoded. The encoder identity (registry name and weights tag, or the
   HESCAPE checkpoint's SHA-256) is stored in every file and checked on reuse.
5. **MIL** (:func:`hescape.eval.mil.cross_validate_mil`): the HistoBistro transformer (2 layers, 8 heads of 64,
   latent 512), AdamW lr 2e-5, weight decay 2e-5, batch size 1, 10 epochs, best validation loss every 500 steps,
   5 site-preserving folds rotating test / validation / 3 training folds.
6. **Results** (:func:`write_results`): F1 (positive class, threshold 0.5) and AUROC per test fold and mean(std) over
   folds (``np.std``, ddof 0, as :class:`~hescape.eval.mil.MILResult`), beside two baselines computed on the same
   test folds with scikit-learn: *all positive* (every slide called mutated: F1 ``2p / (1 + p)``, the F1 of chance
   for the positive class) and *majority class* (every test slide gets the majority label of its three training
   folds, ties going to positive; F1 0 when that label is 0); both have AUROC 0.5 (a constant score), and the
   Mann–Whitney null s.d. of one fold's AUROC is given. Written atomically as ``mutation.md``, ``mutation.csv``
   (one row per fold, then mean and std), ``mutation.json``, ``predictions.csv`` (each slide's test-fold
   probability) and ``features.csv`` (the slide table pointing at the feature files, readable by
   :func:`hescape.eval.mil.mil_from_csv`).

Encoders: a registered image encoder (``hescape-models list``; a pretrained one needs its weights, a random-init
one such as ``vit_nano`` runs as is and is labelled so), or a HESCAPE model: a ``hescape-train`` run directory, a
checkpoint directory or its ``model.safetensors`` (the image tower and its projection, 128-d L2-normalised
embeddings, as the paper's "pretrained HESCAPE models have a latent dimension of 128"). hescape-models (and, for
runs, safetensors) are imported only here, never by ``import hescape.eval``; hescape-train is never imported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._write import atomic_write_text, refuse_existing
from .errors import HescapeEvalError
from .mil import REQUIRED_COLUMNS, MILResult, check_folds, cross_validate_mil, parse_label, site_folds

__all__ = ["SlideTable", "EncoderSpec", "read_slide_table", "check_slides", "load_encoder", "baselines",
           "resolve_device", "run_mutation", "write_results", "OUTPUT_FILES", "MUTATION_FORMAT"]

#: ``format`` entry of ``mutation.json``.
MUTATION_FORMAT = "hescape-mutation/1"
#: Result files written into the output folder (the feature folder is kept for resuming).
OUTPUT_FILES = ("mutation.md", "mutation.csv", "mutation.json", "predictions.csv", "features.csv")


# --------------------------------------------------------------------------------------------------------------
# Slide table
# --------------------------------------------------------------------------------------------------------------

@dataclass
class SlideTable:
    """The rows of a slide CSV: ``paths`` (absolute), ``slide_ids`` (unique; the feature file names), ``patients``,
    ``sites``, ``labels`` (0/1 int array), ``um_per_px`` (per slide, ``None`` = from the file), ``rows`` (CSV line
    numbers, for messages)."""

    csv_path: Path
    paths: list[Path]
    slide_ids: list[str]
    patients: np.ndarray
    sites: np.ndarray
    labels: np.ndarray
    um_per_px: list[float | None]
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_slide_table(csv_path: str | os.PathLike) -> SlideTable:
    """Read and check a slide CSV (columns ``path, patient, site, label``; optional ``um_per_px``).

    Slide ids are the file names without their image suffix (``.svs``, ``.tif``, ``.ome.tif``); when two slides share
    one, each gets the first 8 hex digits of the SHA-1 of its absolute path appended.

    Raises
    ------
    HescapeEvalError
        A missing or empty file, a missing column, no rows, an empty ``path``/``patient``/``site``, a label other than
        0/1, a ``um_per_px`` that is not a positive number, a slide listed twice. (Slide files are checked by
        :func:`check_slides`, the classes by :func:`hescape.eval.mil.site_folds`.)
    """
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise HescapeEvalError.build(what=f"slide table {str(csv_path)!r}", expected="a readable CSV file",
                                     found=f"{type(exc).__name__}: {exc.strerror or exc}",
                                     fix="check the path of SLIDES.csv") from None
    if not text.strip():
        raise HescapeEvalError.build(what=f"slide table {str(csv_path)!r}",
                                     expected=f"a header {','.join(REQUIRED_COLUMNS)} and one row per slide",
                                     found="an empty file", fix="write the header and list the slides under it")
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise HescapeEvalError.build(what=f"slide table {str(csv_path)!r}",
                                     expected=f"columns {list(REQUIRED_COLUMNS)}",
                                     found=f"columns {cols} (missing {missing})",
                                     fix="add the missing columns to the CSV header")
    raw = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if not raw:
        raise HescapeEvalError.build(what=f"slide table {str(csv_path)!r}", expected="one row per slide",
                                     found="a header only", fix="list the slides under the header")
    paths, patients, sites, labels, mpps, lines = [], [], [], [], [], []
    seen: dict[Path, int] = {}
    for i, r in enumerate(raw):
        line = i + 2
        for col in ("path", "patient", "site"):
            if not r.get(col):
                raise HescapeEvalError.build(what=f"slide table row {line}", expected=f"a value in column {col!r}",
                                             found="an empty cell", fix=f"fill in the {col} of every slide")
        labels.append(parse_label(r["label"], f"slide table row {line} label"))
        p = Path(r["path"]).expanduser()
        p = (p if p.is_absolute() else csv_path.parent / p).resolve()
        if p in seen:
            raise HescapeEvalError.build(what=f"slide table row {line}", expected="each slide once",
                                         found=f"{str(p)!r}, already in row {seen[p]}",
                                         fix="remove the duplicate row (a slide counted twice weighs double)")
        seen[p] = line
        mpp = None
        if r.get("um_per_px"):
            try:
                mpp = float(r["um_per_px"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                raise HescapeEvalError.build(what=f"slide table row {line} um_per_px",
                                             expected="a positive number or an empty cell", found=repr(r["um_per_px"]),
                                             fix="give the level-0 µm per pixel, e.g. 0.25, or leave it empty")
        paths.append(p)
        patients.append(r["patient"])
        sites.append(r["site"])
        mpps.append(mpp)
        lines.append(line)
    stems = [_slide_stem(p) for p in paths]
    counts = {s: stems.count(s) for s in stems}
    ids = [s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
           for s, p in zip(stems, paths, strict=True)]
    return SlideTable(csv_path, paths, ids, np.asarray(patients), np.asarray(sites), np.asarray(labels, dtype=np.int64),
                      mpps, lines)


def check_slides(table: SlideTable, *, um_per_px: float | None = None):
    """Open every slide (header only) and check it has a level at 20× or finer; returns their ``SlideInfo``.

    Run before any tiling or encoding: every row is checked, so one run names every unusable slide. ``um_per_px``
    applies to slides whose row gives none.

    Raises
    ------
    HescapeEvalError
        One error for all unusable slides: the first one's CSV line number, path and cause (no such file, a folder,
        an empty, unreadable, non-TIFF or truncated file, no µm/px, coarser than 0.5 µm/px), and the line numbers of
        the others.
    """
    from .wsi import choose_level, read_slide_info

    infos, bad = [], []
    for p, mpp, line in zip(table.paths, table.um_per_px, table.rows, strict=True):
        try:
            info = read_slide_info(p, um_per_px=mpp if mpp is not None else um_per_px)
            choose_level(info.level_um_per_px)
        except HescapeEvalError as exc:
            bad.append((line, str(exc)))
            continue
        infos.append(info)
    if bad:
        line, first = bad[0]
        others = [str(b[0]) for b in bad[1:]]
        more = ""
        if others:
            shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
            more = f" (also unusable: row{'s' if len(others) > 1 else ''} {shown})"
        msg = f"slide table row {line}{more}: {first}"
        raise HescapeEvalError(msg)
    return infos


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------

@dataclass
class EncoderSpec:
    """A tile encoder ready to run: ``encode`` maps ``(B, 3, H, W)`` uint8 tiles to ``(B, D)`` features;
    ``identity`` is stored in every feature file; ``kind`` is ``"registry"`` or ``"hescape"``."""

    encode: Callable
    identity: str
    kind: str
    name: str
    weights: str
    random_init: bool
    scale_note: str | None = None


def _sha256_16(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()[:16]


def _tile_scale_note(contract, tile_px: int, tile_um_per_px: float) -> str | None:
    try:
        return contract.scale_warning(tile_um_per_px, tile_px)
    except Exception:  # noqa: BLE001 - a contract without the helper: no note
        return None


def load_encoder(encoder: str, weights: str | None = None, *, options: dict | None = None, device: str = "cpu",
                 tile_px: int = 256, tile_um_per_px: float = 0.5, seed: int = 0) -> EncoderSpec:
    """Build the tile encoder ``encoder``: a HESCAPE run/checkpoint path, or a registered image encoder name.

    Parameters
    ----------
    encoder
        A ``hescape-train`` run directory, checkpoint directory or ``model.safetensors`` (its image tower and
        projection: the 128-d HESCAPE embedding), else a name of ``hescape-models list`` (modality image).
    weights
        For a registered encoder: a weights file or directory (or ``hf``). Required for pretrained encoders: their
        random initialisation would give meaningless features.
    options
        Builder options of a registered encoder (e.g. ``{"pooling": "cls+mean"}``).
    device
        Torch device the encoder runs on.
    seed
        Initialisation of a random-init encoder (``torch.manual_seed`` inside a forked RNG state), recorded in its
        identity, so that its cached features are reproducible and never mixed with another initialisation's.

    Raises
    ------
    HescapeEvalError
        Unknown encoder, a pretrained encoder without weights, weights that do not fit, ``weights`` with a run.
    """
    path = Path(encoder)
    if path.exists():
        if weights is not None or options:
            raise HescapeEvalError.build(what="--weights/--encoder-options",
                                         expected="nothing with a HESCAPE run (its checkpoint holds every weight)",
                                         found=f"weights={weights!r}, options={options!r}",
                                         fix="drop them, or pass a registered encoder name")
        from .embed import load_trained_model

        model, _, file = load_trained_model(path, "best")
        model = model.to(device).eval()
        digest = _sha256_16(file)

        def encode(x, model=model):
            return model.encode_image(x)

        note = _tile_scale_note(model.image_encoder.contract, tile_px, tile_um_per_px)
        return EncoderSpec(encode, f"hescape:{file.name} sha256:{digest}", "hescape", str(file), f"sha256:{digest}",
                           False, note)
    from .embed import _need

    models = _need("hescape.models")
    try:
        entry = models.get_encoder_entry(encoder, "image")
        if entry.pretrained and weights is None:
            raise HescapeEvalError.build(what=f"--encoder {encoder}",
                                         expected="its published weights (--weights FILE or DIR, or --weights hf)",
                                         found="none: a pretrained encoder at random initialisation gives "
                                               "meaningless features",
                                         fix=f"pass --weights (where to get them: hescape-models list, {encoder})")
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = models.create_image_encoder(encoder, weights, **(options or {}))
    except models.HescapeModelError as exc:
        msg = f"--encoder {encoder}: {exc}"
        raise HescapeEvalError(msg) from None
    enc = enc.to(device).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    tag = str(getattr(enc, "weights_tag", "random-init"))
    random_init = tag == "random-init"
    if random_init:
        tag = f"random-init seed {seed}"
    opts = "" if not options else " " + json.dumps(options, sort_keys=True)
    note = _tile_scale_note(enc.contract, tile_px, tile_um_per_px)
    return EncoderSpec(enc, f"{encoder} {tag}{opts}", "registry", encoder, tag, random_init, note)


# --------------------------------------------------------------------------------------------------------------
# Baselines and results
# --------------------------------------------------------------------------------------------------------------

def baselines(labels: np.ndarray, folds: np.ndarray, result: MILResult) -> list[dict]:
    """Per test fold of ``result``: the all-positive and majority-class baselines (module docstring, step 6).

    Returns one dict per fold with ``all_positive_f1``, ``majority_class`` (of the training folds),
    ``majority_f1``, ``n_pos``, ``n_neg`` and ``auroc_null_sd`` (Mann–Whitney: ``sqrt((n+ + n- + 1) / (12 n+ n-))``).
    """
    from sklearn.metrics import f1_score

    out = []
    for f in result.folds:
        test = folds == f.test_fold
        train = (folds != f.test_fold) & (folds != f.val_fold)
        y = labels[test]
        npos, nneg = int(y.sum()), int((1 - y).sum())
        major = int(labels[train].sum() >= (1 - labels[train]).sum())
        out.append({"all_positive_f1": float(f1_score(y, np.ones_like(y), zero_division=0)),
                    "majority_class": major,
                    "majority_f1": float(f1_score(y, np.full_like(y, major), zero_division=0)),
                    "n_pos": npos, "n_neg": nneg,
                    "auroc_null_sd": math.sqrt((npos + nneg + 1) / (12 * npos * nneg))})
    return out


def _ms(values) -> tuple[float, float]:
    a = np.asarray(list(values), dtype=np.float64)
    return float(a.mean()), float(a.std())


def _f(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _sci(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-").replace("e+0", "e+")


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows(rows)
    return buf.getvalue()


def _num(x) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else repr(x)
    return str(x)


def write_results(out: str | os.PathLike, *, table: SlideTable, folds: np.ndarray, result: MILResult,
                  encoder: EncoderSpec, feature_files: Sequence[Path], n_tiles: Sequence[int], params: dict) -> dict:
    """Write the result files of :data:`OUTPUT_FILES` into ``out`` atomically; returns the JSON payload."""
    out = Path(out)
    base = baselines(table.labels, folds, result)
    (f1m, f1s), (aum, aus) = result.f1, result.auroc
    ap, mj = _ms(b["all_positive_f1"] for b in base), _ms(b["majority_f1"] for b in base)
    fold_rows = []
    for f, b in zip(result.folds, base, strict=True):
        fold_rows.append({"test_fold": f.test_fold, "val_fold": f.val_fold, "n_test": f.n_test, "n_pos": b["n_pos"],
                          "f1": f.f1, "auroc": f.auroc, "all_positive_f1": b["all_positive_f1"],
                          "majority_class": b["majority_class"], "majority_f1": b["majority_f1"],
                          "auroc_null_sd": b["auroc_null_sd"], "best_step": f.best_step,
                          "best_val_loss": f.best_val_loss})
    payload = {
        "format": MUTATION_FORMAT, "slides_csv": str(table.csv_path), "n_slides": len(table),
        "n_positive": int(table.labels.sum()), "n_sites": len(np.unique(table.sites)),
        "n_patients": len(np.unique(table.patients)), "n_tiles": int(np.sum(n_tiles)),
        "encoder": {"identity": encoder.identity, "kind": encoder.kind, "name": encoder.name,
                    "weights": encoder.weights, "random_init": encoder.random_init, "scale_note": encoder.scale_note,
                    "feature_dim": int(params.get("feature_dim", 0))},
        "protocol": params,
        "summary": {"f1": {"mean": f1m, "std": f1s}, "auroc": {"mean": aum, "std": aus},
                    "all_positive_f1": {"mean": ap[0], "std": ap[1]}, "majority_f1": {"mean": mj[0], "std": mj[1]},
                    "chance_auroc": 0.5, "auroc_null_sd_per_fold": float(np.mean([b["auroc_null_sd"] for b in base])),
                    "std": "np.std over folds (ddof 0)"},
        "folds": fold_rows,
    }
    # Markdown
    title = f"Mutation prediction: {table.csv_path.name}, encoder {encoder.identity}"
    caption = (f"{len(table)} slides ({int(table.labels.sum())} positive), {payload['n_sites']} sites, "
               f"{payload['n_tiles']:,} tiles of {params['tile_px']} px at {params['tile_um_per_px']} µm/px. "
               f"Transformer MIL ({params['depth']} layers, {params['heads']} heads of {params['dim_head']}), AdamW lr "
               f"{_sci(params['lr'])}, weight decay {_sci(params['weight_decay'])}, batch size 1, {params['epochs']} "
               f"epoch{'s' if params['epochs'] != 1 else ''}, "
               f"best validation loss every {params['val_every']} steps; {len(result.folds)} site-preserving folds "
               f"(test k, validation k-1, training the other {len(result.folds) - 2}), seed {params['seed']}. "
               "F1 of the positive class (threshold 0.5) and AUROC on each test fold, mean(std) over folds "
               "(std ddof 0). Baselines on the same folds: all positive = every slide called mutated; majority class "
               "= the majority label of the training folds (F1 0 when it is negative); both have AUROC 0.5.")
    lines = [f"# {title}", "", caption, ""]
    if encoder.random_init:
        lines += ["**The encoder is randomly initialised** (no published weights): these features carry no "
                  "pretraining.", ""]
    if encoder.scale_note:
        lines += [f"Note: {encoder.scale_note}.", ""]
    lines += ["| | F1 | AUROC |", "|---|---:|---:|",
              f"| Transformer MIL | {_f(f1m)}({_f(f1s)}) | {_f(aum)}({_f(aus)}) |",
              f"| *all positive* | {_f(ap[0])}({_f(ap[1])}) | 0.500 |",
              f"| *majority class* | {_f(mj[0])}({_f(mj[1])}) | 0.500 |", "",
              f"Null s.d. of one fold's AUROC (Mann–Whitney, averaged over folds): "
              f"{payload['summary']['auroc_null_sd_per_fold']:.3f}; of the mean over {len(result.folds)} folds about "
              f"{payload['summary']['auroc_null_sd_per_fold'] / math.sqrt(len(result.folds)):.3f}.", "",
              "| test fold | val fold | slides (positive) | F1 | AUROC | AUROC null s.d. | all-positive F1 | "
              "majority F1 | best step | val loss |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in fold_rows:
        lines.append(f"| {r['test_fold']} | {r['val_fold']} | {r['n_test']} ({r['n_pos']}) | {_f(r['f1'])} | "
                     f"{_f(r['auroc'])} | {_f(r['auroc_null_sd'])} | {_f(r['all_positive_f1'])} | "
                     f"{_f(r['majority_f1'])} | {r['best_step']} | {r['best_val_loss']:.4f} |")
    markdown = "\n".join(lines) + "\n"
    # CSV: one row per fold, then mean and std
    keys = ["test_fold", "val_fold", "n_test", "n_pos", "f1", "auroc", "all_positive_f1", "majority_class",
            "majority_f1", "auroc_null_sd", "best_step", "best_val_loss"]
    rows = [["row", *keys]]
    rows += [[f"fold {r['test_fold']}", *(_num(r[k]) for k in keys)] for r in fold_rows]
    for name, fn in (("mean", np.mean), ("std", np.std)):
        rows.append([name, "", "", "", "", *(_num(float(fn([r[k] for r in fold_rows]))) for k in
                                           ("f1", "auroc", "all_positive_f1")), "",
                     _num(float(fn([r["majority_f1"] for r in fold_rows]))), "", "", ""])
    # per-slide predictions and the feature table
    prob = np.full(len(table), np.nan)
    for f in result.folds:
        prob[np.flatnonzero(folds == f.test_fold)] = f.probs
    pred = [["slide_id", "path", "patient", "site", "label", "fold", "probability", "prediction"]]
    for i in range(len(table)):
        pred.append([table.slide_ids[i], str(table.paths[i]), table.patients[i], table.sites[i],
                     int(table.labels[i]), int(folds[i]), repr(float(prob[i])), int(prob[i] >= 0.5)])
    feats = [["path", "patient", "site", "label", "slide_id", "n_tiles"]]
    for i in range(len(table)):
        feats.append([str(Path(feature_files[i]).resolve()), table.patients[i], table.sites[i],
                      int(table.labels[i]), table.slide_ids[i], int(n_tiles[i])])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "features.csv", _csv(feats))
    atomic_write_text(out / "predictions.csv", _csv(pred))
    atomic_write_text(out / "mutation.csv", _csv(rows))
    atomic_write_text(out / "mutation.md", markdown)
    atomic_write_text(out / "mutation.json", json.dumps(payload, indent=1) + "\n")  # last: marks a finished run
    payload["markdown"] = markdown
    return payload


# --------------------------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; any other name is checked (a typo, or CUDA absent).

    Raises
    ------
    HescapeEvalError
        A name torch does not know, or a CUDA device on a machine without one.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HescapeEvalError.build(what=f"--device {device}", expected="cpu, cuda, cuda:N or auto",
                                     found=repr(device), fix="e.g. --device cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HescapeEvalError.build(what=f"--device {device}", expected="a visible CUDA device",
                                     found="none on this machine", fix="use --device cpu (or auto)")
    return device


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_mutation(slides_csv: str | os.PathLike, encoder: str, out: str | os.PathLike, *, weights: str | None = None,
                 encoder_options: dict | None = None, features_dir: str | os.PathLike | None = None,
                 batch_size: int = 64, device: str = "cpu", epochs: int = 10, lr: float = 2e-5,
                 weight_decay: float = 2e-5, val_every: int = 500, n_folds: int = 5, seed: int = 0,
                 min_tissue: float = 0.5, um_per_px: float | None = None, model_kwargs: dict | None = None,
                 overwrite: bool = False, progress: bool = True, quiet: bool = False) -> dict:
    """Tile, encode and cross-validate the slides of ``slides_csv``; write the results into ``out``.

    Parameters
    ----------
    slides_csv
        Slide table (:func:`read_slide_table`).
    encoder, weights, encoder_options
        :func:`load_encoder`.
    out
        Output folder; ``features_dir`` defaults to ``out/features`` (kept between runs: resuming reuses it).
    batch_size
        Tiles per encoder call.
    device
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available); encoder and MIL run there.
    epochs, lr, weight_decay, val_every, n_folds, seed
        The MIL protocol (paper §8.4 defaults: 10, 2e-5, 2e-5, 500, 5, 0).
    min_tissue, um_per_px
        Tiling (:func:`hescape.eval.wsi.tile_slide`): minimum tissue fraction of a tile; level-0 µm/px for slides
        without one in the file or the CSV.
    model_kwargs
        :class:`~hescape.eval.mil.TransformerMIL` overrides (tests use a small one); recorded in the results.
    overwrite
        Replace existing result files (the feature folder is always reused).
    progress, quiet
        Progress bars (stderr); ``quiet`` also silences the stage lines.

    Returns
    -------
    dict
        The ``mutation.json`` payload plus ``"markdown"``.

    Raises
    ------
    HescapeEvalError
        Everything the module docstring's step 2 checks, before any slide is tiled; a slide without tissue tiles
        (before any tile is encoded); a feature file of another encoder or tiling.
    """
    from .mil import TransformerMIL
    from .wsi import EDGE_FILL, TARGET_UM_PER_PX, _progress, slide_features, tile_slide

    if batch_size < 1 or epochs < 1 or val_every < 1 or lr <= 0 or weight_decay < 0 or n_folds < 3:
        raise HescapeEvalError.build(what="options",
                                     expected="--batch-size, --epochs, --val-every >= 1, --lr > 0, "
                                              "--weight-decay >= 0, --folds >= 3",
                                     found=f"batch_size={batch_size}, epochs={epochs}, val_every={val_every}, lr={lr}, "
                                           f"weight_decay={weight_decay}, folds={n_folds}",
                                     fix="pass valid values")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HescapeEvalError.build(what=f"--out {out}", expected="a folder", found="a file", fix="name a folder")
    if not overwrite:
        refuse_existing([out / name for name in OUTPUT_FILES])
    device = resolve_device(device)
    table = read_slide_table(slides_csv)
    infos = check_slides(table, um_per_px=um_per_px)  # every slide first: a bad path is named, not hidden by folds
    folds = site_folds(table.labels, table.sites, n_folds, seed)
    check_folds(folds, table.labels, table.sites, table.patients)
    tile_px = 256
    enc = load_encoder(encoder, weights, options=encoder_options, device=device, tile_px=tile_px,
                       tile_um_per_px=TARGET_UM_PER_PX, seed=seed)
    _log(f"{len(table)} slides ({int(table.labels.sum())} positive) from {len(np.unique(table.sites))} sites; "
         f"folds of {np.bincount(folds).tolist()} slides; encoder {enc.identity} on {device}", quiet)
    if enc.random_init:
        _log("warning: the encoder is randomly initialised (no published weights)", quiet)
    if enc.scale_note:
        _log(f"note: {enc.scale_note}", quiet)
    # tiling: every slide first, so a slide without tissue is refused before hours of encoding
    tiles = []
    bar = _progress(len(table), "tiling", progress and not quiet)
    for info, sid, mpp, line in zip(infos, table.slide_ids, table.um_per_px, table.rows, strict=True):
        t = tile_slide(info.path, um_per_px=mpp if mpp is not None else um_per_px, tile_px=tile_px,
                       min_tissue=min_tissue, slide_id=sid)
        if len(t) == 0:
            raise HescapeEvalError.build(what=f"slide table row {line} ({info.path})",
                                         expected=f"at least one tile with >= {min_tissue:.0%} tissue",
                                         found=f"none on a {info.shape_um[1]:.0f} x {info.shape_um[0]:.0f} µm slide "
                                               f"(Otsu threshold {t.otsu})",
                                         fix="check the slide (blank, or pen marks only), lower --min-tissue, or "
                                             "remove the row")
        tiles.append(t)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    n_tiles = [len(t) for t in tiles]
    cache = Path(features_dir) if features_dir is not None else out / "features"
    done = [(cache / f"{t.slide_id}.npz").exists() for t in tiles]
    n_edge = sum(int(t.edge.sum()) for t in tiles)
    n_edge_cells = sum(int(t.edge_cells.sum()) for t in tiles)
    _log(f"{sum(n_tiles):,} tiles, {n_edge:,} of them at a slide's right/bottom edge (padded with white; "
         f"{n_edge_cells - n_edge:,} edge tiles dropped with < {min_tissue:.0%} tissue); {sum(done)} of {len(tiles)} "
         f"slides already encoded in {cache}", quiet)
    bar = _progress(sum(n_tiles), "tiles encoded", progress and not quiet)

    def counted(x):
        y = enc.encode(x)
        if bar is not None:
            bar.update(len(x))
        return y

    bags, files = [], []
    for t in tiles:
        cached = (cache / f"{t.slide_id}.npz").exists()
        feats = slide_features(t, counted, batch_size, cache, encoder_name=enc.identity, device=device,
                               progress=False)
        if cached and bar is not None:
            bar.update(len(t))
        bags.append(np.asarray(feats, dtype=np.float32))
        files.append(cache / f"{t.slide_id}.npz")
    if bar is not None:
        bar.close()
    dim = int(bags[0].shape[1])
    mk = dict(model_kwargs or {})
    arch = {"depth": mk.get("depth", 2), "heads": mk.get("heads", 8), "dim_head": mk.get("dim_head", 64),
            "mlp_dim": mk.get("mlp_dim", 512), "pool": mk.get("pool", "cls")}
    TransformerMIL(dim, **mk)  # options checked before training
    _log(f"MIL: {len(folds)} slides, {n_folds} folds x {epochs} epochs on {dim}-d features", quiet)
    result = cross_validate_mil(bags, table.labels, table.sites, table.patients, folds=folds, epochs=epochs, lr=lr,
                                weight_decay=weight_decay, val_every=val_every, seed=seed, model_kwargs=mk or None,
                                device=device, verbose=not quiet, progress=progress and not quiet)
    params = {"tile_px": tile_px, "tile_um_per_px": TARGET_UM_PER_PX, "min_tissue": min_tissue,
              "edge_tiles": f"kept with >= min_tissue over the whole tile, padded with {EDGE_FILL} (white)",
              "n_edge_tiles": n_edge, **arch,
              "lr": lr, "weight_decay": weight_decay, "batch_size": 1, "epochs": epochs, "val_every": val_every,
              "n_folds": n_folds, "seed": seed, "feature_dim": dim, "features_dir": str(cache),
              "fold_assignment": "sklearn StratifiedGroupKFold(shuffle=True, random_state=seed) by site"}
    return write_results(out, table=table, folds=folds, result=result, encoder=enc, feature_files=files,
                         n_tiles=n_tiles, params=params)
