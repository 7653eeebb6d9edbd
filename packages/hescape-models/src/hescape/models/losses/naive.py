"""Plain materialised CLIP and SigLIP losses: the one reference the tests and benchmarks compare against.

Each builds the whole M×N logit matrix and applies ``torch.nn.functional`` cross-entropy / log-sigmoid, so its
correctness is readable at a glance (and it agrees with open_clip's ``ClipLoss``/``SigLipLoss`` on a square
batch). It needs O(M·N) memory: use it on small batches only.

Conventions: image features ``v`` (M×d), gene features ``g`` (N×d), exponentiated ``logit_scale``, positive
pairs ``(i, i + offset)`` (``offset = rank · M`` for a local loss on one shard of a gathered batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["clip_loss_naive", "siglip_loss_naive"]


def clip_loss_naive(v: torch.Tensor, g: torch.Tensor, logit_scale: torch.Tensor, *, offset: int = 0,
                    row_weight: float | None = None, col_weight: float | None = None) -> torch.Tensor:
    """``row_weight · Σ_i CE(z_i·, i + offset) + col_weight · Σ_j CE(z_·j, j)`` with ``z = s · v gᵀ``.

    The defaults (``1/(2M)`` each, square batch) are CLIP's symmetric mean cross-entropy as open_clip computes it.
    The column term needs a square batch with ``offset = 0``; pass ``col_weight=0`` otherwise.
    """
    m = v.shape[0]
    row_weight = 0.5 / m if row_weight is None else row_weight
    col_weight = 0.5 / m if col_weight is None else col_weight
    z = logit_scale * v.float() @ g.float().T
    labels = torch.arange(m, device=z.device) + offset
    loss = row_weight * F.cross_entropy(z, labels, reduction="sum")
    if col_weight:
        loss = loss + col_weight * F.cross_entropy(z.T, labels, reduction="sum")
    return loss


def siglip_loss_naive(v: torch.Tensor, g: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                      offset: int = 0) -> torch.Tensor:
    """SigLIP: ``−Σ_ij log σ(y_ij (s · v_i·g_j + b)) / M`` with ``y = +1`` on the positive pairs, ``−1`` elsewhere."""
    z = logit_scale * v.float() @ g.float().T + logit_bias
    y = -torch.ones_like(z)
    idx = torch.arange(v.shape[0], device=z.device)
    y[idx, idx + offset] = 1.0
    return -F.logsigmoid(y * z).sum() / v.shape[0]
