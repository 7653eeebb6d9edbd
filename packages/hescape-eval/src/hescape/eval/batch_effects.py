"""Batch effects: scib's silhouette-batch of gene expression (and of embeddings) across data splits or samples.

HESCAPE paper, supplementary §8.3 and Fig. 2: "We computed this metric for all datasets using Leiden clustering
results after standard scanpy preprocessing as the *label key*, and the train-validation-test split as the
*batch key*." The paper's code for this analysis is not public (peng-lab/hescape ``bd54704`` has none), so the
"standard scanpy preprocessing" here is scanpy's documented default path, every parameter exposed:

1. :func:`expression_clusters`: ``sc.pp.normalize_total`` (target sum: the median total count), ``sc.pp.log1p``,
   ``sc.pp.pca`` (``n_pcs = 50``, at most ``min(n_spots, n_genes) - 1``), ``sc.pp.neighbors`` (15 neighbours, on
   the PCA), ``sc.tl.leiden`` (resolution 1; ``flavor="leidenalg"``, scanpy's default, or ``"igraph"``).
2. :func:`silhouette_batch`: scib-metrics ``silhouette_batch(X, labels, batch)`` (YosefLab/scib-metrics
   ``src/scib_metrics/metrics/_silhouette.py``): for every label (Leiden cluster) with more than one batch and
   fewer batches than spots, the silhouette of each spot with respect to the batches within that label, ``1 - |s|``,
   averaged per label and then over labels. 1 = batches perfectly mixed within clusters, 0 = separated.
   Euclidean distances, scib's defaults.
3. :func:`batch_silhouette`: on the expression PCA (``X_pca`` of step 1) and, with the same Leiden labels, on any
   embedding (e.g. a model's image or gene embedding).

Batch key: the split (``"train"``/``"val"``/``"test"``, the paper) or the sample. :func:`plot_silhouette_vs_recall`
draws Fig. 2: silhouette-batch against mean Recall@5 across runs or datasets.

Needs the optional extra ``hescape-eval[batch]`` (scib-metrics, which pulls jax; scanpy; leidenalg; matplotlib).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError

__all__ = ["expression_clusters", "scored_spots", "silhouette_batch", "batch_silhouette", "BatchSilhouetteResult",
           "plot_silhouette_vs_recall"]


def _err(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


def _need(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _err(what=purpose, expected=f"{module} installed", found=f"no {module}",
                   fix="pip install 'hescape-eval[batch]'") from exc


def _matrix(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise _err(what=what, expected="a non-empty (N, D) array", found=f"shape {arr.shape}",
                   fix="stack one row per spot")
    if not np.isfinite(arr).all():
        raise _err(what=what, expected="finite values", found="NaN or inf", fix="drop or repair those spots")
    return arr


def _labels(x, n: int, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=object).ravel()
    if len(arr) != n:
        raise _err(what=what, expected=f"one label per spot ({n})", found=f"{len(arr)}",
                   fix="pass labels aligned with the rows")
    if any(v is None or (isinstance(v, float) and v != v) for v in arr):
        raise _err(what=what, expected="a label for every spot", found="None/NaN labels",
                   fix="fill in or drop those spots")
    return arr.astype(str)


def expression_clusters(counts, *, n_pcs: int = 50, n_neighbors: int = 15, resolution: float = 1.0,
                        flavor: str = "leidenalg", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leiden clusters of spots after scanpy's standard preprocessing of raw counts (module docstring, step 1).

    Parameters
    ----------
    counts
        ``(N, G)`` raw counts (numpy, torch or scipy.sparse), non-negative; every spot needs a count > 0.
    n_pcs
        PCA components (clipped to ``min(N, G) - 1``).
    n_neighbors
        Neighbours of the kNN graph (``sc.pp.neighbors``).
    resolution
        Leiden resolution.
    flavor
        ``"leidenalg"`` (scanpy's default, needs leidenalg) or ``"igraph"`` (``n_iterations=2, directed=False``).
    seed
        ``random_state`` of the PCA, the neighbours and Leiden.

    Returns
    -------
    (labels, x_pca)
        ``(N,)`` cluster labels (strings) and the ``(N, n_pcs)`` PCA of ``log1p(normalize_total(counts))``.
    """
    sc = _need("scanpy", "Leiden clusters of expression")
    anndata = _need("anndata", "Leiden clusters of expression")
    if hasattr(counts, "tocsr") and hasattr(counts, "nnz"):
        x = counts.tocsr().astype(np.float32)
        vals, totals = x.data, np.asarray(x.sum(axis=1)).ravel()
    else:
        x = _matrix(counts, "counts").astype(np.float32)
        vals, totals = x, x.sum(axis=1)
    if not np.isfinite(vals).all() or (vals < 0).any():
        raise _err(what="counts", expected="finite, non-negative raw counts", found="NaN/inf or negative values",
                   fix="pass raw counts (not log-transformed)")
    empty = np.flatnonzero(totals <= 0)
    if len(empty):
        raise _err(what="counts", expected="a count > 0 in every spot (normalize_total divides by it)",
                   found=f"{len(empty)} empty spot(s), first at row {empty[0]}", fix="drop spots with no counts")
    n, g = x.shape
    n_comps = int(min(n_pcs, n - 1, g - 1))
    if n_comps < 1 or n < 3:
        raise _err(what="counts", expected="at least 3 spots and 2 genes", found=f"shape {x.shape}",
                   fix="cluster more spots")
    ad = anndata.AnnData(x)
    sc.pp.normalize_total(ad)
    sc.pp.log1p(ad)
    sc.pp.pca(ad, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(ad, n_neighbors=min(n_neighbors, n - 1), use_rep="X_pca", random_state=seed)
    if flavor == "igraph":
        sc.tl.leiden(ad, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    elif flavor == "leidenalg":
        _need("leidenalg", "Leiden clustering with flavor='leidenalg'")
        with warnings.catch_warnings():  # scanpy announces igraph as its future default even when asked for this
            warnings.filterwarnings("ignore", message=".*default backend for leiden.*", category=FutureWarning)
            sc.tl.leiden(ad, resolution=resolution, random_state=seed, flavor="leidenalg")
    else:
        raise _err(what="flavor", expected="'leidenalg' or 'igraph'", found=repr(flavor), fix="pick one of the two")
    return ad.obs["leiden"].astype(str).to_numpy(), np.asarray(ad.obsm["X_pca"], dtype=np.float64)


def scored_spots(labels, batch) -> np.ndarray:
    """Boolean mask of the spots scib's silhouette-batch scores: those whose label holds more than one batch and
    fewer batches than spots. Spots of single-batch labels are skipped by scib, so a batch effect strong enough
    to give each batch its own clusters is *invisible* to the score; report ``mask.mean()`` (coverage) beside it.
    """
    labels, batch = np.asarray(labels).astype(str), np.asarray(batch).astype(str)
    out = np.zeros(len(labels), dtype=bool)
    for lab in np.unique(labels):
        m = labels == lab
        nb = len(np.unique(batch[m]))
        out[m] = 1 < nb < int(m.sum())
    return out


def silhouette_batch(x, labels, batch, *, rescale: bool = True, chunk_size: int = 256) -> float:
    """scib-metrics ``silhouette_batch(X, labels, batch)`` with checked inputs (module docstring, step 2).

    Parameters
    ----------
    x
        ``(N, D)`` representation (expression PCA or an embedding).
    labels
        ``(N,)`` labels within which batches should mix (here: expression Leiden clusters).
    batch
        ``(N,)`` batch labels (split or sample).
    rescale
        scib's ``1 - |s|`` (higher = better mixed); ``False`` averages ``|s|`` instead (0 = mixed).
    chunk_size
        Rows per distance chunk in scib-metrics.

    Returns
    -------
    float
        Silhouette-batch in [0, 1] (with ``rescale``).

    Raises
    ------
    HescapeEvalError
        Mismatched lengths, NaN/inf, or no label with at least two batches and fewer batches than spots (scib would
        fail with an empty ``pd.concat``).
    """
    x = _matrix(x, "x")
    labels = _labels(labels, len(x), "labels")
    batch = _labels(batch, len(x), "batch")
    if not scored_spots(labels, batch).any():
        raise _err(what="silhouette-batch", expected="a label (cluster) holding spots of >= 2 batches, with fewer "
                   "batches than spots", found=f"none among {len(np.unique(labels))} label(s)",
                   fix="use a batch key that varies within clusters (split or sample), or coarser clusters")
    scib = _need("scib_metrics", "silhouette-batch")
    return float(scib.silhouette_batch(x, labels, batch, rescale=rescale, chunk_size=chunk_size))


@dataclass(frozen=True)
class BatchSilhouetteResult:
    """Silhouette-batch of the expression PCA and of each embedding, with the clusters used as labels.

    ``scores`` maps ``"expression"`` and each embedding name to silhouette-batch (NaN when no cluster holds two
    batches); ``coverage`` is the fraction of spots scib scores (:func:`scored_spots`: spots of single-batch clusters
    are skipped, so a low coverage means batches so separated that expression clusters by batch); ``chance`` is the
    expression score with the batch labels permuted (batches mixed at random).
    """

    scores: dict[str, float]
    coverage: float
    chance: float
    n_clusters: int
    n_spots: int
    batch_key: str
    params: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"silhouette-batch (batch key {self.batch_key!r}, {self.n_clusters} Leiden clusters of expression, "
                 f"{self.n_spots} spots; 1 = mixed, 0 = separated; scored spots {self.coverage:.1%})"]
        lines += [f"  {k:<16} {v:.3f}" for k, v in self.scores.items()]
        lines.append(f"  {'permuted batch':<16} {self.chance:.3f}  (chance: batches shuffled within the data)")
        if self.coverage == 0:
            lines.append("  undefined: every expression cluster holds a single batch (batches fully separated)")
        elif self.coverage < 0.9:
            lines.append(f"  warning: {1 - self.coverage:.1%} of spots lie in single-batch clusters, which scib skips;"
                         " the score overstates mixing")
        return "\n".join(lines)


def batch_silhouette(counts, batch, *, embeddings: Mapping[str, object] | None = None, batch_key: str = "split",
                     max_spots: int | None = 20000, n_pcs: int = 50, n_neighbors: int = 15, resolution: float = 1.0,
                     flavor: str = "leidenalg", seed: int = 0) -> BatchSilhouetteResult:
    """Silhouette-batch of gene expression (HESCAPE §8.3) and, with the same clusters, of embeddings.

    Parameters
    ----------
    counts
        ``(N, G)`` raw counts.
    batch
        ``(N,)`` batch labels: the split of each spot (the paper) or its sample.
    embeddings
        Optional ``{name: (N, D) array}``, e.g. ``{"image": img_emb, "gene": gene_emb}``.
    batch_key
        Name of the batch labels, for the report (``"split"`` or ``"sample"``).
    max_spots
        Cluster and score a random subset of this many spots (seeded) to bound the ``O(n²)`` distances within
        clusters; ``None`` uses all spots.
    n_pcs, n_neighbors, resolution, flavor, seed
        :func:`expression_clusters`.

    Returns
    -------
    BatchSilhouetteResult
        ``scores["expression"]`` and ``scores[name]`` per embedding (NaN if every cluster holds one batch), the
        fraction of spots scored (``coverage``) and the permuted-batch chance level.

    Raises
    ------
    HescapeEvalError
        Fewer than 2 batches, mismatched lengths, NaN/inf, negative counts, empty spots, missing extras.
    """
    n = counts.shape[0]
    batch = _labels(batch, n, "batch")
    if len(np.unique(batch)) < 2:
        raise _err(what="batch", expected="at least 2 batches (splits or samples)", found=f"{len(np.unique(batch))}",
                   fix="pass the split or sample of each spot")
    embs = {str(k): _matrix(v, f"embeddings[{k!r}]") for k, v in (embeddings or {}).items()}
    for k, v in embs.items():
        if len(v) != n:
            raise _err(what=f"embeddings[{k!r}]", expected=f"one row per spot ({n})", found=f"{len(v)} rows",
                       fix="pass embeddings of the same spots as the counts")
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    if max_spots is not None and n > max_spots:
        rows = np.sort(rng.choice(n, size=int(max_spots), replace=False))
    sub = counts[rows]
    labels, x_pca = expression_clusters(sub, n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution,
                                        flavor=flavor, seed=seed)
    b = batch[rows]
    coverage = float(scored_spots(labels, b).mean())
    scores = {"expression": silhouette_batch(x_pca, labels, b) if coverage else float("nan")}
    for k, v in embs.items():
        scores[k] = silhouette_batch(v[rows], labels, b) if coverage else float("nan")
    chance = silhouette_batch(x_pca, labels, rng.permutation(b))
    params = {"n_pcs": n_pcs, "n_neighbors": n_neighbors, "resolution": resolution, "flavor": flavor, "seed": seed,
              "max_spots": max_spots, "x_expression": "X_pca of log1p(normalize_total(counts))"}
    return BatchSilhouetteResult(scores=scores, coverage=coverage, chance=chance, n_clusters=len(np.unique(labels)),
                                 n_spots=len(rows),
                                 batch_key=batch_key, params=params)


def plot_silhouette_vs_recall(rows: Sequence[Mapping[str, object]], path: str | os.PathLike, *,
                              title: str = "Silhouette-batch vs mean Recall@5") -> Path:
    """Scatter of silhouette-batch against mean Recall@5 across runs, like the HESCAPE paper's Fig. 2.

    Parameters
    ----------
    rows
        One mapping per run or dataset with ``"silhouette_batch"`` (float in [0, 1]), ``"recall_at_5"`` (mean of the
        image→gene and gene→image Recall@5, in [0, 1]) and ``"label"`` (str); optional ``"chance_recall_at_5"``
        (drawn as a grey tick under the point) and ``"recall_std"`` (an error bar, e.g. the s.d. over seeds).
    path
        Output image (format from the suffix, e.g. ``.png``); written atomically.
    title
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``. With three or more rows the least-squares line and Pearson's r are drawn.
    """
    if not rows:
        raise _err(what="rows", expected="at least one run", found="none", fix="pass one mapping per run")
    xs, ys, labs, chance, err = [], [], [], [], []
    for i, r in enumerate(rows):
        try:
            xs.append(float(r["silhouette_batch"]))
            ys.append(float(r["recall_at_5"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _err(what=f"rows[{i}]", expected="numeric 'silhouette_batch' and 'recall_at_5'",
                       found=f"keys {sorted(r)}", fix="add both keys to every row") from exc
        labs.append(str(r.get("label", i)))
        chance.append(r.get("chance_recall_at_5"))
        sd = r.get("recall_std")
        err.append(float(sd) if sd is not None and np.isfinite(float(sd)) else 0.0)
    x, y = np.array(xs), np.array(ys)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise _err(what="rows", expected="finite values", found="NaN or inf", fix="drop runs without a score")
    figure = _need("matplotlib.figure", "plot_silhouette_vs_recall")
    fig = figure.Figure(figsize=(5.2, 4.2), dpi=150)  # no pyplot: no global backend or figure state touched
    ax = fig.subplots()
    ax.scatter(x, y, s=46, color="#1f5fa8", zorder=3)
    if any(err):
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor="#1f5fa8", elinewidth=1, capsize=3, zorder=3)
    for xi, yi, lab in zip(x, y, labs, strict=True):
        ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for xi, c in zip(x, chance, strict=True):
        if c is not None:
            ax.plot([xi - 0.006, xi + 0.006], [float(c)] * 2, color="0.55", lw=1.5, zorder=2)
    if len(x) >= 3 and np.ptp(x) > 0:
        slope, icept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(grid, slope * grid + icept, color="#c0392b", lw=1.2, ls="--", zorder=1, label="least-squares fit")
        r = np.corrcoef(x, y)[0, 1] if np.ptp(y) > 0 else float("nan")
        legend_title = f"Pearson r = {r:.2f} (n = {len(x)})"
    else:
        legend_title = None
    if any(c is not None for c in chance):
        ax.plot([], [], color="0.55", lw=1.5, label="chance Recall@5")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, title=legend_title, title_fontsize=9, framealpha=0.9)
    ax.set_xlabel("Silhouette-batch of expression (1 = batches mixed)")
    ax.set_ylabel("Mean Recall@5 (image→gene, gene→image)")
    ax.set_title(title, fontsize=10)
    pad_x = max(0.02, 0.08 * np.ptp(x))
    ax.set_xlim(x.min() - pad_x, x.max() + 2.5 * pad_x)
    top = 1.15 * max(1e-3, float(max((y + np.asarray(err)).max(),
                                     max((float(c) for c in chance if c is not None), default=0))))
    ax.set_ylim(-0.04 * top, top)  # below 0 so chance ticks near 0 stay visible
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
