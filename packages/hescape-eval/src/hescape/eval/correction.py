"""Post-hoc batch correction of embeddings: applied to a set of spots after training, with the sample as the batch.

Two corrections, each taking an ``(N, d)`` embedding and the ``N`` batch labels (sample or donor of every spot):

* :func:`harmony` — Harmony (Korsunovsky et al., Nat Methods 16:1289, 2019) through the maintained ``harmonypy``
  package (``run_harmony``; its defaults: theta 2, sigma 0.1, ``min(N/30, 100)`` clusters, at most 10
  iterations), the standard baseline for integrating single-cell embeddings.
* :func:`centre_by_sample` — subtract each batch's mean embedding (the first moment only; no clusters, no
  parameters), then L2-normalise again. It is what HESCAPE's ``sample_centring`` training option applies to every
  minibatch (:func:`centre_within`, differentiable), and at evaluation to every sample. A batch of one row is left
  as it is (its centred row would be zero).

Both are *transductive within a sample*: the correction of a spot uses the other spots of the same sample (never
a label, never the other modality). The corrected rows are L2-normalised again (retrieval compares cosines).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import HescapeEvalError

__all__ = ["harmony", "centre_by_sample", "centre_within"]


def _inputs(x, batch, what: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise HescapeEvalError.build(what=what, expected="a non-empty (N, d) embedding", found=f"shape {arr.shape}",
                                     fix="pass one row per spot")
    if not np.isfinite(arr).all():
        raise HescapeEvalError.build(what=what, expected="finite embeddings", found="NaN or inf values",
                                     fix="drop or repair those spots before correcting")
    labels = np.asarray(batch, dtype=object).ravel()
    if len(labels) != len(arr):
        raise HescapeEvalError.build(what=what, expected=f"one batch label per spot ({len(arr)})",
                                     found=f"{len(labels)} labels", fix="pass the sample of every row")
    return arr, labels.astype(str)


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def centre_within(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(B, d)`` minus the mean of the rows with the same code ``(B,)`` (int), L2-normalised again;
    differentiable (``sample_centring`` applies it to every training minibatch). A code with a single row is left
    as it is."""
    uniq, inverse, counts = torch.unique(codes, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    means = sums / counts.to(x.dtype).unsqueeze(1)
    centred = torch.where((counts[inverse] > 1).unsqueeze(1), x - means[inverse], x)
    return torch.nn.functional.normalize(centred, dim=-1)


def centre_by_sample(x, batch) -> np.ndarray:
    """Subtract each batch's mean row, then L2-normalise every row.

    Parameters
    ----------
    x
        ``(N, d)`` embeddings (NumPy or torch).
    batch
        ``(N,)`` batch labels (e.g. the sample of every spot).

    Returns
    -------
    numpy.ndarray
        ``(N, d)`` float32, unit rows (a row equal to its batch mean stays 0; a batch of one row is only normalised).

    Raises
    ------
    HescapeEvalError
        Not a non-empty 2-D array, NaN/inf, or labels of another length.
    """
    arr, labels = _inputs(x, batch, "centre_by_sample")
    _, codes = np.unique(labels, return_inverse=True)
    out = centre_within(torch.from_numpy(arr), torch.from_numpy(codes.reshape(-1)))
    return out.numpy().astype(np.float32)


def harmony(x, batch, *, seed: int = 0, theta: float = 2.0, max_iter: int = 10) -> np.ndarray:
    """Harmony-corrected embeddings (``harmonypy.run_harmony``), L2-normalised.

    Parameters
    ----------
    x
        ``(N, d)`` embeddings.
    batch
        ``(N,)`` batch labels.
    seed
        Harmony's ``random_state`` (its k-means initialisation).
    theta, max_iter
        Harmony's diversity penalty and maximum iterations (its defaults).

    Returns
    -------
    numpy.ndarray
        ``(N, d)`` float32, unit rows. With one batch there is nothing to correct and the rows come back
        normalised but otherwise unchanged.

    Raises
    ------
    HescapeEvalError
        Bad input (see :func:`centre_by_sample`), or harmonypy not installed (``pip install 'hescape-eval[batch]'``).
    """
    arr, labels = _inputs(x, batch, "harmony")
    if len(np.unique(labels)) < 2:
        return _normalise(arr)
    try:
        import harmonypy
    except ImportError:
        raise HescapeEvalError.build(what="harmony", expected="harmonypy installed", found="no harmonypy",
                                     fix="pip install 'hescape-eval[batch]'") from None
    ho = harmonypy.run_harmony(arr, {"batch": labels}, ["batch"], theta=theta, max_iter_harmony=max_iter,
                               random_state=seed, verbose=False, ncores=1)
    z = np.asarray(ho.Z_corr, dtype=np.float64)
    if z.shape != arr.shape:  # harmonypy returns (d, N)
        z = z.T
    return _normalise(z)
