"""open_clip's ClipLoss/SigLipLoss behind our interface (``impl="openclip"``); the reference in tests.

open_clip materialises the B×B logits; prefer the fused default except to cross-check.
"""

from __future__ import annotations

import torch

from ..errors import HescapeModelError

__all__ = ["openclip_clip_loss", "openclip_siglip_loss"]


def openclip_clip_loss(img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor, *, local_loss: bool = False,
                       gather_with_grad: bool = True, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    from open_clip.loss import ClipLoss

    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                    world_size=world_size)(img, gex, logit_scale)


def openclip_siglip_loss(img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor,
                         logit_bias: torch.Tensor | None, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    from open_clip.loss import SigLipLoss

    if logit_bias is None:
        msg = "SigLIP expects a logit_bias, found None; build the model with loss='siglip'"
        raise HescapeModelError(msg)
    return SigLipLoss(rank=rank, world_size=world_size, dist_impl="gather")(img, gex, logit_scale, logit_bias)
