"""CLIP and SigLIP loss modules and functions, dispatching to the fused Triton kernels or the tiled torch path.

``impl="auto"`` runs Triton on CUDA tensors when Triton imports, else the tiled torch reference (CPU);
``"triton"`` and ``"torch"`` force one path; ``"openclip"`` delegates to open_clip (materialises B×B logits).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import HescapeModelError
from ..ops._utils import triton_usable
from ._tiled import DEFAULT_TILE, clip_loss_torch, siglip_loss_torch
from .distributed import check_world, gather_features

__all__ = ["IMPLS", "ClipLoss", "SigLipLoss", "clip_loss", "create_loss", "resolve_impl", "siglip_loss"]

IMPLS = ("auto", "triton", "torch", "openclip")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        close = difflib.get_close_matches(str(impl), IMPLS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"expected impl in {IMPLS}, found {impl!r}{hint}"
        raise HescapeModelError(msg)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The backend ``impl`` runs on ``device``: ``"triton"`` or ``"torch"`` (or ``"openclip"``)."""
    _check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if impl == "triton" and not triton_usable(device):
        msg = (f"impl='triton' expects CUDA tensors with triton installed (or TRITON_INTERPRET=1 on CPU), found "
               f"device {device}; use impl='auto' or impl='torch'")
        raise HescapeModelError(msg)
    return impl


def clip_loss(img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor, *, diag_offset: int = 0,
              row_weight: float | None = None, col_weight: float | None = None, impl: str = "auto",
              tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Weighted CLIP loss ``w_r Σ_i CE(row i) + w_c Σ_j CE(column j)`` without the B×B logits in memory.

    Defaults (``w_r = w_c = 1/(2B)``, ``diag_offset=0``) equal open_clip's ``ClipLoss``. ``logit_scale`` is
    already exponentiated. ``col_weight=0`` is the one-directional term of a rectangular (local) loss whose
    positives are ``(i, i + diag_offset)``. ``tile`` only affects the torch path.
    """
    backend = resolve_impl(impl, img.device)
    if backend == "openclip":
        msg = "clip_loss: impl='openclip' is only offered by the ClipLoss module; use impl='auto'"
        raise HescapeModelError(msg)
    if backend == "triton":
        from ..ops.clip_loss import clip_loss_triton

        return clip_loss_triton(img, gex, logit_scale, diag_offset=diag_offset, row_weight=row_weight,
                                col_weight=col_weight)
    return clip_loss_torch(img, gex, logit_scale, diag_offset=diag_offset, row_weight=row_weight,
                           col_weight=col_weight, tile=tile)


def siglip_loss(img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                diag_offset: int = 0, impl: str = "auto", tile: int = DEFAULT_TILE) -> torch.Tensor:
    """SigLIP loss ``(1/M) Σ_ij −log σ(y_ij (s·<v_i, g_j> + b))``, equal to open_clip's ``SigLipLoss``."""
    backend = resolve_impl(impl, img.device)
    if backend == "openclip":
        msg = "siglip_loss: impl='openclip' is only offered by the SigLipLoss module; use impl='auto'"
        raise HescapeModelError(msg)
    if backend == "triton":
        from ..ops.siglip_loss import siglip_loss_triton

        return siglip_loss_triton(img, gex, logit_scale, logit_bias, diag_offset=diag_offset)
    return siglip_loss_torch(img, gex, logit_scale, logit_bias, diag_offset=diag_offset, tile=tile)


class _ContrastiveLoss(nn.Module):
    def __init__(self, *, impl: str = "auto", rank: int = 0, world_size: int = 1, gather_with_grad: bool = True,
                 local_loss: bool = False, tile: int = DEFAULT_TILE):
        super().__init__()
        _check_impl(impl)
        check_world(rank, world_size, require_group=False)  # the process group is checked at forward
        self.impl, self.rank, self.world_size = impl, rank, world_size
        self.gather_with_grad, self.local_loss, self.tile = gather_with_grad, local_loss, tile

    def extra_repr(self) -> str:
        return (f"impl={self.impl!r}, rank={self.rank}, world_size={self.world_size}, "
                f"gather_with_grad={self.gather_with_grad}, local_loss={self.local_loss}")


class ClipLoss(_ContrastiveLoss):
    """Symmetric InfoNCE over ``logit_scale · v gᵀ``: mean of image→gene and gene→image cross-entropy.

    Parameters
    ----------
    impl
        ``"auto"`` (Triton on CUDA, tiled torch elsewhere), ``"triton"``, ``"torch"`` or ``"openclip"``.
    rank, world_size
        This process's place in the torch.distributed group; ``world_size > 1`` gathers features from all ranks.
    gather_with_grad
        Differentiate through the gathered features (exact gradients after DDP averaging; recommended).
    local_loss
        Each rank scores only its own rows against all columns (O(B_local·B) work); the mean over ranks equals
        the global loss. Otherwise every rank computes the global loss on the gathered batch.
    tile
        Tile edge of the torch path (memory O(B·d + tile²) per CPU worker thread; see ``_tiled``).
    """

    def forward(self, img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # logit_bias is accepted for a uniform interface; a constant shift does not change a softmax.
        if self.impl == "openclip":
            from ._openclip import openclip_clip_loss

            loss = openclip_clip_loss(img, gex, logit_scale, local_loss=self.local_loss,
                                      gather_with_grad=self.gather_with_grad, rank=self.rank,
                                      world_size=self.world_size)
            return {"contrastive_loss": loss}
        kw = {"impl": self.impl, "tile": self.tile}
        all_img, all_gex = gather_features(img, gex, rank=self.rank, world_size=self.world_size,
                                           gather_with_grad=self.gather_with_grad)
        if self.world_size == 1 or not self.local_loss:
            return {"contrastive_loss": clip_loss(all_img, all_gex, logit_scale, **kw)}
        b = img.shape[0]
        off, w = self.rank * b, 1.0 / (2 * b)
        loss = (clip_loss(img, all_gex, logit_scale, diag_offset=off, row_weight=w, col_weight=0.0, **kw)
                + clip_loss(gex, all_img, logit_scale, diag_offset=off, row_weight=w, col_weight=0.0, **kw))
        return {"contrastive_loss": loss}


class SigLipLoss(_ContrastiveLoss):
    """Pairwise sigmoid loss over ``logit_scale · v gᵀ + logit_bias`` (labels +1 on positives, −1 elsewhere).

    Parameters are those of :class:`ClipLoss`. With ``local_loss`` each rank scores its images against all
    ranks' gene features, divided by the local batch (open_clip's distributed SigLIP); the mean over ranks equals
    the global loss.
    """

    def forward(self, img: torch.Tensor, gex: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            msg = "SigLIP expects a logit_bias, found None; build the model with loss='siglip'"
            raise HescapeModelError(msg)
        if self.impl == "openclip":
            from ._openclip import openclip_siglip_loss

            loss = openclip_siglip_loss(img, gex, logit_scale, logit_bias, rank=self.rank,
                                        world_size=self.world_size)
            return {"contrastive_loss": loss}
        kw = {"impl": self.impl, "tile": self.tile}
        if self.world_size == 1 or not self.local_loss:
            all_img, all_gex = gather_features(img, gex, rank=self.rank, world_size=self.world_size,
                                               gather_with_grad=self.gather_with_grad)
            return {"contrastive_loss": siglip_loss(all_img, all_gex, logit_scale, logit_bias, **kw)}
        all_gex, _ = gather_features(gex, None, rank=self.rank, world_size=self.world_size,
                                     gather_with_grad=self.gather_with_grad)
        loss = siglip_loss(img, all_gex, logit_scale, logit_bias, diag_offset=self.rank * img.shape[0], **kw)
        return {"contrastive_loss": loss}


_LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    """A loss module by name: ``"clip"`` or ``"siglip"``; ``kwargs`` go to its constructor (``None`` dropped)."""
    if name not in _LOSSES:
        close = difflib.get_close_matches(str(name), list(_LOSSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"unknown loss {name!r}: expected one of {sorted(_LOSSES)}{hint}"
        raise HescapeModelError(msg)
    return _LOSSES[name](**{k: v for k, v in kwargs.items() if v is not None})
