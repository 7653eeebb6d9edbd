"""The HESCAPE two-tower model: image tower + gene tower, projection heads, learnable temperature."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GeneEncoderCfg, ImageEncoderCfg, ModelCfg
from .encoders import MLPGeneEncoder, ProjectionHead, TimmImageEncoder
from .errors import HescapeModelError
from .losses import create_loss

__all__ = ["HescapeCLIP", "cfg_to_dict", "cfg_from_dict"]


class HescapeCLIP(nn.Module):
    """Aligns H&E patches and gene-expression profiles in one L2-normalised embedding space.

    ``forward(images, gexp)`` returns the normalised embeddings, ``logit_scale`` (already
    exponentiated, as open_clip passes it) and ``logit_bias`` (SigLIP only, else None).
    """

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        if cfg.gene.kind != "mlp":
            msg = f"unknown gene encoder {cfg.gene.kind!r}: expected 'mlp'"
            raise HescapeModelError(msg)
        self.cfg = cfg
        self.image_encoder = TimmImageEncoder(cfg.image)
        self.gene_encoder = MLPGeneEncoder(cfg.gene)
        self.image_proj = ProjectionHead(self.image_encoder.out_dim, cfg.embed_dim, cfg.projection)
        self.gene_proj = ProjectionHead(self.gene_encoder.out_dim, cfg.embed_dim, cfg.projection)
        siglip = cfg.loss == "siglip"
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale_siglip if siglip else cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias)) if siglip else None
        self.loss_fn = create_loss(cfg.loss)

    @property
    def n_genes(self) -> int:
        return self.cfg.gene.n_genes

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_gene(self, gexp: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.gene_proj(self.gene_encoder(gexp)), dim=-1)

    def forward(self, images: torch.Tensor, gexp: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {
            "image_features": self.encode_image(images),
            "gene_features": self.encode_gene(gexp),
            # Clamp as open_clip does: temperature never below 1/100.
            "logit_scale": self.logit_scale.clamp(max=math.log(100.0)).exp(),
            "logit_bias": self.logit_bias,
        }

    def loss(self, out: dict) -> dict[str, torch.Tensor]:
        return self.loss_fn(out["image_features"], out["gene_features"], out["logit_scale"], out["logit_bias"])


def cfg_to_dict(cfg: ModelCfg) -> dict:
    return dataclasses.asdict(cfg)


def cfg_from_dict(d: dict) -> ModelCfg:
    d = dict(d)
    img = d.pop("image", {})
    img = ImageEncoderCfg(**{**img, "mean": tuple(img.get("mean", ImageEncoderCfg.mean)),
                             "std": tuple(img.get("std", ImageEncoderCfg.std))})
    return ModelCfg(image=img, gene=GeneEncoderCfg(**d.pop("gene", {})), **d)
