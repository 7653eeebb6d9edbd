"""Batch effects across runs: ``hescape-eval batch-effects RUN_DIR ... --out DIR`` (HESCAPE paper §8.3, Fig. 2).

For every ``hescape-train`` run directory:

1. **Dataset**: ``--dataset DIR`` when given, else the run's own (``config.json``: ``data_resolved``, the absolute
   path hescape-train recorded, else ``data.path``). Runs on the same dataset share steps 2–3.
2. **Spots**: every row of the dataset (all splits, :class:`hescape.data.PairedSpotDataset` order) with its raw
   counts, split and sample; spots without a single count are dropped (scanpy's ``normalize_total`` divides by the
   total) and counted; at most ``max_spots`` (20,000) are drawn at random (seeded) to bound scib's within-cluster
   distances.
3. **Silhouette-batch** (:func:`hescape.eval.batch_effects.batch_silhouette`): scanpy preprocessing of the counts
   (normalise, log1p, PCA 50, 15 neighbours), Leiden clusters as labels, scib-metrics ``silhouette_batch`` with the
   batch key ``split`` (the paper: train / validation / test) or ``sample``, on the expression PCA and, with the same
   clusters, on the run's image and gene embeddings of the same spots (its best checkpoint, :mod:`hescape.eval.embed`,
   hescape-models needed; ``embeddings=False`` skips them). Also: the share of spots scib scores (clusters holding a
   single batch are skipped) and the expression score with permuted batches (chance).
4. **Retrieval**: the run's test Recall@5 in both directions (:func:`hescape.eval.report.load_run`: from
   ``results.json``, protocol ``full``; or recomputed from ``embeddings/test.npz`` under ``protocol``), their mean
   and its chance level.

Outputs (written atomically; existing ones refused unless ``overwrite``): ``batch_effects.csv`` (one row per run),
``batch_effects.md`` (the same as a table) and ``silhouette_vs_recall.png``: silhouette-batch of expression against
mean Recall@5, one point per (dataset, model), seeds averaged (error bar: sample s.d. over seeds, ddof 1), labelled
with the share of spots scored when below 90 %, chance Recall@5 as a grey tick (the layout of the paper's Fig. 2,
:func:`hescape.eval.batch_effects.plot_silhouette_vs_recall`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._write import atomic_write_text, refuse_existing
from .errors import HescapeEvalError

__all__ = ["run_dataset", "load_spots", "subsample_rows", "batch_effects_report", "OUTPUT_FILES", "CSV_COLUMNS"]

#: Files written into the output folder.
OUTPUT_FILES = ("batch_effects.csv", "batch_effects.md", "silhouette_vs_recall.png")
#: Columns of ``batch_effects.csv``.
CSV_COLUMNS = ("run", "dataset", "panel", "model", "seed", "batch_key", "n_spots", "n_dropped_empty", "n_batches",
               "n_clusters", "coverage", "silhouette_expression", "silhouette_image", "silhouette_gene",
               "silhouette_chance", "i2g_R@5", "g2i_R@5", "mean_R@5", "chance_R@5", "protocol", "pool")


def _fail(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


def run_dataset(run_dir: str | os.PathLike) -> Path:
    """The dataset folder a run trained on (``config.json``: ``data_resolved``, else ``data.path``).

    Raises
    ------
    HescapeEvalError
        No ``config.json``, or neither path names a folder holding ``manifest.json``.
    """
    run = Path(run_dir)
    try:
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise _fail(what=f"run directory {run}", expected="a readable config.json (written by hescape-train)",
                    found=f"{type(exc).__name__}: {exc}", fix="pass hescape-train run directories") from None
    candidates = [cfg.get("data_resolved"), (cfg.get("data") or {}).get("path")]
    for c in candidates:
        if c and (Path(c) / "manifest.json").is_file():
            return Path(c)
    named = list(dict.fromkeys(str(c) for c in candidates if c))  # data.path and data_resolved are often equal
    raise _fail(what=f"dataset of run {run}", expected="a dataset folder with manifest.json",
                found=f"config.json names {', '.join(named) or 'none'}, "
                      f"{'not there' if len(named) == 1 else 'none of them there'}",
                fix="pass --dataset DIR (the dataset the run was trained on)")


def load_spots(dataset: str | os.PathLike) -> dict[str, np.ndarray]:
    """Raw counts ``(N, G)`` float32 and the ``split``, ``sample``, ``donor`` of every spot of a dataset.

    Raises
    ------
    HescapeEvalError
        hescape-data missing, or a dataset it refuses (the message is hescape-data's).
    """
    from .embed import _need

    data = _need("hescape.data")
    try:
        ds = data.PairedSpotDataset(dataset, None)
        counts = ds.raw_counts()
    except data.HescapeDataError as exc:
        msg = f"dataset {dataset}: {exc}"
        raise HescapeEvalError(msg) from None
    split_of = {s["name"]: s["split"] for s in ds.manifest["samples"]}
    sample = np.asarray(ds.samples).astype(str)
    return {"counts": counts, "sample": sample, "donor": np.asarray(ds.donors).astype(str),
            "split": np.asarray([split_of[s] for s in sample.tolist()]).astype(str), "genes": list(ds.genes)}


def subsample_rows(n: int, max_spots: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_spots`` of ``n`` rows, drawn without replacement (``default_rng(seed)``)."""
    if max_spots is None or n <= max_spots:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_spots), replace=False))


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _num(x) -> str:
    if isinstance(x, float | np.floating):
        return "" if math.isnan(x) else repr(float(x))
    return "" if x is None else str(x)


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def batch_effects_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                         dataset: str | os.PathLike | None = None, batch_key: str = "split",
                         max_spots: int | None = 20000, embeddings: bool = True, protocol: str | None = None,
                         device: str = "cpu", batch_size: int = 256, n_pcs: int = 50,
                         n_neighbors: int = 15, resolution: float = 1.0, seed: int = 0, figure: bool = True,
                         overwrite: bool = False, quiet: bool = False) -> dict:
    """Silhouette-batch of expression and embeddings, and Recall@5, of every run; CSV, Markdown and figure.

    Parameters
    ----------
    run_dirs
        ``hescape-train`` run directories (``config.json``, ``results.json`` or ``embeddings/test.npz``, and
        ``checkpoints/`` for the embeddings).
    out
        Output folder (:data:`OUTPUT_FILES`).
    dataset
        Dataset folder for every run (default: each run's own).
    batch_key
        ``"split"`` (the paper) or ``"sample"``.
    max_spots
        Spots drawn per dataset (``None``: all).
    embeddings
        Also score the run's image and gene embeddings (computed with its best checkpoint on the drawn spots).
    protocol
        Retrieval protocol of Recall@5 (:func:`hescape.eval.report.load_run`; ``None``: the run's results.json).
    device, batch_size
        Where and in which batches the embeddings are computed.
    n_pcs, n_neighbors, resolution, seed
        :func:`hescape.eval.batch_effects.batch_silhouette`; ``seed`` also draws the spots.
    figure
        Write ``silhouette_vs_recall.png`` (needs matplotlib).

    Returns
    -------
    dict
        ``{"rows": [one dict per run, keys CSV_COLUMNS], "files": [paths written], "markdown": str}``.

    Raises
    ------
    HescapeEvalError
        Existing outputs (without ``overwrite``), a run or dataset that cannot be read, fewer than two batches, a run
        whose gene panel differs from the dataset's, missing extras.
    """
    from .batch_effects import batch_silhouette, plot_silhouette_vs_recall
    from .mutation import resolve_device
    from .report import PAPER_PANEL_NAMES, load_run

    if batch_key not in ("split", "sample"):
        raise _fail(what="--batch-key", expected="'split' or 'sample'", found=repr(batch_key), fix="pick one")
    if not run_dirs:
        raise _fail(what="batch-effects", expected="at least one run directory", found="none", fix="pass RUN_DIR ...")
    if max_spots is not None and max_spots < 3:
        raise _fail(what="--max-spots", expected="at least 3", found=str(max_spots), fix="e.g. --max-spots 20000")
    if embeddings:
        device = resolve_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise _fail(what=f"--out {out}", expected="a folder", found="a file", fix="name a folder")
    files = [out / n for n in OUTPUT_FILES if figure or not n.endswith(".png")]
    if not overwrite:
        refuse_existing(files)
    if figure:
        from .batch_effects import _need

        _need("matplotlib.figure", "the silhouette-vs-recall figure")
    seen: set[Path] = set()
    records, groups = [], {}
    for r in run_dirs:
        run = Path(r).resolve()
        if run in seen:
            raise _fail(what=f"run {r}", expected="each run once", found="listed twice", fix="drop the duplicate")
        seen.add(run)
        rec = load_run(run, k=5, protocol=protocol)
        ds = Path(dataset) if dataset is not None else run_dataset(run)
        if not (ds / "manifest.json").is_file():
            raise _fail(what=f"--dataset {ds}", expected="a dataset folder with manifest.json", found="none there",
                        fix="pass the folder hescape-data built")
        records.append((run, rec, ds.resolve()))
        groups.setdefault(ds.resolve(), []).append(len(records) - 1)

    rows: list[dict] = [{} for _ in records]
    for ds, members in groups.items():
        spots = load_spots(ds)
        keep = np.flatnonzero(spots["counts"].sum(axis=1) > 0)
        dropped = len(spots["counts"]) - len(keep)
        rows_ds = keep[subsample_rows(len(keep), max_spots, seed)]
        batch = spots[batch_key][rows_ds]
        embs = {}
        if embeddings:
            from .embed import embed_split, load_trained_model

            for i in members:
                run = records[i][0]
                _log(f"embedding {len(rows_ds):,} spots of {ds} with {run}", quiet)
                model, genes, _ = load_trained_model(run, "best")
                if list(genes) != spots["genes"]:
                    raise _fail(what=f"run {run}", expected=f"the gene panel of dataset {ds} ({len(spots['genes'])} "
                                "genes)", found=f"a model of {len(genes)} genes",
                                fix="pass --dataset with the dataset the run was trained on")
                e = embed_split(model, ds, None, rows=rows_ds, batch_size=batch_size, device=device)
                embs[f"{i}:image"], embs[f"{i}:gene"] = e["image"], e["gene"]
        _log(f"silhouette-batch of {ds}: {len(rows_ds):,} spots, batch key {batch_key!r}", quiet)
        res = batch_silhouette(spots["counts"][rows_ds], batch, embeddings=embs, batch_key=batch_key, max_spots=None,
                               n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution, seed=seed)
        if not quiet:
            print(res.summary(), file=sys.stderr)
        for i in members:
            run, rec, _ = records[i]
            mean = (rec.recall["i2g"] + rec.recall["g2i"]) / 2
            chance = (rec.chance["i2g"] + rec.chance["g2i"]) / 2
            rows[i] = {"run": str(run), "dataset": str(ds), "panel": rec.panel, "model": rec.model, "seed": rec.seed,
                       "batch_key": batch_key, "n_spots": res.n_spots, "n_dropped_empty": int(dropped),
                       "n_batches": len(np.unique(batch)), "n_clusters": res.n_clusters, "coverage": res.coverage,
                       "silhouette_expression": res.scores["expression"],
                       "silhouette_image": res.scores.get(f"{i}:image", math.nan),
                       "silhouette_gene": res.scores.get(f"{i}:gene", math.nan),
                       "silhouette_chance": res.chance, "i2g_R@5": rec.recall["i2g"], "g2i_R@5": rec.recall["g2i"],
                       "mean_R@5": mean, "chance_R@5": chance, "protocol": rec.protocol, "pool": rec.pool}
    cols = list(CSV_COLUMNS)
    written = [atomic_write_text(out / "batch_effects.csv",
                                 _csv([cols] + [[_num(r[c]) for c in cols] for r in rows]))]
    # Markdown: one line per run
    lines = ["# Silhouette-batch and Recall@5", "",
             f"Batch key `{batch_key}`; Leiden clusters of expression (scanpy: normalise, log1p, PCA {n_pcs}, "
             f"{n_neighbors} neighbours, resolution {resolution}) as labels; scib-metrics silhouette_batch "
             "(1 = batches mixed within clusters, 0 = separated) on the expression PCA and, with the same clusters, "
             "on each run's image and gene embeddings of the same spots. Coverage = share of spots in clusters holding "
             "more than one batch (scib skips the others). Recall@5: the run's test retrieval, protocol and pool as "
             "listed.", "",
             "| run | dataset | model | seed | spots | coverage | expression | image | gene | permuted | "
             "I2G R@5 | G2I R@5 | mean (chance) | protocol, pool |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {Path(r['run']).name} | {Path(r['dataset']).name} | {r['model']} | {r['seed']} | "
                     f"{r['n_spots']:,} | {r['coverage']:.1%} | {_fmt(r['silhouette_expression'])} | "
                     f"{_fmt(r['silhouette_image'])} | {_fmt(r['silhouette_gene'])} | {_fmt(r['silhouette_chance'])} | "
                     f"{_fmt(r['i2g_R@5'])} | {_fmt(r['g2i_R@5'])} | {_fmt(r['mean_R@5'])} "
                     f"({_fmt(r['chance_R@5'])}) | {r['protocol']}, {r['pool']} |")
    markdown = "\n".join(lines) + "\n"
    written.append(atomic_write_text(out / "batch_effects.md", markdown))
    result = {"rows": rows, "files": written, "markdown": markdown}
    if figure:
        points: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            points.setdefault((r["dataset"], r["model"]), []).append(r)
        models = {m for _, m in points}
        fig_rows, skipped = [], []
        for (ds, model), rs in points.items():
            sil = rs[0]["silhouette_expression"]
            if math.isnan(sil):
                skipped.append(f"{Path(ds).name} ({model})")
                continue
            panel = PAPER_PANEL_NAMES.get(rs[0]["panel"], rs[0]["panel"])
            label = panel if len(models) == 1 else f"{panel} {model}"
            notes = [f"n={len(rs)}"] if len(rs) > 1 else []
            if rs[0]["coverage"] < 0.9:  # scib skipped the single-batch clusters: the score overstates mixing
                notes.append(f"{rs[0]['coverage']:.0%} scored")
            fig_rows.append({"label": label + (f" ({', '.join(notes)})" if notes else ""), "silhouette_batch": sil,
                             "recall_at_5": float(np.mean([x["mean_R@5"] for x in rs])),
                             "recall_std": float(np.std([x["mean_R@5"] for x in rs], ddof=1)) if len(rs) > 1 else None,
                             "chance_recall_at_5": float(np.mean([x["chance_R@5"] for x in rs]))})
        if fig_rows:
            title = f"Silhouette-batch (batch key: {batch_key}) vs mean Recall@5"
            written.append(plot_silhouette_vs_recall(fig_rows, out / "silhouette_vs_recall.png", title=title))
        result["figure_skipped"] = skipped
    return result
