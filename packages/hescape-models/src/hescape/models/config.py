"""Configuration dataclasses of HESCAPE models. Every field is commented."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ImageEncoderCfg", "GeneEncoderCfg", "ModelCfg"]


@dataclass(frozen=True)
class ImageEncoderCfg:
    timm_name: str = "vit_small_patch16_224"  # timm architecture the tower is built from
    image_size: int = 64  # input side in pixels (patches are resized to it)
    patch_size: int = 8  # ViT patch size in pixels
    width: int = 128  # ViT embedding width
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads
    pretrained: bool = False  # load timm weights (needs them local or hub access)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel normalisation mean (ImageNet)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # per-channel normalisation std (ImageNet)


@dataclass(frozen=True)
class GeneEncoderCfg:
    kind: str = "mlp"  # gene tower type; "mlp" is the from-scratch baseline of the paper
    n_genes: int = 0  # input genes; 0 = set from the dataset at build time
    hidden_mult: int = 2  # hidden width = hidden_mult × n_genes (the paper's MLP: 2×)
    dropout: float = 0.1  # dropout in the gene MLP
    transform: str = "log1p"  # raw-count transform applied before the tower (see hescape.data.transforms)


@dataclass(frozen=True)
class ModelCfg:
    image: ImageEncoderCfg = field(default_factory=ImageEncoderCfg)  # image tower
    gene: GeneEncoderCfg = field(default_factory=GeneEncoderCfg)  # gene tower
    embed_dim: int = 128  # shared embedding size d (the paper: 128)
    projection: str = "mlp"  # projection head: "linear" or "mlp" (the paper's best)
    loss: str = "clip"  # "clip" or "siglip"
    init_logit_scale: float = 2.6592  # log(1/0.07), CLIP's initial temperature
    init_logit_bias: float = -10.0  # SigLIP's initial bias (used by loss="siglip")
    init_logit_scale_siglip: float = 2.3026  # log(10), SigLIP's initial scale
