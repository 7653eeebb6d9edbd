"""Post-hoc batch correction of embeddings: applied to a set of spots after training, with the sample as the batch.

Two corrections, each taking an ``(N, d)`` embedding and the ``N`` batch labels (sample or donor of every spot):

* :func:`harmony` — Harmony (Korsunsky et al., Nat Methods 16:1289, 2019) through the maintained ``harmonypy``
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

from collections.abc import Callable

import numpy as np
import torch

from .errors import HescapeEvalError

__all__ = ["harmony", "centre_by_sample", "centre_within", "HARMONY_MIN_SPOTS"]

#: Fewest spots :func:`harmony` corrects: harmonypy's default number of clusters, ``min(N / 30, 100)`` rounded,
#: is 0 below 16 rows and it stops there.
HARMONY_MIN_SPOTS = 16


def _inputs(x, batch, what: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise HescapeEvalError.build(what=what, expected="a real-valued (N, d) embedding", found=f"dtype {x.dtype}",
                                     fix="pass float embeddings")
    arr = x.astype(np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise HescapeEvalError.build(what=what, expected="a non-empty (N, d) embedding", found=f"shape {arr.shape}",
                                     fix="pass one row per spot")
    if not np.isfinite(arr).all():
        raise HescapeEvalError.build(what=what, expected="finite embeddings", found="NaN or inf values",
                                     fix="drop or repair those spots before correcting")
    labels = np.asarray(batch, dtype=object) if batch is not None else np.empty(0, dtype=object)
    if hasattr(batch, "detach"):
        labels = np.asarray(batch.detach().cpu().numpy(), dtype=object)
    if labels.ndim != 1:
        raise HescapeEvalError.build(what=what, expected="one batch label per spot, a 1-D sequence",
                                     found=f"labels of shape {labels.shape}", fix="pass the sample of every row")
    if len(labels) != len(arr):
        raise HescapeEvalError.build(what=what, expected=f"one batch label per spot ({len(arr)})",
                                     found=f"{len(labels)} labels", fix="pass the sample of every row")
    return arr, labels.astype(str)


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def centre_within(x: torch.Tensor, codes: torch.Tensor, *, n_codes: int | None = None,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Rows of ``x`` ``(B, d)`` minus the mean of the rows with the same code, L2-normalised again; differentiable
    (``sample_centring`` applies it to every training minibatch). A code with a single row is left as it is.

    Parameters
    ----------
    x
        ``(B, d)`` embeddings.
    codes
        ``(B,)`` int64 sample codes in ``[0, n_codes)``.
    n_codes
        Number of codes (default: ``codes.max() + 1``); the same on every process when ``all_reduce`` is given.
    all_reduce
        Sums a tensor over processes (e.g. ``torch.distributed.nn.functional.all_reduce``, which passes gradients):
        the means are then those of the global minibatch, so ``W`` processes centre exactly as one process would.
    """
    n = int(codes.max()) + 1 if n_codes is None else int(n_codes)
    sums = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, codes, x)
    counts = torch.bincount(codes, minlength=n).to(x.dtype)
    if all_reduce is not None:
        sums, counts = all_reduce(sums), all_reduce(counts)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = torch.where((counts[codes] > 1).unsqueeze(1), x - means[codes], x)
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
    if len(arr) < HARMONY_MIN_SPOTS:  # harmonypy's default clusters, min(N / 30, 100), are none below 16 rows
        raise HescapeEvalError.build(what="harmony", expected=f"at least {HARMONY_MIN_SPOTS} spots",
                                     found=f"{len(arr)}", fix="correct a larger set of spots (or use centre_by_sample)")
    try:
        import harmonypy
    except ImportError:
        raise HescapeEvalError.build(what="harmony", expected="harmonypy installed", found="no harmonypy",
                                     fix="pip install 'hescape-eval[batch]'") from None
    ho = harmonypy.run_harmony(arr, {"batch": labels}, ["batch"], theta=theta, max_iter_harmony=max_iter,
                               random_state=seed, verbose=False, ncores=1)
    z = np.asarray(ho.Z_corr, dtype=np.float64)  # (N, d) in harmonypy >= 2.1
    if z.shape != arr.shape:
        raise HescapeEvalError.build(what="harmony", expected=f"harmonypy to return shape {arr.shape}",
                                     found=f"{z.shape}", fix="install harmonypy >= 2.1 (pip install 'hescape-eval[batch]')")
    return _normalise(z)
