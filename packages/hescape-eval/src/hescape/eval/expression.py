"""Gene-expression prediction from patch embeddings: the HEST-Benchmark ridge probe, folds by patient.

Protocol (checked against mahmoodlab/HEST at commit ``afd42c3``)
----------------------------------------------------------------
For one task, with patch embeddings ``X`` ``(N, D)`` from any image encoder and raw counts ``(N, G)``:

1. **Genes** (:func:`select_variable_genes`; HEST ``src/hest/utils.py`` ``get_k_genes``, called with ``k=50,
   criteria="var"`` by ``src/hest/HESTData.py`` ``create_benchmark_data``): in every sample keep the genes counted
   (count > 0) in at least ``ceil(0.10 · n_spots)`` of its spots (``sc.pp.filter_genes(min_cells=...)``), intersect
   over samples, drop names containing ``BLANK`` or ``Control``, stack the raw counts of all samples, ``log1p``, and
   take scanpy's ``highly_variable_genes(n_top_genes=50)`` (default flavour ``"seurat"``). HEST selects the genes
   once per task on **all** its samples, train and test folds together ("HVGs were determined on all samples for
   each task", HEST issue #89); ``gene_selection="train"`` selects them on each training fold instead.
2. **Targets** (HEST ``src/hest/bench/st_dataset.py`` ``load_adata(normalize=True)`` → ``normalize_adata``):
   ``log1p`` of the *raw* counts of the selected genes; no library-size normalisation (``normalize_adata``'s
   docstring says so, its code only calls ``sc.pp.log1p``).
3. **Features** (HEST ``src/hest/bench/benchmark.py`` ``predict_single_split``, ``dimreduce="PCA"``,
   ``latent_dim=256``): ``StandardScaler`` then ``PCA(n_components=256, random_state=seed)``, both fitted on the
   training fold only and applied to the test fold. peng-lab/hescape's HEST config
   (``experiments/yaml_configs/bench_config.yaml``) sets ``latent_dim: 128`` for its 128-d HESCAPE embeddings.
4. **Regression** (HEST ``src/hest/bench/trainer.py`` ``train_test_reg``, ``method="ridge"``):
   ``Ridge(solver="lsqr", alpha=100 / (n_components · n_genes), fit_intercept=False, max_iter=1000,
   random_state=seed)``. HEST computes alpha from ``X_train.shape[1]`` (the PCA width) and ``y_train.shape[1]``
   and ignores its own ``--alpha`` option.
5. **Metrics** (``train_test_reg``): per gene, Pearson's r between measured and predicted ``log1p`` expression over
   all test spots of the fold (``scipy.stats.pearsonr``) and the MSE ``mean((pred - y)²)``; each averaged over
   genes. Over folds (HEST ``benchmark.py`` ``merge_fold_results``): mean and ``np.std`` (population, ddof 0) of
   the per-fold gene averages.
6. **Folds** (HEST ``HESTData.py`` ``create_splits``, ``predict_folds``): samples grouped by patient; with ``K`` equal
   to the number of patients, leave one patient out. Here: scikit-learn ``LeaveOneGroupOut`` by patient
   (``n_splits=None``) or ``GroupKFold(n_splits)``.

HESCAPE's Table 6 (paper §3.4.2, §4.3) runs this probe by cross-validation over the samples of the HESCAPE
*test* split only, folds by patient ("The mean and std is based on a cross-validation split of the test.csv",
peng-lab/hescape issue #12): the encoders were pretrained on the train and validation splits. That is
``splits=..., use_split="test"`` here (the default when split labels are given).

Deviations from HEST (all deliberate)
-------------------------------------
* Float64 throughout (HEST casts the PCA scores to float32 ``torch.Tensor``).
* A gene whose Pearson's r is undefined in a fold (constant measured or predicted values) counts as r = 0 and is
  counted in ``undefined``; HEST's mean would be NaN.
* ``n_splits=k`` uses ``GroupKFold`` (balances spots per fold); HEST's ``create_splits`` packs whole patients in
  order until each fold holds ``n_samples // K`` samples.
* ``PCA(n_components)`` wider than the embedding or the training fold is refused (scikit-learn would raise too).
* The order of the selected genes follows ``gene_names`` (HEST's follows its ``np.intersect1d`` order).
* Options beyond HEST: ``alpha="cv"`` (penalty chosen per training fold by ``GridSearchCV`` over a log grid with
  inner ``GroupKFold`` by patient, scored by the gene-averaged Pearson's r; the scaler and PCA are refitted
  inside each inner fold), a fixed ``alpha``, and ``fit_intercept=True``.

Note on MSE: with ``fit_intercept=False`` and centred PCA scores the probe cannot fit the mean of ``log1p``
expression, so its MSE includes the squared mean of each gene (Table 6's MSEs of 2–16 reflect this). Compare it
with the mean predictor's MSE, printed beside it; Pearson's r is unaffected.

Chance levels printed beside the probe: the *mean predictor* (each gene's training-fold mean; its Pearson's r is
undefined, reported as 0) and, when patches are given, the same probe on the colour statistics of
:mod:`hescape.eval.baselines`.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError, HescapeEvalWarning, plain_list

__all__ = ["HEST_N_GENES", "HEST_N_COMPONENTS", "HEST_MIN_CELLS_PCT", "HEST_SEED", "DEFAULT_ALPHA_GRID", "hest_alpha",
           "select_variable_genes", "pearson_per_gene", "ProbeScores", "ExpressionFold", "ExpressionProbeResult",
           "expression_probe"]

#: Genes predicted per task (HEST ``create_benchmark_data``: ``get_k_genes_from_df(meta_df, 50, 'var', ...)``).
HEST_N_GENES = 50
#: PCA width before the ridge (HEST ``BenchmarkConfig.latent_dim``).
HEST_N_COMPONENTS = 256
#: A gene must be counted in this fraction of a sample's spots (HEST ``get_k_genes(min_cells_pct=0.10)``).
HEST_MIN_CELLS_PCT = 0.10
#: Seed of HEST's PCA and ridge (``BenchmarkConfig.seed``).
HEST_SEED = 1
#: Penalties searched with ``alpha="cv"`` (on standardised PCA scores).
DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 5, 17))


def hest_alpha(n_components: int, n_genes: int) -> float:
    """HEST's ridge penalty ``100 / (n_components · n_genes)`` (``src/hest/bench/trainer.py`` ``train_test_reg``)."""
    return 100.0 / (int(n_components) * int(n_genes))


# ---------------------------------------------------------------------------------------------------- validation


def _err(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


def _dense_float(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _err(what=what, expected="a numeric (N, D) array",
                   found=type(x).__name__, fix="pass a numpy array or torch tensor") from exc
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _err(what=what, expected="a non-empty 2-d (N, D) array",
                   found=f"shape {arr.shape}", fix="stack one row per spot")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise _err(what=what, expected="finite values",
                   found=f"NaN or inf in {len(rows)} row(s), first at row {rows[0]}",
                   fix="drop or repair those spots before probing")
    return arr


class _Counts:
    """Raw counts ``(N, G)``, dense or scipy-sparse, validated once in their own dtype (a 5K panel is not copied to
    float64); only the columns asked for are converted."""

    def __init__(self, counts):
        self.sparse = hasattr(counts, "tocsc") and hasattr(counts, "nnz")
        if self.sparse:
            self.x = counts.tocsc()
            values = self.x.data
        else:
            if hasattr(counts, "detach"):
                counts = counts.detach().cpu().numpy()
            self.x = np.asarray(counts)
            values = self.x
        if self.x.ndim != 2 or self.x.shape[0] == 0 or self.x.shape[1] == 0:
            raise _err(what="counts", expected="a non-empty (N, G) matrix",
                       found=f"shape {self.x.shape}", fix="pass one row per spot")
        if values.dtype.kind not in "iuf":
            raise _err(what="counts", expected="a numeric matrix", found=f"dtype {values.dtype}",
                       fix="pass raw counts as numbers")
        if not np.isfinite(values).all():
            raise _err(what="counts", expected="finite values",
                       found="NaN or inf", fix="drop or repair those spots before probing")
        if (values < 0).any():
            raise _err(what="counts", expected="non-negative raw counts",
                       found="negative values", fix="pass raw counts, not log-transformed or scaled values")
        self.shape = self.x.shape

    def columns(self, cols: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        x = self.x[:, cols]
        if rows is not None:
            x = x[rows]
        return np.asarray(x.toarray() if self.sparse else x, dtype=np.float64)

    def detected(self, rows: np.ndarray) -> np.ndarray:
        """Number of spots in ``rows`` with a count > 0, per gene."""
        sub = self.x[rows]
        if self.sparse:
            return np.asarray((sub > 0).sum(axis=0)).ravel()
        return (sub > 0).sum(axis=0)


def _labels(x, n: int, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=object).ravel() if x is not None else None
    if arr is None or len(arr) != n:
        raise _err(what=what, expected=f"one label per spot ({n})",
                   found="none" if arr is None else f"{len(arr)}",
                   fix="pass labels aligned with the rows of the embeddings")
    missing = [i for i, v in enumerate(arr) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise _err(what=what, expected="a label for every spot",
                   found=f"{len(missing)} missing (None/NaN), first at row {missing[0]}",
                   fix="fill in the missing labels or drop those spots")
    return arr.astype(str)


# --------------------------------------------------------------------------------------------------------- genes


def _check_selection(n_genes, min_cells_pct) -> None:
    """Refuse a gene count that is not a positive integer, or a detection fraction outside [0, 1]."""
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise _err(what="n_genes (--n-genes)", expected="a positive integer (HEST: 50)", found=repr(n_genes),
                   fix="e.g. n_genes=50 (--n-genes 50), or pass genes= (--genes) explicitly")
    if not (isinstance(min_cells_pct, int | float | np.floating) and 0 <= min_cells_pct <= 1):
        raise _err(what="min_cells_pct (--min-cells-pct)", expected="a fraction in [0, 1] (HEST: 0.10)",
                   found=repr(min_cells_pct), fix="e.g. min_cells_pct=0.1 (--min-cells-pct 0.1)")


def _check_seed(seed) -> None:
    """Refuse a seed scikit-learn's ``random_state`` does not take (an integer in ``[0, 2**32 - 1]``)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) <= 2**32 - 1:
        raise _err(what="seed (--seed)", expected="an integer in [0, 4294967295] (scikit-learn's random_state)",
                   found=repr(seed), fix=f"e.g. seed={HEST_SEED} (--seed {HEST_SEED}, HEST's)")


def _check_probe_options(genes, n_genes, min_cells_pct, gene_selection, alpha) -> str | float:
    """Checks the probe options shared by every protocol; returns ``alpha`` as ``'hest'``, ``'cv'`` or a float.

    Raises
    ------
    HescapeEvalError
        Gene-selection options out of range, an unknown ``gene_selection``, or an ``alpha`` that is neither
        ``'hest'``, ``'cv'`` nor a positive finite number.
    """
    if genes is None:
        _check_selection(n_genes, min_cells_pct)
    if gene_selection not in ("all", "train"):
        raise _err(what="gene_selection (--gene-selection)", expected="'all' or 'train'",
                   found=repr(gene_selection), fix="pick one of the two")
    if isinstance(alpha, str) and alpha in ("hest", "cv"):
        return alpha
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise _err(what="alpha (--alpha)", expected="'hest', 'cv' or a positive float", found=repr(alpha),
                   fix="e.g. alpha='hest' (no --alpha)")
    return value


def _check_genes(genes, names: Sequence[str]) -> list[str]:
    """``genes`` as strings, each once and each in the panel ``names``.

    Raises
    ------
    HescapeEvalError
        A gene missing from the panel, or listed twice.
    """
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in set(names)]
    if missing:
        raise _err(what="genes (--genes)", expected="genes present in the panel (gene_names)",
                   found=f"{len(missing)} missing: {plain_list(missing, 20)}",
                   fix="drop those genes from genes= (--genes), or use counts (a --dataset) of a panel that has them")
    if len(set(genes)) != len(genes):
        raise _err(what="genes (--genes)", expected="unique genes",
                   found=f"{len(genes) - len(set(genes))} duplicate(s)", fix="list each gene once")
    return genes


def select_variable_genes(counts, gene_names: Sequence[str], samples, *, n_genes: int = HEST_N_GENES,
                          min_cells_pct: float = HEST_MIN_CELLS_PCT, rows=None) -> list[str]:
    """The ``n_genes`` most variable genes as HEST-Benchmark selects them (``src/hest/utils.py`` ``get_k_genes``).

    Parameters
    ----------
    counts
        ``(N, G)`` raw counts (numpy, torch or scipy.sparse), one row per spot.
    gene_names
        ``G`` unique gene names, the columns of ``counts``.
    samples
        ``(N,)`` sample labels: the detection filter runs per sample (HEST: one AnnData per sample).
    n_genes
        Genes to return (HEST: 50).
    min_cells_pct
        A gene is kept only if, in *every* sample, it is counted (> 0) in at least ``ceil(min_cells_pct · n_spots)``
        spots (HEST: 0.10, ``sc.pp.filter_genes(min_cells=...)``).
    rows
        Optional boolean mask or indices of the spots to select on (e.g. a training fold); default all.

    Returns
    -------
    list of str
        The selected genes, in the order of ``gene_names``. Names containing ``BLANK`` or ``Control`` are never
        selected (HEST drops Xenium's negative-control probes).

    Raises
    ------
    HescapeEvalError
        ``n_genes`` not a positive integer, ``min_cells_pct`` outside [0, 1], fewer than ``n_genes`` genes pass
        the filter, inputs that do not line up, or scanpy not installed
        (the dispersion ranking is scanpy's ``highly_variable_genes(flavor="seurat")``, as in HEST).
    """
    _check_selection(n_genes, min_cells_pct)
    cnt = counts if isinstance(counts, _Counts) else _Counts(counts)
    names = _gene_names(gene_names, cnt.shape[1])
    samples = _labels(samples, cnt.shape[0], "samples")
    idx = np.arange(cnt.shape[0]) if rows is None else np.arange(cnt.shape[0])[np.asarray(rows)]
    keep = np.array(["BLANK" not in g and "Control" not in g for g in names])
    for s in np.unique(samples[idx]):
        sr = idx[samples[idx] == s]
        keep &= cnt.detected(sr) >= math.ceil(min_cells_pct * len(sr))
    cols = np.flatnonzero(keep)
    if len(cols) < n_genes:
        raise _err(what=f"genes counted in >= {min_cells_pct:.0%} of the spots of every sample",
                   expected=f"at least {n_genes}",
                   found=f"{len(cols)}", fix="lower n_genes (--n-genes) or min_cells_pct (--min-cells-pct), or pass "
                   "genes= (--genes) explicitly")
    try:
        import anndata
        import scanpy as sc
    except ImportError as exc:
        raise _err(what="gene selection",
                   expected="scanpy installed (HEST ranks genes with sc.pp.highly_variable_genes)",
                   found="no scanpy",
                   fix="pip install 'hescape-eval[batch]', or pass genes= (--genes; e.g. HEST's var_50genes.json)") from exc
    ad = anndata.AnnData(np.log1p(cnt.columns(cols, idx)).astype(np.float32))
    ad.var_names = [names[c] for c in cols]
    sc.pp.highly_variable_genes(ad, n_top_genes=n_genes)
    chosen = set(ad.var_names[ad.var["highly_variable"].to_numpy()][:n_genes])
    return [g for g in names if g in chosen]


def _gene_names(gene_names, g: int) -> list[str]:
    names = [str(x) for x in np.asarray(gene_names, dtype=object).ravel()] if gene_names is not None else []
    if len(names) != g:
        raise _err(what="gene_names", expected=f"one name per counts column ({g})",
                   found=f"{len(names)}", fix="pass the gene names of the counts' columns")
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})
    if dups:
        raise _err(what="gene_names", expected="unique names",
                   found=f"duplicates {plain_list(dups, 10)}", fix="deduplicate the panel's gene names")
    return names


# ------------------------------------------------------------------------------------------------------- metrics


def pearson_per_gene(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson's r of each column of ``pred`` ``(n, G)`` with the same column of ``y`` (``scipy.stats.pearsonr``).

    Returns ``(r, undefined)``: ``r`` with 0 where r is undefined (a constant column), and the boolean mask of
    those columns.
    """
    dy = y - y.mean(axis=0)
    dp = pred - pred.mean(axis=0)
    den = np.sqrt((dy * dy).sum(axis=0) * (dp * dp).sum(axis=0))
    scale = np.maximum(np.abs(y).max(axis=0), np.abs(pred).max(axis=0))
    undefined = (den <= 1e-12 * np.maximum(scale, 1e-300) ** 2 * len(y)) | ~np.isfinite(den)
    r = np.where(undefined, 0.0, (dy * dp).sum(axis=0) / np.where(undefined, 1.0, den))
    return np.clip(r, -1.0, 1.0), undefined


def _mean_pearson_scorer(estimator, x, y) -> float:
    return float(pearson_per_gene(np.asarray(y), np.asarray(estimator.predict(x)))[0].mean())


# ------------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ProbeScores:
    """Per-fold, per-gene scores of one predictor.

    ``pearson`` and ``mse`` are ``(n_folds, n_genes)``; an undefined Pearson's r (constant measured or predicted
    values) is 0 there and ``True`` in ``undefined``. ``alphas`` is the ridge penalty of each fold (``None`` for
    the mean predictor); ``n_components`` the PCA width.
    """

    name: str
    pearson: np.ndarray
    mse: np.ndarray
    undefined: np.ndarray
    alphas: tuple[float | None, ...]
    n_components: int | None = None

    @property
    def fold_pearson(self) -> np.ndarray:
        """Gene-averaged Pearson's r of each fold, ``(n_folds,)``."""
        return self.pearson.mean(axis=1)

    @property
    def fold_mse(self) -> np.ndarray:
        """Gene-averaged MSE of each fold, ``(n_folds,)``, in (log1p counts)²."""
        return self.mse.mean(axis=1)

    @property
    def pearson_mean(self) -> float:
        return float(self.fold_pearson.mean())

    @property
    def pearson_std(self) -> float:
        """Population std (ddof 0) over folds, as HEST's ``merge_fold_results``."""
        return float(self.fold_pearson.std())

    @property
    def mse_mean(self) -> float:
        return float(self.fold_mse.mean())

    @property
    def mse_std(self) -> float:
        return float(self.fold_mse.std())

    @property
    def n_undefined(self) -> int:
        return int(self.undefined.sum())


@dataclass(frozen=True)
class ExpressionFold:
    """One outer fold: the held-out patients and the spot counts."""

    test_patients: tuple[str, ...]
    n_train: int
    n_test: int


@dataclass(frozen=True)
class ExpressionProbeResult:
    """Result of :func:`expression_probe`: the probe on the embeddings and its chance levels.

    ``model`` is the probe on the embeddings, ``mean_baseline`` each gene's training-fold mean,
    ``colour_baseline`` the probe on :func:`hescape.eval.baselines.colour_statistics` (``None`` without patches).
    """

    genes: tuple[str, ...]
    folds: tuple[ExpressionFold, ...]
    model: ProbeScores
    mean_baseline: ProbeScores
    colour_baseline: ProbeScores | None = None
    params: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat metrics: ``pearson_mean``, ``pearson_std``, ``mse_mean``, ``mse_std`` per predictor."""
        out: dict[str, float] = {"n_folds": len(self.folds), "n_genes": len(self.genes),
                                 "n_undefined_pearson": self.model.n_undefined}
        for prefix, s in (("", self.model), ("mean_baseline_", self.mean_baseline),
                          ("colour_baseline_", self.colour_baseline)):
            if s is None:
                continue
            out.update({f"{prefix}pearson_mean": s.pearson_mean, f"{prefix}pearson_std": s.pearson_std,
                        f"{prefix}mse_mean": s.mse_mean, f"{prefix}mse_std": s.mse_std})
        return out

    def summary(self) -> str:
        """Human-readable lines: the probe, then its chance levels, as mean (std) over folds."""
        p = self.params
        alphas = sorted({a for a in self.model.alphas if a is not None})
        shown = ", ".join(f"{a:.4g}" for a in alphas[:4]) + (", ..." if len(alphas) > 4 else "")
        head = (f"expression probe ({p.get('protocol', '?')}): {len(self.genes)} genes, {len(self.folds)} folds by "
                f"patient, PCA {self.model.n_components}, alpha {p.get('alpha')} ({shown})")
        lines = [head]
        for s in (self.model, self.colour_baseline, self.mean_baseline):
            if s is None:
                continue
            note = ""
            if s is self.mean_baseline:
                note = "  (constant prediction: Pearson's r undefined, reported as 0)"
            elif s.n_undefined:
                note = f"  ({s.n_undefined} fold×gene Pearson's r undefined, counted as 0)"
            lines.append(f"  {s.name:<18} PCC {s.pearson_mean:.3f} ({s.pearson_std:.3f})  "
                         f"MSE {s.mse_mean:.3f} ({s.mse_std:.3f}){note}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write one row per gene (atomically): mean/std over folds of Pearson's r and MSE, per-fold r.

        Columns: ``gene, pearson_mean, pearson_std, mse_mean, mse_std, n_undefined, mean_baseline_mse``,
        ``colour_pearson_mean`` and ``colour_mse_mean`` when the colour baseline ran, then ``pearson_fold<i>``.
        """
        path = Path(path)
        if self.params.get("fold_genes"):
            raise _err(what="per-gene table", expected="the same genes in every fold",
                       found="genes selected per training fold",
                       fix="use gene_selection='all' (--gene-selection all) or genes= (--genes), or read "
                           "params['fold_genes'] and model.pearson")
        m = self.model
        header = ["gene", "pearson_mean", "pearson_std", "mse_mean", "mse_std", "n_undefined", "mean_baseline_mse"]
        if self.colour_baseline is not None:
            header += ["colour_pearson_mean", "colour_mse_mean"]
        header += [f"pearson_fold{i}" for i in range(len(self.folds))]
        rows = []
        for j, g in enumerate(self.genes):
            row = [g, m.pearson[:, j].mean(), m.pearson[:, j].std(), m.mse[:, j].mean(), m.mse[:, j].std(),
                   int(m.undefined[:, j].sum()), self.mean_baseline.mse[:, j].mean()]
            if self.colour_baseline is not None:
                row += [self.colour_baseline.pearson[:, j].mean(), self.colour_baseline.mse[:, j].mean()]
            rows.append(row + list(m.pearson[:, j]))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows([[f"{v:.6g}" if isinstance(v, float | np.floating) else v for v in r] for r in rows])
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# ---------------------------------------------------------------------------------------------------------- probe


def _make_pipeline(n_components: int, alpha: float, seed: int, fit_intercept: bool):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([
        ("scaler", StandardScaler()),
        ("pca", PCA(n_components=n_components, random_state=seed)),
        ("ridge", Ridge(solver="lsqr", alpha=alpha, fit_intercept=fit_intercept, max_iter=1000, random_state=seed)),
    ])


def _fit_predict(x_tr, y_tr, x_te, groups_tr, *, n_components, alpha, alpha_grid, inner_splits, seed, fit_intercept):
    """Fit the probe on a training fold and predict the test fold; returns ``(pred, alpha_used)``."""
    if isinstance(alpha, str) and alpha == "hest":
        a = hest_alpha(n_components, y_tr.shape[1])
        return _make_pipeline(n_components, a, seed, fit_intercept).fit(x_tr, y_tr).predict(x_te), a
    if isinstance(alpha, str) and alpha == "cv":
        from sklearn.model_selection import GridSearchCV, GroupKFold

        n_groups = len(np.unique(groups_tr))
        if n_groups < 2:
            raise _err(what="alpha='cv' (--alpha-cv)",
                       expected="at least 2 patients in each training fold for the inner cross-validation",
                       found=f"{n_groups}", fix="use alpha='hest' (no --alpha-cv) or a fixed alpha (--alpha A), or "
                       "add patients")
        search = GridSearchCV(_make_pipeline(n_components, 1.0, seed, fit_intercept),
                              {"ridge__alpha": list(alpha_grid)}, scoring=_mean_pearson_scorer,
                              cv=GroupKFold(n_splits=min(inner_splits, n_groups)), refit=True, error_score="raise")
        search.fit(x_tr, y_tr, groups=groups_tr)
        return search.predict(x_te), float(search.best_params_["ridge__alpha"])
    a = float(alpha)
    return _make_pipeline(n_components, a, seed, fit_intercept).fit(x_tr, y_tr).predict(x_te), a


def _record(d: dict[str, list], r: np.ndarray, undefined: np.ndarray, mse: np.ndarray, alpha: float | None) -> None:
    d["r"].append(r)
    d["u"].append(undefined)
    d["mse"].append(mse)
    d["a"].append(alpha)


def expression_probe(embeddings, counts, gene_names: Sequence[str], patients, *, samples=None, splits=None,
                     use_split: str | None = "test", genes: Sequence[str] | None = None,
                     n_genes: int = HEST_N_GENES, gene_selection: str = "all",
                     min_cells_pct: float = HEST_MIN_CELLS_PCT, n_components: int = HEST_N_COMPONENTS,
                     alpha: str | float = "hest", alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                     inner_splits: int = 3, n_splits: int | None = None, seed: int = HEST_SEED,
                     fit_intercept: bool = False, images=None) -> ExpressionProbeResult:
    """Predict ``log1p`` expression of the most variable genes from patch embeddings, folds by patient.

    The HEST-Benchmark ridge probe (module docstring: every step, its source in mahmoodlab/HEST and the
    deviations). With ``splits`` given, only the spots of ``use_split`` are used: HESCAPE's Table 6 protocol,
    cross-validation over the test split's samples (peng-lab/hescape issue #12).

    Parameters
    ----------
    embeddings
        ``(N, D)`` patch embeddings of any image encoder (numpy or torch), one row per spot.
    counts
        ``(N, G)`` raw counts of the same spots (numpy, torch or scipy.sparse), non-negative.
    gene_names
        ``G`` unique gene names of the columns of ``counts``.
    patients
        ``(N,)`` patient (donor) labels: the folds never split a patient.
    samples
        ``(N,)`` sample labels for the per-sample detection filter of the gene selection (default: ``patients``).
    splits, use_split
        ``(N,)`` split labels and the split to keep (default ``"test"``, the paper); ``use_split=None`` keeps all.
    genes
        Genes to predict (e.g. HEST's ``var_50genes.json``); default: :func:`select_variable_genes`.
    n_genes, min_cells_pct, gene_selection
        Gene selection when ``genes`` is ``None``: ``n_genes`` (HEST 50), the detection threshold (HEST 0.10), and
        on which spots: ``"all"`` (HEST: every spot probed) or ``"train"`` (each training fold, no transduction).
    n_components
        PCA width (HEST 256; peng-lab/hescape's config 128). At most the embedding width and the training fold.
    alpha
        ``"hest"``: ``100 / (n_components · n_genes)``; ``"cv"``: chosen per training fold over ``alpha_grid`` by
        ``GridSearchCV`` with ``GroupKFold(inner_splits)`` by patient, scored by the gene-averaged Pearson's r;
        or a float.
    n_splits
        ``None``: leave one patient out (``LeaveOneGroupOut``); an int: ``GroupKFold(n_splits)``.
    seed
        ``random_state`` of the PCA and the ridge (HEST's default seed 1).
    fit_intercept
        HEST: ``False`` (the MSE then includes each gene's squared mean, see the module docstring).
    images
        Optional ``(N, H, W, 3)`` uint8 patches: adds the probe on their colour statistics
        (:func:`hescape.eval.baselines.colour_statistics`, PCA width ``min(n_components, 36)``).

    Returns
    -------
    ExpressionProbeResult
        Pearson's r and MSE per fold and gene for the probe, the mean predictor and, with ``images``, the colour
        probe; ``summary()`` prints mean (std) over folds, ``to_csv()`` writes the per-gene table.

    Raises
    ------
    HescapeEvalError
        Mismatched lengths, NaN/inf or negative counts, missing labels, genes asked for that the data lacks (named),
        fewer than 2 patients, ``n_components`` wider than the embedding or a training fold, unknown options.
    """
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    x_all = _dense_float(embeddings, "embeddings")
    n = x_all.shape[0]
    cnt = _Counts(counts)
    if cnt.shape[0] != n:
        raise _err(what="embeddings and counts", expected="one row per spot in both",
                   found=f"{n} and {cnt.shape[0]} rows",
                   fix="pass the embeddings and counts of the same spots, in the same order")
    names = _gene_names(gene_names, cnt.shape[1])
    patients_all = _labels(patients, n, "patients")
    samples_all = patients_all if samples is None else _labels(samples, n, "samples")
    alpha = _check_probe_options(genes, n_genes, min_cells_pct, gene_selection, alpha)
    _check_seed(seed)

    rows = np.arange(n)
    if splits is not None:
        split_all = _labels(splits, n, "splits")
        if use_split is not None:
            rows = np.flatnonzero(split_all == str(use_split))
            if len(rows) == 0:
                raise _err(what=f"spots of split {use_split!r}", expected="at least one",
                           found=f"none (splits: {sorted(set(split_all.tolist()))})",
                           fix="pass use_split= one of those, or use_split=None for all spots")
    x = x_all[rows]
    pat = patients_all[rows]
    n_pat = len(np.unique(pat))
    if n_pat < 2:
        raise _err(what="patients", expected="at least 2 patients (folds hold out whole patients)",
                   found=f"{n_pat}", fix="probe a split with more patients, or pass patient labels (not one constant)")
    if int(n_components) < 1 or int(n_components) > x.shape[1]:
        raise _err(what=f"n_components={n_components} (--n-components {n_components})",
                   expected=f"between 1 and the embedding width {x.shape[1]}", found=f"{n_components}",
                   fix=f"pass n_components={x.shape[1]} or less (--n-components {x.shape[1]}; peng-lab/hescape uses "
                       "128)")
    n_components = int(n_components)

    if genes is not None:
        fixed_genes: list[str] | None = _check_genes(genes, names)
    elif gene_selection == "all":
        fixed_genes = select_variable_genes(cnt, names, samples_all, n_genes=n_genes, min_cells_pct=min_cells_pct,
                                            rows=rows)
    else:
        fixed_genes = None

    if n_splits is None:
        splitter = LeaveOneGroupOut()
    else:
        if int(n_splits) < 2 or int(n_splits) > n_pat:
            raise _err(what=f"n_splits={n_splits} (--folds {n_splits})",
                       expected=f"between 2 and the number of patients ({n_pat})", found=f"{n_splits}",
                       fix="pass n_splits=None (no --folds: leave one patient out) or fewer folds")
        splitter = GroupKFold(n_splits=int(n_splits))
    col = {g: i for i, g in enumerate(names)}

    colour = None
    if images is not None:
        from .baselines import colour_statistics

        imgs = np.asarray(images)
        if imgs.ndim != 4 or imgs.shape[0] != n:
            raise _err(what="images", expected=f"(N, H, W, 3) uint8 patches with N = {n}",
                       found=f"shape {imgs.shape}", fix="pass the patches of the same spots, or images=None")
        colour = colour_statistics(imgs[rows])

    folds: list[ExpressionFold] = []
    per: dict[str, dict[str, list]] = {k: {"r": [], "u": [], "mse": [], "a": []} for k in ("model", "mean", "colour")}
    fold_genes: list[list[str]] = []
    splits = list(splitter.split(x, groups=pat))
    smallest = min(len(tr) for tr, _ in splits)  # the PCA of every fold needs n_components <= its training spots
    for tr, te in splits:
        if fixed_genes is None:
            fg = select_variable_genes(cnt, names, samples_all, n_genes=n_genes, min_cells_pct=min_cells_pct,
                                       rows=rows[tr])
        else:
            fg = fixed_genes
        fold_genes.append(fg)
        gi = np.array([col[g] for g in fg])
        y_tr, y_te = np.log1p(cnt.columns(gi, rows[tr])), np.log1p(cnt.columns(gi, rows[te]))
        if n_components > len(tr):
            raise _err(what=f"PCA({n_components}) on a training fold",
                       expected=f"at least {n_components} training spots",
                       found=f"{len(tr)} (held out: {plain_list(sorted(set(pat[te].tolist())))})",
                       fix=f"lower n_components to the smallest training fold's {smallest} spots or less "
                           f"(--n-components {smallest}), or add spots")
        folds.append(ExpressionFold(tuple(sorted({str(p) for p in pat[te].tolist()})), len(tr), len(te)))
        kw = {"alpha": alpha, "alpha_grid": alpha_grid, "inner_splits": inner_splits, "seed": seed,
              "fit_intercept": fit_intercept}
        runs = [("model", x, n_components)]
        if colour is not None:
            runs.append(("colour", colour, min(n_components, colour.shape[1])))
        for key, feats, k in runs:
            pred, a = _fit_predict(feats[tr], y_tr, feats[te], pat[tr], n_components=k, **kw)
            r, u = pearson_per_gene(y_te, pred)
            _record(per[key], r, u, ((pred - y_te) ** 2).mean(axis=0), a)
        base = np.broadcast_to(y_tr.mean(axis=0), y_te.shape)  # the mean predictor: Pearson's r undefined
        _record(per["mean"], np.zeros(len(fg)), np.ones(len(fg), dtype=bool), ((base - y_te) ** 2).mean(axis=0), None)

    def scores(key: str, name: str, k: int | None) -> ProbeScores:
        d = per[key]
        return ProbeScores(name, np.array(d["r"]), np.array(d["mse"]), np.array(d["u"]), tuple(d["a"]), k)

    model = scores("model", "embeddings", n_components)
    if model.n_undefined:
        warnings.warn(f"{model.n_undefined} fold×gene Pearson's r undefined (constant values in a test fold), "
                      "counted as 0", HescapeEvalWarning, stacklevel=2)
    same = all(fg == fold_genes[0] for fg in fold_genes)
    params = {"protocol": "hescape-test-split-cv" if (splits is not None and use_split == "test") else "hest-cv",
              "use_split": use_split if splits is not None else None, "n_spots": len(rows), "n_patients": n_pat,
              "n_components": n_components, "alpha": alpha, "seed": seed, "fit_intercept": fit_intercept,
              "gene_selection": "given" if genes is not None else gene_selection, "min_cells_pct": min_cells_pct,
              "folds": "LeaveOneGroupOut(patient)" if n_splits is None else f"GroupKFold({n_splits}, patient)",
              "fold_genes": None if same else [list(fg) for fg in fold_genes]}
    return ExpressionProbeResult(
        genes=tuple(fold_genes[0]) if same else tuple(f"fold-specific[{j}]" for j in range(len(fold_genes[0]))),
        folds=tuple(folds), model=model, mean_baseline=scores("mean", "mean predictor", None),
        colour_baseline=scores("colour", "colour statistics", min(n_components, colour.shape[1]))
        if colour is not None else None,
        params=params)
