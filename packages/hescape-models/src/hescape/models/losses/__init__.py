"""Contrastive losses between image and gene embeddings.

Each loss module returns ``{"contrastive_loss": tensor}``; the trainer sums every key ending in ``_loss``.
The losses never materialise the B×B logit matrix: Triton kernels (:mod:`hescape.models.ops`) on CUDA, the
tiled torch reference (:mod:`._tiled`) elsewhere.
"""

from ._fused import IMPLS, ClipLoss, SigLipLoss, clip_loss, create_loss, resolve_impl, siglip_loss
from ._tiled import DEFAULT_TILE
from .distributed import all_gather_with_grad, gather_features

__all__ = [
    "ClipLoss", "SigLipLoss", "create_loss",
    "clip_loss", "siglip_loss", "resolve_impl", "IMPLS", "DEFAULT_TILE",
    "all_gather_with_grad", "gather_features",
]
