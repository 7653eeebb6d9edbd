"""Base classes of the two towers: each encoder owns its input contract and turns raw data into its input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .contracts import GeneContract, ImageContract
from .errors import HescapeModelError

__all__ = ["ImageEncoder", "GeneEncoder"]


class ImageEncoder(nn.Module):
    """An image tower: ``(B, 3, H, W)`` RGB patches → ``(B, out_dim)`` features.

    Subclasses set ``out_dim`` and implement :meth:`forward_features` on network input (the output of
    :meth:`preprocess`). ``contract`` is set by :func:`hescape.models.create_image_encoder` (or the subclass) and
    ``lora_targets`` names the module suffixes LoRA adapts by default.
    """

    out_dim: int
    contract: ImageContract
    lora_targets: tuple[str, ...] = ()
    no_weight_decay_names: tuple[str, ...] = ()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 (or [0, 1] float) patches → normalised ``(B, 3, S, S)`` float32 input."""
        return self.contract(images)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.preprocess(images))


class GeneEncoder(nn.Module):
    """A gene tower: raw counts ``(B, G)`` over ``panel`` → ``(B, out_dim)`` features.

    Subclasses set ``out_dim``, keep ``panel`` (the gene names of the input columns, in order), and implement
    :meth:`forward_features` on the output of :meth:`preprocess` (a tensor, or a dict of tensors for token
    models). The default :meth:`preprocess` applies the generic preprocessings of :class:`GeneContract`.
    """

    out_dim: int
    contract: GeneContract
    panel: tuple[str, ...]
    lora_targets: tuple[str, ...] = ()
    no_weight_decay_names: tuple[str, ...] = ()

    @property
    def n_genes(self) -> int:
        return len(self.panel)

    def check_counts(self, counts: torch.Tensor) -> None:
        """Refuse anything but raw counts ``(B, G)``: non-negative integers (a log-normalised matrix is caught)."""
        if counts.ndim != 2 or counts.shape[1] != self.n_genes:
            msg = (f"expected gene expression of shape (B, {self.n_genes}), found {tuple(counts.shape)}; "
                   "the dataset's gene panel must match the model's")
            raise HescapeModelError(msg)
        if counts.is_floating_point() and counts.numel():
            bad = ~torch.isfinite(counts) | (counts < 0) | (counts != torch.round(counts))
            if bool(bad.any()):
                v = float(counts[bad][0])
                msg = (f"expected raw counts (non-negative integers), found {v:.4g}; give the dataset's raw counts: "
                       "each gene encoder applies its own preprocessing (log1p, normalisation, tokens)")
                raise HescapeModelError(msg)
        elif not counts.is_floating_point() and counts.numel() and bool((counts < 0).any()):
            msg = "expected raw counts (non-negative integers), found negative values; give the dataset's raw counts"
            raise HescapeModelError(msg)

    def preprocess(self, counts: torch.Tensor) -> Any:
        return self.contract.apply_generic(counts)

    def forward_features(self, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        self.check_counts(counts)
        return self.forward_features(self.preprocess(counts))


def as_panel(panel: Sequence[str] | None, *, name: str) -> tuple[str, ...]:
    if panel is None or isinstance(panel, str) or len(panel) == 0:
        msg = (f"gene encoder {name!r} needs the gene panel (a list of gene names, the dataset's manifest 'genes'), "
               f"found {panel!r}")
        raise HescapeModelError(msg)
    return tuple(str(g) for g in panel)
