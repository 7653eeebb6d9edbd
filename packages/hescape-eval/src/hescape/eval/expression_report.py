"""``hescape-eval expression``: the HEST expression probe (paper Table 6) on saved embeddings, with its report files.

Inputs: an embeddings file — a ``hescape-train`` run's ``RUN_DIR/embeddings/test.npz`` or one written by
``hescape-eval embed`` for any model — joined row by row to the dataset it was computed on
(:func:`hescape.eval.run_data.open_run_spots`: raw counts, gene names, sample, donor and split of each row). The
probe's features are the **image** embeddings by default (HEST predicts expression from image features);
``modality="gene"`` probes the gene embeddings instead.

Protocols
---------
``paper`` (default)
    HESCAPE's Table 6: cross-validation over the samples of the *test* split, folds by patient (donor)
    (:func:`hescape.eval.expression.expression_probe` with ``splits``, ``use_split="test"``; peng-lab/hescape issue
    #12). Leave one patient out, or ``GroupKFold(n_splits)``.
``cv``
    The same cross-validation over every row of the embeddings file, whatever its split (HEST's own protocol on one
    task: ``expression_probe`` without ``splits``).
``train-test``
    Fit on the rows of a second embeddings file (the train split, e.g. ``hescape-eval embed RUN DATASET --split train
    --out train.npz``), score the rows of the first: one split, no fold std (:func:`train_test_probe`). The two
    files may not share a donor.

Each step of the probe (gene selection, ``log1p`` targets, StandardScaler → PCA → Ridge(lsqr, no intercept,
α = 100 / (n_components · n_genes)), Pearson's r and MSE) is :mod:`hescape.eval.expression`'s; ``train_test_probe``
only runs its per-fold step once on a given train/test pair. The PCA width defaults to ``min(256, d)``: HEST's 256,
or the embedding width when narrower (peng-lab/hescape's HEST config sets ``latent_dim: 128`` for its 128-d
embeddings).

Outputs (``--out DIR``; all staged as temporary files, then moved into place; existing ones refused unless
``overwrite``): ``expression.md`` and ``expression.csv`` (Pearson's r and MSE, mean (std) over folds, for the probe and
its baselines; protocol, folds, spots and genes in the header), ``expression_genes.csv`` (per gene:
:meth:`ExpressionProbeResult.to_csv`; per fold and gene when genes are chosen per training fold) and
``expression.json`` (every parameter, the genes, per-fold numbers).
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._write import atomic_write_text, publish, refuse_existing
from .errors import HescapeEvalError, HescapeEvalWarning, plain_list
from .expression import (
    DEFAULT_ALPHA_GRID,
    HEST_MIN_CELLS_PCT,
    HEST_N_COMPONENTS,
    HEST_N_GENES,
    HEST_SEED,
    ExpressionFold,
    ExpressionProbeResult,
    ProbeScores,
    expression_probe,
    pearson_per_gene,
    select_variable_genes,
)
from .io import _umask, probe_writable, remove_if_empty

__all__ = ["PROTOCOLS", "OUTPUT_FILES", "read_gene_list", "train_test_probe", "expression_report", "context_line"]

#: ``--protocol`` choices (module docstring).
PROTOCOLS = ("paper", "cv", "train-test")
#: Files written into ``--out``.
OUTPUT_FILES = ("expression.md", "expression.csv", "expression_genes.csv", "expression.json")
_DESCRIBE = {"paper": "cross-validation over the test split's samples, folds by patient (HESCAPE Table 6)",
             "cv": "cross-validation over every row of the embeddings, folds by patient (HEST)",
             "train-test": "fit on the train embeddings, scored on the test embeddings (one split)"}


def _fail(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


def read_gene_list(text: str) -> list[str]:
    """Genes from ``--genes``: a JSON file (HEST's ``var_50genes.json``: ``{"genes": [...]}``, or a JSON list), a text
    file (one gene a line), or comma-separated names.

    Raises
    ------
    HescapeEvalError
        An unreadable file, JSON of another shape, or no gene.
    """
    p = Path(text)
    if p.is_file():
        try:
            raw = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is not part of a name
        except OSError as exc:
            raise _fail(what=f"--genes {p}", expected="a readable file", found=exc.strerror or str(exc),
                        fix="check the path") from None
        if p.suffix == ".json":
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise _fail(what=f"--genes {p}", expected="JSON", found=f"invalid JSON ({exc})",
                            fix="pass HEST's var_50genes.json or a JSON list of names") from None
            value = value.get("genes") if isinstance(value, dict) else value
            if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
                raise _fail(what=f"--genes {p}", expected='{"genes": [names]} or a JSON list of names',
                            found=type(value).__name__, fix="pass HEST's var_50genes.json layout")
            genes = value
        else:
            genes = [line.strip() for line in raw.splitlines() if line.strip()]
    else:
        genes = [g.strip() for g in text.split(",") if g.strip()]
    if not genes:
        raise _fail(what="--genes", expected="at least one gene name", found=repr(text),
                    fix="pass names such as ERBB2,ESR1 or a var_50genes.json file")
    return genes


# ------------------------------------------------------------------------------------------------- train → test


def _stack(a, b):
    if hasattr(a, "tocsr") and hasattr(a, "nnz"):
        import scipy.sparse

        return scipy.sparse.vstack([a, b]).tocsr()
    return np.concatenate([np.asarray(a), np.asarray(b)])


def train_test_probe(x_train, x_test, counts_train, counts_test, gene_names: Sequence[str], patients_train,
                     patients_test, *, samples_train=None, samples_test=None, genes: Sequence[str] | None = None,
                     n_genes: int = HEST_N_GENES, gene_selection: str = "all",
                     min_cells_pct: float = HEST_MIN_CELLS_PCT, n_components: int = HEST_N_COMPONENTS,
                     alpha: str | float = "hest", alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                     inner_splits: int = 3, seed: int = HEST_SEED, fit_intercept: bool = False,
                     images_train=None, images_test=None) -> ExpressionProbeResult:
    """The HEST probe fitted on one set of spots and scored on another (one split instead of patient folds).

    The fit, prediction and scores are those of one fold of :func:`hescape.eval.expression.expression_probe` (its
    ``_fit_predict`` pipeline and :func:`~hescape.eval.expression.pearson_per_gene`); genes are chosen by
    :func:`~hescape.eval.expression.select_variable_genes` on both sets (``gene_selection="all"``, HEST: every
    sample of the task) or the training set only (``"train"``), unless ``genes`` are given.

    Parameters
    ----------
    x_train, x_test
        ``(N_train, D)`` and ``(N_test, D)`` embeddings.
    counts_train, counts_test
        Raw counts ``(N_train, G)``, ``(N_test, G)`` (numpy or scipy.sparse), columns ``gene_names``.
    patients_train, patients_test
        Patient (donor) of each row; the two sets may not share one. ``alpha="cv"`` groups its inner folds by them.
    samples_train, samples_test
        Sample of each row, for the per-sample detection filter of the gene selection (default: the patients).
    images_train, images_test
        Optional ``(N, H, W, 3)`` uint8 patches: adds the colour-statistics probe.
    Other parameters
        As :func:`~hescape.eval.expression.expression_probe`.

    Returns
    -------
    ExpressionProbeResult
        One fold (``folds[0].test_patients``: the test set's patients); ``params["protocol"] == "train-test"``.

    Raises
    ------
    HescapeEvalError
        Bad shapes or values (as ``expression_probe``), a patient in both sets, genes the data lacks, a PCA wider
        than the embedding or the training set.
    """
    from . import expression as E

    xtr, xte = E._dense_float(x_train, "train embeddings"), E._dense_float(x_test, "test embeddings")
    if xtr.shape[1] != xte.shape[1]:
        raise _fail(what="train and test embeddings", expected="the same width", found=f"{xtr.shape[1]} and "
                    f"{xte.shape[1]}", fix="embed both splits with the same model and modality")
    ctr, cte = E._Counts(counts_train), E._Counts(counts_test)
    for what, x, c in (("train", xtr, ctr), ("test", xte, cte)):
        if c.shape[0] != x.shape[0]:
            raise _fail(what=f"{what} embeddings and counts", expected="one row per spot in both",
                        found=f"{x.shape[0]} and {c.shape[0]} rows", fix="pass the counts of the same spots")
    if ctr.shape[1] != cte.shape[1]:
        raise _fail(what="train and test counts", expected="the same genes", found=f"{ctr.shape[1]} and "
                    f"{cte.shape[1]} columns", fix="use one gene panel")
    names = E._gene_names(gene_names, ctr.shape[1])
    ptr = E._labels(patients_train, len(xtr), "train patients")
    pte = E._labels(patients_test, len(xte), "test patients")
    str_ = ptr if samples_train is None else E._labels(samples_train, len(xtr), "train samples")
    ste = pte if samples_test is None else E._labels(samples_test, len(xte), "test samples")
    shared = sorted(set(ptr) & set(pte))
    if shared:
        raise _fail(what="train and test patients", expected="disjoint sets (a patient in both leaks its tissue)",
                    found=f"{len(shared)} shared, e.g. {plain_list(shared, 3)}", fix="embed the train and test splits of one "
                    "donor-split dataset")
    alpha = E._check_probe_options(genes, n_genes, min_cells_pct, gene_selection, alpha)
    E._check_seed(seed)
    k = int(n_components)
    if k < 1 or k > xtr.shape[1] or k > len(xtr):
        top = min(xtr.shape[1], len(xtr))
        raise _fail(what=f"n_components={n_components} (--n-components {n_components})",
                    expected=f"between 1 and the embedding width {xtr.shape[1]} and the training spots {len(xtr)}",
                    found=str(n_components), fix=f"pass n_components={top} or less (--n-components {top})")
    if genes is not None:
        chosen = E._check_genes(genes, names)
    else:
        rows = None if gene_selection == "all" else np.arange(len(xtr))
        chosen = select_variable_genes(_stack(ctr.x, cte.x), names, np.concatenate([str_, ste]), n_genes=n_genes,
                                       min_cells_pct=min_cells_pct, rows=rows)
    col = {g: i for i, g in enumerate(names)}
    gi = np.array([col[g] for g in chosen])
    y_tr, y_te = np.log1p(ctr.columns(gi)), np.log1p(cte.columns(gi))
    kw = {"alpha": alpha, "alpha_grid": alpha_grid, "inner_splits": inner_splits, "seed": seed,
          "fit_intercept": fit_intercept}
    runs = [("model", "embeddings", xtr, xte, k)]
    if images_train is not None or images_test is not None:
        from .baselines import colour_statistics

        if images_train is None or images_test is None:
            raise _fail(what="images", expected="patches of both sets", found="one set", fix="pass both or neither")
        ftr, fte = colour_statistics(np.asarray(images_train)), colour_statistics(np.asarray(images_test))
        runs.append(("colour", "colour statistics", ftr, fte, min(k, ftr.shape[1])))
    scores: dict[str, ProbeScores] = {}
    for key, name, a_tr, a_te, width in runs:
        pred, a = E._fit_predict(a_tr, y_tr, a_te, ptr, n_components=width, **kw)
        r, u = pearson_per_gene(y_te, pred)
        scores[key] = ProbeScores(name, r[None], ((pred - y_te) ** 2).mean(axis=0)[None], u[None], (a,), width)
    base = np.broadcast_to(y_tr.mean(axis=0), y_te.shape)  # the mean predictor: Pearson's r undefined
    n_g = len(chosen)
    mean = ProbeScores("mean predictor", np.zeros((1, n_g)), ((base - y_te) ** 2).mean(axis=0)[None],
                       np.ones((1, n_g), dtype=bool), (None,), None)
    if scores["model"].n_undefined:
        warnings.warn(f"{scores['model'].n_undefined} gene(s) with Pearson's r undefined (constant values in the test "
                      "set), counted as 0", HescapeEvalWarning, stacklevel=2)
    params = {"protocol": "train-test", "use_split": None, "n_spots": len(xtr) + len(xte), "n_train": len(xtr),
              "n_test": len(xte), "n_patients": len(set(ptr)) + len(set(pte)), "n_components": k, "alpha": alpha,
              "seed": seed, "fit_intercept": fit_intercept,
              "gene_selection": "given" if genes is not None else gene_selection, "min_cells_pct": min_cells_pct,
              "folds": "train -> test", "fold_genes": None}
    return ExpressionProbeResult(genes=tuple(chosen), folds=(ExpressionFold(tuple(sorted({str(p) for p in pte})), len(xtr),
                                                                              len(xte)),),
                                 model=scores["model"], mean_baseline=mean, colour_baseline=scores.get("colour"),
                                 params=params)


# ------------------------------------------------------------------------------------------------------- report


def _check_options(protocol, modality, n_splits, n_components, inner_splits) -> None:
    if protocol not in PROTOCOLS:
        raise _fail(what="--protocol", expected=f"one of {list(PROTOCOLS)}", found=repr(protocol), fix="pick one")
    if modality not in ("image", "gene"):
        raise _fail(what="--modality", expected="'image' or 'gene'", found=repr(modality), fix="pick one")
    if n_splits is not None and (protocol == "train-test" or n_splits < 2):
        raise _fail(what="--folds", expected="an integer >= 2 with a cross-validation protocol (paper, cv)",
                    found=f"{n_splits} with protocol {protocol}",
                    fix="omit --folds (leave one patient out) or pass --folds 5")
    if n_components is not None and n_components < 1:
        raise _fail(what="--n-components", expected="a positive integer", found=str(n_components), fix="e.g. 128")
    if inner_splits < 2:
        raise _fail(what="--inner-folds", expected="an integer >= 2", found=str(inner_splits), fix="e.g. 3")


def _prepare_out(out: Path, overwrite: bool) -> bool:
    """Refuse a file or existing outputs; make the folder and prove it writable. Returns whether it was created."""
    if out.exists() and not out.is_dir():
        raise _fail(what=f"--out {out}", expected="a folder (or a path where one can be made)", found="a file",
                    fix="name a folder, e.g. --out reports/expression")
    if not overwrite:
        refuse_existing([out / n for n in OUTPUT_FILES])
    created = not out.exists()
    try:
        probe_writable(out)  # unwritable: refused now, not after the work
    except OSError as exc:
        if created and out.is_dir():
            out.rmdir()
        raise _fail(what=f"--out {out}", expected="a folder this command can create and write",
                    found=exc.strerror or type(exc).__name__, fix="check the path and its permissions, or choose "
                    "another --out") from None
    return created


def _check_patients(protocol: str, donors: np.ndarray, split: np.ndarray, n_splits: int | None) -> None:
    """Refuse, in the command's words, a cross-validation that cannot run (before the dataset's counts are read)."""
    if protocol == "paper":
        found = sorted(set(split.tolist()))
        if "test" not in found:
            raise _fail(what="--protocol paper", expected="embeddings of the test split (CV over its samples)",
                        found=f"rows of split(s) {found}", fix="pass --protocol cv to cross-validate over these rows, "
                        "or the test split's embeddings")
        donors = donors[split == "test"]
    names = sorted(set(donors.tolist()))
    where = "the test split" if protocol == "paper" else "the embeddings"
    if len(names) < 2:
        raise _fail(what=f"patients (donors) of {where}", expected="at least 2 (folds hold out whole patients)",
                    found=f"{len(names)} ({', '.join(names)})", fix="probe a split of several donors, or use "
                    "--protocol train-test with --train-embeddings of the train split")
    if n_splits is not None and n_splits > len(names):
        raise _fail(what=f"--folds {n_splits}", expected=f"at most the number of patients of {where} ({len(names)})",
                    found=str(n_splits), fix="pass fewer --folds, or omit it (leave one patient out)")


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _g(x) -> str:
    return f"{float(x):.6g}"


def _alpha_text(res: ExpressionProbeResult, alpha) -> str:
    used = sorted({a for a in res.model.alphas if a is not None})
    shown = ", ".join(f"{a:.4g}" for a in used[:4]) + (", ..." if len(used) > 4 else "")
    if alpha == "hest":
        return f"HEST's 100 / (PCA · genes) = {shown}"
    if alpha == "cv":
        return f"chosen per training fold by inner grouped cross-validation: {shown}"
    return f"fixed {shown}"


def _predictors(res: ExpressionProbeResult, modality: str) -> list[tuple[str, ProbeScores]]:
    rows = [(f"probe on {modality} embeddings", res.model)]
    if res.colour_baseline is not None:
        rows.append(("probe on colour statistics (baseline)", res.colour_baseline))
    rows.append(("mean predictor (chance)", res.mean_baseline))
    return rows


def _markdown(res: ExpressionProbeResult, info: dict) -> str:
    n_f = len(res.folds)
    folds = (f"{n_f} fold(s) by patient ({res.params['folds']})" if info["protocol"] != "train-test"
             else "1 split (train → test; no std over folds)")
    lines = ["# Expression prediction: HEST ridge probe", "",
             f"Source `{info['source']}` ({info['modality']} embeddings, d = {info['d']}); "
             f"dataset `{info['dataset']}`.",
             "",
             f"Protocol **{info['protocol']}**: {_DESCRIBE[info['protocol']]}; {folds}; "
             f"{res.params['n_spots']} spots of {res.params['n_patients']} patients; {len(res.genes)} genes "
             f"({info['gene_source']}); StandardScaler → PCA {res.model.n_components} → Ridge (lsqr, "
             f"{'with' if res.params['fit_intercept'] else 'no'} intercept), α {_alpha_text(res, info['alpha'])}; "
             f"seed {res.params['seed']}.", "",
             "| predictor | Pearson r, mean (std) | MSE, mean (std) |", "|---|---:|---:|"]
    for name, s in _predictors(res, info["modality"]):
        r = ("undefined (reported as 0)" if s is res.mean_baseline else
             f"{s.pearson_mean:.3f} ({s.pearson_std:.3f})")
        lines.append(f"| {name} | {r} | {s.mse_mean:.3f} ({s.mse_std:.3f}) |")
    lines += ["", "Pearson's r per gene between measured and predicted log1p counts over a fold's test spots, averaged "
              "over genes; mean and population std (ddof 0) over folds, as HEST's merge_fold_results. MSE in (log1p "
              "counts)²; without an intercept it includes each gene's squared mean, so compare it with the mean "
              "predictor's (each gene's training mean; its Pearson's r is undefined and reported as 0)."]
    if res.model.n_undefined:
        lines += ["", f"{res.model.n_undefined} fold×gene Pearson's r undefined (constant values), counted as 0."]
    lines += ["", "| fold | held-out patients | train spots | test spots | Pearson r | MSE | α |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for i, f in enumerate(res.folds):
        lines.append(f"| {i} | {', '.join(f.test_patients)} | {f.n_train} | {f.n_test} | "
                     f"{res.model.fold_pearson[i]:.3f} | {res.model.fold_mse[i]:.3f} | {res.model.alphas[i]:.4g} |")
    return "\n".join(lines) + "\n"


def _summary_csv(res: ExpressionProbeResult, info: dict) -> str:
    header = ["predictor", "pearson_mean", "pearson_std", "mse_mean", "mse_std", "n_undefined", "protocol",
              "n_folds", "n_spots", "n_patients", "n_genes", "modality", "n_components", "alpha"]
    rows = [header]
    for name, s in _predictors(res, info["modality"]):
        rows.append([name, _g(s.pearson_mean), _g(s.pearson_std), _g(s.mse_mean), _g(s.mse_std), s.n_undefined,
                     info["protocol"], len(res.folds), res.params["n_spots"], res.params["n_patients"], len(res.genes),
                     info["modality"], "" if s.n_components is None else s.n_components, info["alpha"]])
    return _csv_text(rows)


def _long_genes_csv(res: ExpressionProbeResult) -> str:
    """Per fold and gene, when each training fold chose its own genes (``to_csv`` needs one gene list)."""
    rows = [["fold", "gene", "pearson", "mse", "undefined", "mean_baseline_mse"]]
    for i, genes in enumerate(res.params["fold_genes"]):
        for j, g in enumerate(genes):
            rows.append([i, g, _g(res.model.pearson[i, j]), _g(res.model.mse[i, j]), int(res.model.undefined[i, j]),
                         _g(res.mean_baseline.mse[i, j])])
    return _csv_text(rows)


def _scores_json(s: ProbeScores | None) -> dict | None:
    if s is None:
        return None
    return {"name": s.name, "pearson_mean": s.pearson_mean, "pearson_std": s.pearson_std, "mse_mean": s.mse_mean,
            "mse_std": s.mse_std, "n_undefined": s.n_undefined, "fold_pearson": s.fold_pearson.tolist(),
            "fold_mse": s.fold_mse.tolist(), "alphas": list(s.alphas), "n_components": s.n_components}


def _write_all(out: Path, texts: dict[str, str], res: ExpressionProbeResult, overwrite: bool) -> list[Path]:
    """Stage every file as a hidden temporary in ``out``, then move each into place (nothing half-written)."""
    staged: dict[str, Path] = {}
    try:
        for name in OUTPUT_FILES:
            tmp = out / f".{name}.{os.getpid()}.partial"
            staged[name] = tmp
            if name in texts:
                atomic_write_text(tmp, texts[name])
            else:  # the per-gene table of the API
                res.to_csv(tmp)
                os.chmod(tmp, 0o666 & ~_umask())
        return [publish(staged[name], out / name, overwrite=overwrite) for name in OUTPUT_FILES]
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def expression_report(source: str | os.PathLike, out: str | os.PathLike, *, dataset: str | os.PathLike | None = None,
                      split: str | None = None, train_embeddings: str | os.PathLike | None = None,
                      modality: str = "image", protocol: str = "paper", genes: Sequence[str] | None = None,
                      n_genes: int = HEST_N_GENES, gene_selection: str = "all",
                      min_cells_pct: float = HEST_MIN_CELLS_PCT, n_components: int | None = None,
                      alpha: str | float = "hest", inner_splits: int = 3, n_splits: int | None = None,
                      seed: int = HEST_SEED, colour_baseline: bool = False, overwrite: bool = False) -> dict:
    """Run the HEST probe on saved embeddings and write its report (module docstring: protocols and files).

    Parameters
    ----------
    source
        A run directory (``RUN_DIR/embeddings/test.npz``) or an embeddings ``.npz`` (``hescape-eval embed``).
    out
        Output folder.
    dataset, split
        The dataset the embeddings were computed on (default: the run's) and the split the file's ``index`` counts
        (default: read off the manifest); :func:`hescape.eval.run_data.open_run_spots`.
    train_embeddings
        ``protocol="train-test"``: embeddings of the training spots (default ``RUN_DIR/embeddings/train.npz``).
    modality
        ``"image"`` (default, as HEST) or ``"gene"``: which embedding is the probe's input.
    protocol
        ``"paper"``, ``"cv"`` or ``"train-test"``.
    n_components
        PCA width; default ``min(256, d)``.
    colour_baseline
        Also probe the colour statistics of the patches (loads the spots' patches into memory: N × H × W × 3 bytes).
    Other parameters
        As :func:`hescape.eval.expression.expression_probe`.

    Returns
    -------
    dict
        ``{"result": ExpressionProbeResult, "markdown": str, "files": [paths], "info": dict}``.

    Raises
    ------
    HescapeEvalError
        Existing outputs without ``overwrite``, an ``out`` that is a file, a source without embeddings, a dataset that
        does not match them, genes the dataset lacks, too few patients or spots for the folds, bad options, and
        an ``out`` that cannot be made or written (refused before the probe runs).
    """
    _check_options(protocol, modality, n_splits, n_components, inner_splits)
    if train_embeddings is not None and protocol != "train-test":
        raise _fail(what="--train-embeddings", expected="only with --protocol train-test", found=f"protocol {protocol}",
                    fix="drop --train-embeddings or pass --protocol train-test")
    from .run_data import dataset_patches, open_run_spots

    out = Path(out)
    created = _prepare_out(out, overwrite)
    try:
        spots = open_run_spots(source, dataset=dataset, split=split)
        emb = spots.embeddings
        x = emb.image if modality == "image" else emb.gene
        d = x.shape[1]
        k = n_components if n_components is not None else min(HEST_N_COMPONENTS, d)
        common = {"genes": genes, "n_genes": n_genes, "gene_selection": gene_selection,
                  "min_cells_pct": min_cells_pct, "n_components": k, "alpha": alpha, "inner_splits": inner_splits,
                  "seed": seed}
        chosen_on = "every spot probed" if gene_selection == "all" else "each training fold"
        info = {"source": str(emb.path), "dataset": str(spots.dataset), "modality": modality, "d": d,
                "protocol": protocol, "alpha": alpha, "embedded_split": spots.embedded_split,
                "gene_source": "given" if genes is not None else f"the {n_genes} most variable, chosen on {chosen_on}"}
        if protocol == "train-test":
            train_src = Path(train_embeddings) if train_embeddings is not None else None
            if train_src is None:
                if spots.run_dir is None:
                    raise _fail(what="--protocol train-test", expected="--train-embeddings FILE.npz",
                                found="none, and no run directory", fix="hescape-eval embed MODEL DATASET --split "
                                "train --out train.npz, then pass --train-embeddings train.npz")
                train_src = spots.run_dir / "embeddings" / "train.npz"
                if not train_src.is_file():
                    raise _fail(what="--protocol train-test", expected=f"--train-embeddings FILE.npz (or {train_src})",
                                found="neither", fix=f"hescape-eval embed {spots.run_dir} {spots.dataset} --split "
                                "train --out train.npz, then pass --train-embeddings train.npz")
            train = open_run_spots(train_src, dataset=spots.dataset)
            if len(np.intersect1d(train.rows, spots.rows)):
                raise _fail(what=f"train embeddings {train.embeddings.path}", expected="spots other than the test's",
                            found=f"{len(np.intersect1d(train.rows, spots.rows))} spot(s) in both",
                            fix="embed the train split for --train-embeddings")
            xt = train.embeddings.image if modality == "image" else train.embeddings.gene
            patches = (dataset_patches(train), dataset_patches(spots)) if colour_baseline else (None, None)
            res = train_test_probe(xt, x, train.counts(), spots.counts(), spots.genes, train.embeddings.donor,
                                   emb.donor, samples_train=train.embeddings.sample, samples_test=emb.sample,
                                   images_train=patches[0], images_test=patches[1], **common)
            info["train_source"] = str(train.embeddings.path)
        else:
            _check_patients(protocol, emb.donor, spots.split, n_splits)
            res = expression_probe(x, spots.counts(), spots.genes, emb.donor, samples=emb.sample,
                                   splits=spots.split if protocol == "paper" else None,
                                   use_split="test" if protocol == "paper" else None, n_splits=n_splits,
                                   images=dataset_patches(spots) if colour_baseline else None, **common)
        markdown = _markdown(res, info)
        payload = {"format": "hescape-expression/1", **info, "genes": list(res.genes), "n_genes": len(res.genes),
                   "n_folds": len(res.folds), "n_spots": res.params["n_spots"], "options": {
                       "genes": list(genes) if genes is not None else None, "n_genes": n_genes,
                       "gene_selection": gene_selection, "min_cells_pct": min_cells_pct, "n_components": k,
                       "alpha": alpha, "inner_splits": inner_splits, "folds": n_splits, "seed": seed,
                       "colour_baseline": colour_baseline},
                   "params": res.params, "metrics": res.as_dict(),
                   "folds": [{"test_patients": list(f.test_patients), "n_train": f.n_train, "n_test": f.n_test}
                             for f in res.folds],
                   "model": _scores_json(res.model), "mean_baseline": _scores_json(res.mean_baseline),
                   "colour_baseline": _scores_json(res.colour_baseline)}
        texts = {"expression.md": markdown, "expression.csv": _summary_csv(res, info),
                 "expression.json": json.dumps(payload, indent=1, allow_nan=False) + "\n"}
        if res.params.get("fold_genes"):
            texts["expression_genes.csv"] = _long_genes_csv(res)
        files = _write_all(out, texts, res, overwrite)
    except BaseException:
        if created:
            remove_if_empty(out)  # nothing of ours is left
        raise
    return {"result": res, "markdown": markdown, "files": files, "info": info}


def context_line(res: ExpressionProbeResult) -> str:
    """One line setting the probe beside its chance levels (printed by the CLI)."""
    m, b = res.model, res.mean_baseline
    text = (f"probe Pearson r {m.pearson_mean:.3f} vs 0 for the mean predictor (chance); MSE {m.mse_mean:.3f} vs "
            f"{b.mse_mean:.3f} for the mean predictor")
    if res.colour_baseline is not None:
        c = res.colour_baseline
        text += f"; colour-statistics probe r {c.pearson_mean:.3f}, MSE {c.mse_mean:.3f}"
    return text
