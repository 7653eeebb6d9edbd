"""Slide-level mutation prediction: a transformer MIL aggregator and site-preserving 5-fold cross-validation.

Protocol (HESCAPE paper §8.4, following peng-lab/HistoBistro)
------------------------------------------------------------
* **Aggregator** (:class:`TransformerMIL`; HistoBistro ``models/aggregators/transformer.py`` ``Transformer`` with
  ``models/aggregators/model_utils.py`` ``Attention``/``FeedForward``/``PreNorm``): tile features ``(N, D)`` →
  ``Linear(D, heads·dim_head) + ReLU`` → prepend a learned CLS token (HistoBistro's default ``pool="cls"``;
  ``pool="mean"`` averages the tokens instead) → ``depth`` pre-norm blocks ``x + MHA(LN(x))``, ``x + FF(LN(x))``
  with ``FF = Linear(512, mlp_dim) → GELU → Linear(mlp_dim, 512)`` → ``LayerNorm`` → ``LayerNorm → Linear`` head.
  Paper: 2 layers, 8 heads of dimension 64, latent 512 (``mlp_dim = 512``, HistoBistro's default). Dropout 0
  (HistoBistro's defaults). Attention is computed with ``torch.nn.functional.scaled_dot_product_attention``.
* **Loss** (HistoBistro ``train_k-fold.py``/``classifier.py``, binary task): ``BCEWithLogitsLoss`` with
  ``pos_weight = n_negative / n_positive`` of the training folds; probability ``sigmoid(logit)``, prediction
  ``probability ≥ 0.5``.
* **Optimisation** (paper §8.4; HistoBistro ``config.yaml``): AdamW, lr 2e-5, weight decay 2e-5, batch size 1
  (one slide per step, all its tiles), 10 epochs, training slides reshuffled every epoch (seeded). On CPU and CUDA
  torch's fused AdamW runs the same update in one kernel (about 1.7x faster steps on small bags on CPU).
* **Model selection** (paper §8.4; HistoBistro ``val_check_interval: 500``, ``stop_criterion: loss``): mean
  validation loss every ``val_every`` = 500 iterations and at the end of every epoch; the weights with the lowest
  validation loss are tested.
* **Folds**: paper: "five site-preserving folds …, three folds for training, one for validation, and one for
  testing". Slides are grouped by tissue source site and assigned to folds with scikit-learn's
  ``StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)`` (all slides of a site share a fold; label
  balance approximately kept). Rotation as the diagram in HistoBistro ``train_k-fold.py``: run ``k`` tests on fold
  ``k``, validates on fold ``k − 1 (mod 5)`` and trains on the other three. (HistoBistro's own code splits by
  patient with ``StratifiedKFold``; the paper's site-preserving folds are followed here.)
* **Metrics**: per test fold, scikit-learn ``f1_score`` (positive class, threshold 0.5) and ``roc_auc_score``;
  reported as mean(std) over folds (``np.std``, ddof 0, as :mod:`hescape.eval.expression`), the paper's Tables 3–5
  format (F1 only there).

Chance levels printed beside the result: AUROC 0.5 (null s.d. ``sqrt((n₊ + n₋ + 1) / (12 n₊ n₋))``, the
Mann–Whitney U null) and the F1 of predicting every slide positive, ``2p / (1 + p)`` with ``p`` the test prevalence.

Inputs are in-memory bags or a CSV with columns ``path, patient, site, label`` (``path``: an ``.npz`` with a
``features`` array, as written by :func:`hescape.eval.wsi.slide_features`; relative paths are taken from the
CSV's folder; ``label`` 0/1). A patient in two sites, a site in two folds (given ``folds``) and a fold without
both classes are refused.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import HescapeEvalError

__all__ = ["TransformerMIL", "MILFoldResult", "MILResult", "load_bags_csv", "parse_label", "site_folds", "check_folds",
           "cross_validate_mil", "mil_from_csv", "REQUIRED_COLUMNS"]

REQUIRED_COLUMNS = ("path", "patient", "site", "label")


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim)
        self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.ff(self.norm2(x))


class TransformerMIL(nn.Module):
    """Transformer aggregator over a bag of tile features (architecture in the module docstring).

    Parameters
    ----------
    input_dim : tile feature width ``D``.
    n_outputs : logits per slide (1 for a binary target).
    depth, heads, dim_head, mlp_dim : 2, 8, 64, 512 (paper §8.4; latent ``heads · dim_head`` = 512).
    pool : ``"cls"`` (learned class token; HistoBistro's default) or ``"mean"``.

    ``forward(x)``: ``(B, N, D)`` or ``(N, D)`` → ``(B, n_outputs)``.
    """

    def __init__(self, input_dim: int, n_outputs: int = 1, *, depth: int = 2, heads: int = 8, dim_head: int = 64,
                 mlp_dim: int = 512, pool: str = "cls", dropout: float = 0.0):
        super().__init__()
        if pool not in ("cls", "mean"):
            msg = "pool"
            raise HescapeEvalError.build(msg, expected="'cls' or 'mean'", found=repr(pool), fix="pick one")
        dim = heads * dim_head
        self.pool = pool
        self.projection = nn.Sequential(nn.Linear(input_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x[None]
        x = self.projection(x)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------------------------------------------
# Inputs and folds
# --------------------------------------------------------------------------------------------------------------

_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1, "False": 0, "True": 1}


def parse_label(text: str, what: str = "label") -> int:
    """A slide label as 0/1 from its CSV text (``0``/``1``, ``0.0``/``1.0``, ``false``/``true``; 1 = mutated).

    Raises
    ------
    HescapeEvalError
        Any other text (the message names ``what``).
    """
    value = _LABELS.get(str(text).strip())
    if value is None:
        raise HescapeEvalError.build(what, expected="0 or 1", found=repr(text),
                                     fix="encode the target as 0/1 (1 = mutated)")
    return value


def load_bags_csv(csv_path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Read ``path, patient, site, label`` rows; returns ``(bags, labels, sites, patients)``.

    The table is read and checked by :func:`hescape.eval.mutation.read_slide_table` (the same rules as
    ``hescape-eval mutation``): relative paths are taken from the CSV's folder; ``path`` names an ``.npz`` holding a
    ``features`` array ``(N_i, D)`` (as :func:`hescape.eval.wsi.slide_features` writes, or ``features.csv`` of a
    mutation run lists).

    Raises
    ------
    HescapeEvalError
        A missing, empty or header-only file, a missing column, an empty ``path``/``patient``/``site`` cell, a label
        other than 0/1, a slide listed twice, a missing or unreadable feature file, features that are not a
        non-empty ``(N, D)`` array of finite numbers.
    """
    from .io import read_npz
    from .mutation import read_slide_table

    table = read_slide_table(csv_path)
    bags = []
    for p, line in zip(table.paths, table.rows, strict=True):
        what = f"slide table row {line} features {str(p)!r}"
        fix = "run hescape.eval.wsi.extract_features (or hescape-eval mutation) first"
        if not p.is_file():
            raise HescapeEvalError.build(what, expected="an .npz with 'features'",
                                         found="no such file" if not p.exists() else "a directory", fix=fix)
        data = read_npz(p, what=what, fix=fix)
        if "features" not in data:
            raise HescapeEvalError.build(what, expected="an .npz with 'features'",
                                         found=f"arrays {sorted(data)}", fix=fix)
        bags.append(_check_bag(data["features"], what))
    return bags, table.labels, table.sites, table.patients


def _check_bag(bag, what: str) -> np.ndarray:
    """``bag`` as float32 after checking it is a non-empty ``(N, D)`` array of finite numbers."""
    b = np.asarray(bag)
    if b.ndim != 2 or b.shape[0] == 0 or b.shape[1] == 0 or b.dtype.kind not in "fiu":
        raise HescapeEvalError.build(what, expected="a non-empty (N tiles, D) numeric array",
                                     found=f"shape {b.shape}, dtype {b.dtype}",
                                     fix="extract every slide with one encoder (one row per tile)")
    b = b.astype(np.float32, copy=False)
    bad = ~np.isfinite(b).all(axis=1)
    if bad.any():
        raise HescapeEvalError.build(what, expected="finite features",
                                     found=f"NaN or inf in {int(bad.sum())} of {len(b)} tiles, first at tile "
                                           f"{int(np.argmax(bad))}",
                                     fix="check the encoder (its weights, precision) and extract the slide again")
    return b


def site_folds(labels: Sequence[int], sites: Sequence, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0…n_folds−1) of every slide; all slides of a site share a fold (``StratifiedGroupKFold``).

    Raises
    ------
    HescapeEvalError
        Labels of one class only; fewer sites than ``n_folds``; no class with ``n_folds`` slides.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels, sites = np.asarray(labels), np.asarray(sites)
    classes = np.unique(labels)
    if len(classes) < 2:
        msg = "slide labels"
        raise HescapeEvalError.build(msg, expected="both classes, 0 (wild type) and 1 (mutated)",
                                     found=f"only label {classes.tolist()} in all {len(labels)} slides",
                                     fix="check the label column (F1 and AUROC need positive and negative slides)")
    n_sites = len(np.unique(sites))
    if n_sites < n_folds:
        msg = "site-preserving folds"
        raise HescapeEvalError.build(msg, expected=f"at least {n_folds} sites",
                                     found=f"{n_sites} sites", fix="pass fewer n_folds or finer site labels")
    folds = np.empty(len(labels), dtype=np.int64)
    counts = np.unique(labels, return_counts=True)[1]
    if counts.max() < n_folds:  # scikit-learn's StratifiedGroupKFold refuses this case with a ValueError
        msg = "site-preserving folds"
        raise HescapeEvalError.build(msg, expected=f"at least {n_folds} slides of one class (one per fold)",
                                     found=f"class sizes {counts.tolist()}",
                                     fix="add slides of the rarer class or pass fewer n_folds")
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(sgkf.split(np.zeros(len(labels)), labels, groups=sites)):
        folds[test] = k
    return folds


def check_folds(folds: Sequence[int], labels: Sequence[int], sites: Sequence, patients: Sequence) -> None:
    """Refuse folds that leak or cannot be scored.

    Raises
    ------
    HescapeEvalError
        A patient with slides in two sites; a site with slides in two folds; a fold without both classes.
    """
    folds, labels, sites, patients = map(np.asarray, (folds, labels, sites, patients))
    for p in np.unique(patients):
        s = np.unique(sites[patients == p])
        if len(s) > 1:
            msg = f"patient {p.item()!r}"
            raise HescapeEvalError.build(msg, expected="all slides of a patient in one site",
                                         found=f"sites {s.tolist()}", fix="correct the site column")
    for s in np.unique(sites):
        f = np.unique(folds[sites == s])
        if len(f) > 1:
            msg = f"site {s.item()!r}"
            raise HescapeEvalError.build(
                msg, expected="all slides of a site in one fold (site-preserving cross-validation)",
                found=f"folds {f.tolist()}", fix="let site_folds assign the folds, or move the site's slides into one fold")
    for k in np.unique(folds):
        c = np.unique(labels[folds == k])
        if len(c) < 2:
            msg = f"fold {int(k)}"
            raise HescapeEvalError.build(
                msg, expected="both classes (AUROC and F1 need positives and negatives)",
                found=f"only label {c.tolist()} in its {int((folds == k).sum())} slides",
                fix="use fewer folds, another seed, or more slides of the rare class")


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------

@dataclass
class MILFoldResult:
    """Test metrics of one rotation: ``test_fold``, ``val_fold``, ``f1``, ``auroc``, ``n_test``, ``prevalence``
    (positives in the test fold), ``best_step`` (iteration of the selected weights), ``best_val_loss``, ``probs``."""

    test_fold: int
    val_fold: int
    f1: float
    auroc: float
    n_test: int
    prevalence: float
    best_step: int
    best_val_loss: float
    probs: np.ndarray = field(repr=False)


@dataclass
class MILResult:
    """Cross-validation result: ``folds`` and mean/std (ddof 0) over folds of F1 and AUROC, with chance levels."""

    folds: list[MILFoldResult]

    def _ms(self, key: str) -> tuple[float, float]:
        v = np.array([getattr(f, key) for f in self.folds])
        return float(v.mean()), float(v.std())

    @property
    def f1(self) -> tuple[float, float]:
        """``(mean, std)`` of the test F1 over folds."""
        return self._ms("f1")

    @property
    def auroc(self) -> tuple[float, float]:
        """``(mean, std)`` of the test AUROC over folds."""
        return self._ms("auroc")

    @property
    def chance_f1(self) -> float:
        """Mean over folds of the F1 of predicting every slide positive, ``2p / (1 + p)``."""
        return float(np.mean([2 * f.prevalence / (1 + f.prevalence) for f in self.folds]))

    @property
    def chance_auroc_sd(self) -> float:
        """Null s.d. of one fold's AUROC (Mann–Whitney), averaged over folds."""
        sds = []
        for f in self.folds:
            npos = round(f.prevalence * f.n_test)
            nneg = f.n_test - npos
            sds.append(math.sqrt((npos + nneg + 1) / (12 * npos * nneg)))
        return float(np.mean(sds))

    def summary(self) -> str:
        """One line: ``F1 m(s)  AUROC m(s)`` and the chance levels."""
        (fm, fs), (am, as_) = self.f1, self.auroc
        return (f"F1 {fm:.3f}({fs:.3f})  AUROC {am:.3f}({as_:.3f})  over {len(self.folds)} folds; "
                f"chance: F1 (all positive) {self.chance_f1:.3f}, AUROC 0.5 (null s.d. per fold "
                f"{self.chance_auroc_sd:.3f})")


def _mean_loss(model, bags, labels, crit, device) -> tuple[float, np.ndarray]:
    model.eval()
    losses, probs = [], []
    with torch.no_grad():
        for b, y in zip(bags, labels, strict=True):
            logit = model(torch.as_tensor(b, device=device)[None])[:, 0]
            losses.append(float(crit(logit, torch.tensor([float(y)], device=device))))
            probs.append(float(torch.sigmoid(logit)))
    model.train()
    return float(np.mean(losses)), np.asarray(probs)


def cross_validate_mil(bags: Sequence[np.ndarray], labels: Sequence[int], sites: Sequence, patients: Sequence | None
                       = None, *, folds: Sequence[int] | None = None, n_folds: int = 5, epochs: int = 10,
                       lr: float = 2e-5, weight_decay: float = 2e-5, val_every: int = 500, seed: int = 0,
                       model_kwargs: dict | None = None, device: str = "cpu", verbose: bool = False,
                       progress: bool = False) -> MILResult:
    """Site-preserving k-fold cross-validation of :class:`TransformerMIL` (protocol in the module docstring).

    Parameters
    ----------
    bags : per slide, ``(N_i, D)`` tile features (``N_i`` may differ).
    labels : ``(S,)`` 0/1 slide labels (1 = mutated / positive).
    sites : ``(S,)`` tissue source site of each slide; ``patients`` ``(S,)`` (default: one per slide).
    folds : optional ``(S,)`` fold of each slide (checked); default :func:`site_folds` with ``seed``.
    epochs, lr, weight_decay, val_every : 10, 2e-5, 2e-5, 500 (paper §8.4). Batch size is 1.
    seed : seeds folds, weight initialisation (``seed + k``) and shuffling.
    model_kwargs : extra :class:`TransformerMIL` arguments (e.g. smaller ``heads`` for tests).
    verbose : print one line per fold and the summary.
    progress : a progress bar over all training steps of all folds (tqdm when installed, on stderr).

    Returns
    -------
    MILResult

    Raises
    ------
    HescapeEvalError
        No bags; bags of different widths, empty or holding NaN/inf; labels not 0/1; fewer sites than folds; a
        patient in two sites; a site in two folds; a fold without both classes.
    """
    labels = np.asarray(labels)
    sites = np.asarray(sites)
    patients = np.arange(len(labels)).astype(str) if patients is None else np.asarray(patients)
    if len(bags) == 0:
        msg = "MIL inputs"
        raise HescapeEvalError.build(msg, expected="one bag per slide", found="no slides",
                                     fix="pass the bags, labels and sites of every slide")
    if not (len(bags) == len(labels) == len(sites) == len(patients)):
        msg = "MIL inputs"
        raise HescapeEvalError.build(msg, expected="as many bags, labels, sites and patients",
                                     found=f"{len(bags)}, {len(labels)}, {len(sites)}, {len(patients)}",
                                     fix="pass one entry per slide")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        msg = "labels"
        raise HescapeEvalError.build(msg, expected="0/1", found=f"values {np.unique(labels)[:5].tolist()}",
                                     fix="binarise the target (1 = mutated)")
    bags = [_check_bag(b, f"bag {i}") for i, b in enumerate(bags)]
    dims = sorted({b.shape[1] for b in bags})
    if len(dims) != 1:
        msg = "bags"
        raise HescapeEvalError.build(msg, expected="(N_i, D) arrays of one width D",
                                     found=f"widths {dims}", fix="extract every slide with one encoder")
    folds = site_folds(labels, sites, n_folds, seed) if folds is None else np.asarray(folds)
    check_folds(folds, labels, sites, patients)
    k_all = np.unique(folds)
    if len(k_all) < 3:
        msg = "folds"
        raise HescapeEvalError.build(msg, expected="at least 3 (train, validation, test)",
                                     found=f"{len(k_all)}", fix="use n_folds >= 3")
    from .wsi import _progress

    total = sum(epochs * int(((folds != k) & (folds != k_all[(i - 1) % len(k_all)])).sum())
                for i, k in enumerate(k_all))
    bar = _progress(total, "MIL steps", progress)
    results = []
    for i, k in enumerate(k_all):
        v = k_all[(i - 1) % len(k_all)]
        tr = np.flatnonzero((folds != k) & (folds != v))
        va, te = np.flatnonzero(folds == v), np.flatnonzero(folds == k)
        torch.manual_seed(seed + int(k))
        model = TransformerMIL(bags[0].shape[1], 1, **(model_kwargs or {})).to(device)
        npos = int(labels[tr].sum())
        crit = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([(len(tr) - npos) / max(npos, 1)], device=device))
        # fused: torch's single-kernel AdamW (same update rule); the per-tensor loop dominates small-bag steps on CPU
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                fused=torch.device(device).type in ("cpu", "cuda") or None)
        gen = np.random.default_rng(seed + int(k))
        best, best_loss, best_step, step = copy.deepcopy(model.state_dict()), math.inf, 0, 0

        val_bags, val_labels = [bags[j] for j in va], labels[va]

        def evaluate(step, model=model, val_bags=val_bags, val_labels=val_labels, crit=crit):
            nonlocal best, best_loss, best_step
            loss, _ = _mean_loss(model, val_bags, val_labels, crit, device)
            if loss < best_loss:
                best, best_loss, best_step = copy.deepcopy(model.state_dict()), loss, step

        model.train()
        for _ in range(epochs):
            for j in gen.permutation(tr):
                logit = model(torch.as_tensor(bags[j], device=device)[None])[:, 0]
                loss = crit(logit, torch.tensor([float(labels[j])], device=device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % val_every == 0:
                    evaluate(step)
            if step % val_every != 0:
                evaluate(step)
        model.load_state_dict(best)
        _, probs = _mean_loss(model, [bags[j] for j in te], labels[te], crit, device)
        from sklearn.metrics import f1_score, roc_auc_score

        res = MILFoldResult(int(k), int(v), float(f1_score(labels[te], (probs >= 0.5).astype(int), zero_division=0)),
                            float(roc_auc_score(labels[te], probs)), len(te), float(labels[te].mean()), best_step,
                            best_loss, probs)
        if verbose:
            print(f"fold {k} (val {v}): F1 {res.f1:.3f} AUROC {res.auroc:.3f} n={res.n_test} "
                  f"best step {best_step} val loss {best_loss:.4f}")
        results.append(res)
    if bar is not None:
        bar.close()
    out = MILResult(results)
    if verbose:
        print(out.summary())
    return out


def mil_from_csv(csv_path: str | os.PathLike, **kwargs) -> MILResult:
    """:func:`load_bags_csv` then :func:`cross_validate_mil` (keyword arguments passed on)."""
    bags, labels, sites, patients = load_bags_csv(csv_path)
    return cross_validate_mil(bags, labels, sites, patients, **kwargs)
