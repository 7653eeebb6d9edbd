"""Image and gene-expression towers."""

from __future__ import annotations

import timm
import torch
from torch import nn

from .config import GeneEncoderCfg, ImageEncoderCfg
from .errors import HescapeModelError

__all__ = ["TimmImageEncoder", "MLPGeneEncoder", "ProjectionHead"]


class TimmImageEncoder(nn.Module):
    """A timm backbone (classifier removed) that maps ``(B, 3, S, S)`` float images to ``(B, width)``."""

    def __init__(self, cfg: ImageEncoderCfg):
        super().__init__()
        self.cfg = cfg
        kwargs = {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "embed_dim": cfg.width,
                  "depth": cfg.depth, "num_heads": cfg.heads}
        try:
            self.backbone = timm.create_model(cfg.timm_name, pretrained=cfg.pretrained, num_classes=0, **kwargs)
        except RuntimeError as e:
            msg = f"cannot build image encoder {cfg.timm_name!r}: {e}. List choices with timm.list_models('vit*')"
            raise HescapeModelError(msg) from None
        self.out_dim = self.backbone.num_features
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` patches to normalised float input at ``image_size`` (batched resize)."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"expected images of shape (B, 3, H, W), found {tuple(images.shape)}"
            raise HescapeModelError(msg)
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images))


class MLPGeneEncoder(nn.Module):
    """Two-layer MLP with a hidden layer ``hidden_mult × n_genes`` wide (the HESCAPE MLP baseline)."""

    def __init__(self, cfg: GeneEncoderCfg):
        super().__init__()
        if cfg.n_genes <= 0:
            msg = f"gene encoder needs n_genes > 0, found {cfg.n_genes}; set it from the dataset's panel"
            raise HescapeModelError(msg)
        self.cfg = cfg
        hidden = cfg.hidden_mult * cfg.n_genes
        self.net = nn.Sequential(
            nn.Linear(cfg.n_genes, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(hidden, hidden),
        )
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.cfg.n_genes:
            msg = (f"expected gene expression of shape (B, {self.cfg.n_genes}), found {tuple(x.shape)}; "
                   "the dataset's gene panel must match the model's")
            raise HescapeModelError(msg)
        return self.net(x)


class ProjectionHead(nn.Module):
    """Map encoder features to the shared embedding space: ``linear`` or ``mlp`` (Linear–GELU–Linear)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
        else:
            msg = f"unknown projection {kind!r}: expected 'linear' or 'mlp'"
            raise HescapeModelError(msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
