"""CLIP and SigLIP losses, delegating to open_clip's reference implementations."""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss as _OCClipLoss
from open_clip.loss import SigLipLoss as _OCSigLipLoss
from torch import nn

from ..errors import HescapeModelError

__all__ = ["ClipLoss", "SigLipLoss", "create_loss"]


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image→gene and gene→image cross-entropy over ``scale · v gᵀ``."""

    def __init__(self):
        super().__init__()
        self._impl = _OCClipLoss()

    def forward(self, img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"contrastive_loss": self._impl(img, gex, logit_scale)}


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss over ``scale · v gᵀ + bias``, labels +1 on the diagonal, −1 elsewhere."""

    def __init__(self):
        super().__init__()
        self._impl = _OCSigLipLoss()

    def forward(self, img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            msg = "SigLIP needs a logit_bias; build the model with loss='siglip'"
            raise HescapeModelError(msg)
        return {"contrastive_loss": self._impl(img, gex, logit_scale, logit_bias)}


def create_loss(name: str) -> nn.Module:
    """``"clip"`` or ``"siglip"``."""
    losses = {"clip": ClipLoss, "siglip": SigLipLoss}
    if name not in losses:
        msg = f"unknown loss {name!r}: expected one of {sorted(losses)}"
        raise HescapeModelError(msg)
    return losses[name]()
