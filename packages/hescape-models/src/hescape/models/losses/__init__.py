"""Contrastive losses between image and gene embeddings.

Each loss returns ``{"contrastive_loss": tensor}``; the trainer sums every key ending in ``_loss``.
"""

from ._openclip import ClipLoss, SigLipLoss, create_loss

__all__ = ["ClipLoss", "SigLipLoss", "create_loss"]
