"""Baselines beside a trained model: what simple, hand-made image statistics already retrieve.

The colour-statistics probe
---------------------------
A trained image–gene model should beat a linear read-out of patch colour; if it does not, the data set ties
the modalities through stain intensity and the model has not shown that it reads morphology. The probe:

1. **Features** (:func:`colour_statistics`): each uint8 RGB patch becomes optical density per channel,
   ``OD = -ln((I + 1) / 256)`` (Beer–Lambert absorbance; ``I = 255`` gives 0, ``I = 0`` gives ``ln 256``),
   and, for every region in :func:`region_names` and every channel R, G, B, the mean and the (population)
   standard deviation of OD over the region's pixels. Regions, with ``r`` the distance of a pixel centre from
   the patch centre in units of half the patch side (so ``r = 1`` touches the middle of each edge):
   the whole patch; the centre disc ``r <= radii[0]``; the rings ``radii[j-1] < r <= radii[j]``.
   With the default ``radii = (0.2, 0.4, 0.6, 0.8, 1.0)``: 6 regions × 2 statistics × 3 channels = 36 features,
   ordered region-major, then statistic (mean, std), then channel (R, G, B) (:func:`feature_names`).
2. **Probe** (:func:`ridge_probe`): on the *train* split only, fit a PCA of ``log1p`` gene counts
   (``n_components`` components; scikit-learn ``PCA(svd_solver="full")``) and a ``StandardScaler`` + ridge
   regression (scikit-learn ``RidgeCV``, penalty chosen on the train split by its efficient leave-one-out
   error over ``alphas``; or ``Ridge(alpha)`` for one fixed value) from the features to the PCA scores.
3. **Retrieval**: on the *test* split, the predicted PCA scores (from the image features) and the actual PCA
   scores (from the test counts) are L2-normalised, so their inner product is the cosine similarity, and
   ranked over the full test gallery with :func:`hescape.eval.retrieval_metrics`, the same exact Recall@k as a
   model's embeddings: ``"i2g"`` queries with the prediction from each image, ``"g2i"`` with each spot's
   actual expression.

Everything is deterministic (no random state: full SVD, closed-form ridge).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from .errors import HescapeEvalError
from .retrieval import RetrievalResult, retrieval_metrics

__all__ = ["DEFAULT_RADII", "DEFAULT_ALPHAS", "optical_density", "region_masks", "region_names", "feature_names",
           "colour_statistics", "ridge_probe", "colour_probe"]

#: Outer radii of the centre disc and the rings, in units of half the patch side.
DEFAULT_RADII: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
#: Ridge penalties searched by :func:`ridge_probe` (on standardised features).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))

_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)  # OD of every uint8 intensity
_CHANNELS = ("R", "G", "B")


def optical_density(patches: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` of uint8 intensities, float64 of the same shape (unitless)."""
    patches = np.asarray(patches)
    if patches.dtype != np.uint8:
        raise HescapeEvalError.build(what="patches", expected="uint8 RGB intensities 0..255",
                                     found=f"dtype {patches.dtype}", fix="pass the stored uint8 patches")
    return _OD_LUT[patches]


def region_masks(height: int, width: int, radii: Sequence[float] = DEFAULT_RADII) -> np.ndarray:
    """Boolean region masks ``(1 + len(radii), height, width)``: whole patch, centre disc, rings (module docstring).

    ``r`` of pixel ``(i, j)`` is the distance of its centre ``(i + 0.5, j + 0.5)`` from the patch centre
    ``(height / 2, width / 2)``, divided by ``min(height, width) / 2``.
    """
    radii = [float(r) for r in radii]
    bad = any(not np.isfinite(r) or r <= 0 for r in radii) or any(b <= a for a, b in itertools.pairwise(radii))
    if not radii or bad:
        raise HescapeEvalError.build(what="radii", expected="increasing positive fractions of half the patch side",
                                     found=f"{radii}", fix="pass e.g. radii=(0.2, 0.4, 0.6, 0.8, 1.0)")
    yy = (np.arange(height) + 0.5 - height / 2)[:, None]
    xx = (np.arange(width) + 0.5 - width / 2)[None, :]
    r = np.sqrt(yy * yy + xx * xx) / (min(height, width) / 2)
    masks = [np.ones((height, width), dtype=bool), r <= radii[0]]
    masks += [(r > lo) & (r <= hi) for lo, hi in itertools.pairwise(radii)]
    empty = [k for k, m in enumerate(masks) if not m.any()]
    if empty:
        raise HescapeEvalError.build(what=f"region(s) {empty} of a {height}×{width} patch",
                                     expected="at least one pixel", found="none",
                                     fix="use fewer, wider rings (radii) or larger patches")
    return np.stack(masks)


def region_names(radii: Sequence[float] = DEFAULT_RADII) -> list[str]:
    """Names of the regions of :func:`region_masks`: ``patch``, ``disc<=r0``, ``ring(r0,r1]``, ..."""
    radii = [float(r) for r in radii]
    return ["patch", f"disc<={radii[0]:g}"] + [f"ring({lo:g},{hi:g}]" for lo, hi in itertools.pairwise(radii)]


def feature_names(radii: Sequence[float] = DEFAULT_RADII) -> list[str]:
    """Names of the columns of :func:`colour_statistics`, e.g. ``"patch/mean/R"``, ``"ring(0.8,1]/std/B"``."""
    return [f"{reg}/{stat}/{ch}" for reg in region_names(radii) for stat in ("mean", "std") for ch in _CHANNELS]


def colour_statistics(patches: np.ndarray, *, radii: Sequence[float] = DEFAULT_RADII,
                      chunk: int = 256) -> np.ndarray:
    """Per-patch colour statistics: mean and std of optical density per channel over each region.

    Parameters
    ----------
    patches
        ``(N, H, W, 3)`` uint8 RGB patches (channels last, as stored in HESCAPE datasets).
    radii
        Outer radii of the centre disc and the rings, in units of half the patch side (module docstring).
    chunk
        Patches converted to float64 at a time (memory ``chunk · H · W · 3 · 8`` bytes).

    Returns
    -------
    numpy.ndarray
        ``(N, 6 · (1 + len(radii)))`` float64, columns as in :func:`feature_names` (OD is unitless).
    """
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise HescapeEvalError.build(what="patches", expected="an (N, H, W, 3) RGB array",
                                     found=f"shape {patches.shape}", fix="stack channels-last uint8 patches")
    n, h, w, _ = patches.shape
    masks = region_masks(h, w, radii).reshape(-1, h * w).astype(np.float64)
    weights = (masks / masks.sum(1, keepdims=True)).T  # (H·W, n_regions), columns sum to 1
    out = np.empty((n, masks.shape[0], 2, 3), dtype=np.float64)
    for s in range(0, n, max(1, int(chunk))):
        od = optical_density(patches[s : s + chunk]).reshape(-1, h * w, 3)  # (b, H·W, 3)
        centre = od.mean(axis=1, keepdims=True)
        od -= centre  # shift by the patch mean first: no cancellation in E[x²] - E[x]² below
        shifted_mean = np.einsum("bpc,pr->brc", od, weights)
        var = np.einsum("bpc,pr->brc", od * od, weights) - shifted_mean * shifted_mean
        out[s : s + chunk, :, 0] = shifted_mean + centre
        out[s : s + chunk, :, 1] = np.sqrt(np.clip(var, 0.0, None))
    return out.reshape(n, -1)


def _as_counts(x, what: str) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all() or (x < 0).any():
        raise HescapeEvalError.build(what=what, expected="a finite, non-negative (N, G) count matrix",
                                     found=f"shape {x.shape}" + ("" if x.ndim != 2 else " with negative/NaN values"),
                                     fix="pass raw counts (not log-transformed)")
    return x


def ridge_probe(train_features, train_counts, test_features, test_counts, *, ks: Sequence[int] = (1, 5, 10),
                n_components: int = 32, alphas: Sequence[float] | float = DEFAULT_ALPHAS,
                backend: str = "auto") -> dict[str, RetrievalResult]:
    """Retrieval of a linear probe from per-spot image features to the PCA of ``log1p`` gene counts.

    Parameters
    ----------
    train_features, test_features
        ``(N_train, F)`` and ``(N_test, F)`` image features (e.g. :func:`colour_statistics`).
    train_counts, test_counts
        ``(N_train, G)`` and ``(N_test, G)`` raw gene counts of the same spots.
    ks
        Recall@k values.
    n_components
        PCA components of ``log1p`` counts (at most ``min(N_train - 1, G)``), fitted on the train split only.
    alphas
        Ridge penalties: a sequence (chosen by leave-one-out error on the train split, ``RidgeCV``) or one value.
    backend
        Rank backend passed to :func:`hescape.eval.retrieval_metrics`.

    Returns
    -------
    dict
        ``{"i2g": RetrievalResult, "g2i": RetrievalResult}`` over the full test gallery (module docstring).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr = np.asarray(train_features, dtype=np.float64)
    xte = np.asarray(test_features, dtype=np.float64)
    ytr, yte = _as_counts(train_counts, "train_counts"), _as_counts(test_counts, "test_counts")
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise HescapeEvalError.build(what="features", expected="(N, F) train and test arrays with the same F",
                                     found=f"shapes {xtr.shape} and {xte.shape}", fix="compute both the same way")
    if len(xtr) != len(ytr) or len(xte) != len(yte) or ytr.shape[1] != yte.shape[1]:
        raise HescapeEvalError.build(what="features and counts", expected="one row per spot and one gene panel",
                                     found=f"features {xtr.shape}/{xte.shape}, counts {ytr.shape}/{yte.shape}",
                                     fix="pass the features and counts of the same spots")
    if len(xtr) < 3:
        raise HescapeEvalError.build(what="train split", expected="at least 3 spots", found=f"{len(xtr)}",
                                     fix="probe on a larger train split")
    n_comp = int(min(n_components, len(ytr) - 1, ytr.shape[1]))
    pca = PCA(n_components=n_comp, svd_solver="full").fit(np.log1p(ytr))
    ztr, zte = pca.transform(np.log1p(ytr)), pca.transform(np.log1p(yte))
    if np.ndim(alphas) == 0:
        reg = Ridge(alpha=float(alphas))
    else:
        reg = RidgeCV(alphas=np.asarray(alphas, dtype=np.float64))
    model = make_pipeline(StandardScaler(), reg).fit(xtr, ztr)
    pred = model.predict(xte)

    def unit(z: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).float()

    return retrieval_metrics(unit(pred), unit(zte), ks=ks, backend=backend)


def colour_probe(train_images, train_counts, test_images, test_counts, *, ks: Sequence[int] = (1, 5, 10),
                 radii: Sequence[float] = DEFAULT_RADII, n_components: int = 32,
                 alphas: Sequence[float] | float = DEFAULT_ALPHAS, backend: str = "auto") -> dict[str, RetrievalResult]:
    """The colour-statistics probe: :func:`colour_statistics` of the patches, then :func:`ridge_probe`.

    ``train_images`` / ``test_images`` are ``(N, H, W, 3)`` uint8 RGB patches; counts are raw ``(N, G)``.
    Returns ``{"i2g": RetrievalResult, "g2i": RetrievalResult}`` on the test split.
    """
    return ridge_probe(colour_statistics(train_images, radii=radii), train_counts,
                       colour_statistics(test_images, radii=radii), test_counts, ks=ks,
                       n_components=n_components, alphas=alphas, backend=backend)
