"""Configuration dataclasses of HESCAPE models. Every field is commented."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TowerCfg", "ModelCfg", "FINETUNE_MODES", "PROJECTIONS"]

FINETUNE_MODES = ("full", "frozen", "lora")
PROJECTIONS = ("linear", "mlp", "transformer")


@dataclass(frozen=True)
class TowerCfg:
    name: str  # registered encoder (hescape.models.list_image_encoders() / list_gene_encoders())
    weights: str | None = None  # None = random init; a file/directory of the published weights; "hf" = download
    options: dict[str, Any] = field(default_factory=dict)  # builder options of the encoder (sizes, pooling, vocab)
    finetune: str | None = None  # full | frozen (trunk fixed, eval mode) | lora (peft); None = the encoder's default
    allow_random_init: bool = False  # permit frozen/LoRA on a pretrained architecture without its weights (tests)
    lora_rank: int = 8  # LoRA rank r (the reference: 8)
    lora_alpha: float = 16.0  # LoRA alpha (the reference: 16)
    lora_dropout: float = 0.1  # dropout on the LoRA branch (the reference: 0.1)
    lora_targets: tuple[str, ...] = ()  # module-name suffixes to adapt; empty = the encoder's defaults
    projection: str | None = None  # linear | mlp | transformer; None = ModelCfg.projection
    contract: dict[str, Any] | None = None  # input contract recorded by a checkpoint (None = the entry's default)


@dataclass(frozen=True)
class ModelCfg:
    image: TowerCfg = field(default_factory=lambda: TowerCfg("vit_nano"))  # image tower
    gene: TowerCfg = field(default_factory=lambda: TowerCfg("mlp"))  # gene tower
    panel: tuple[str, ...] = ()  # gene names of the model's input columns, in order (the dataset's panel)
    gene_ids: tuple[str, ...] | None = None  # their Ensembl ids when known (vocabulary mapping of pretrained encoders)
    embed_dim: int = 128  # shared embedding size d (the paper: 128)
    projection: str = "mlp"  # projection head of both towers unless a tower sets its own: linear | mlp | transformer
    head_dropout: float = 0.2  # dropout inside the MLP head (the reference: timm Mlp, drop 0.2)
    head_hidden: int | None = None  # MLP head hidden width: None = 2·embed_dim (the reference); 0 = the encoder's width
    head_norm: bool = True  # LayerNorm inside the MLP head (the reference: yes)
    loss: str = "clip"  # "clip" or "siglip"
    init_logit_scale: float = 2.6592  # log(1/0.07), CLIP's initial temperature
    init_logit_bias: float = -10.0  # SigLIP's initial bias (used by loss="siglip")
    init_logit_scale_siglip: float = 2.3026  # log(10), SigLIP's initial scale
