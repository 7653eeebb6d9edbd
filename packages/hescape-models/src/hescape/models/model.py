"""The HESCAPE two-tower model: image tower + gene tower, projection heads, learnable temperature."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelCfg, TowerCfg
from .errors import HescapeModelError
from .finetune import apply_finetune, count_parameters
from .heads import ProjectionHead
from .losses import create_loss
from .zoo import create_gene_encoder, create_image_encoder, get_encoder_entry

__all__ = ["HescapeCLIP", "cfg_to_dict", "cfg_from_dict", "MAX_LOGIT_SCALE"]

#: Upper bound of the log logit scale, ln 100 (temperature ≥ 0.01), as open_clip clamps it after each step.
MAX_LOGIT_SCALE = math.log(100.0)


class HescapeCLIP(nn.Module):
    """Aligns H&E patches and gene-expression profiles in one L2-normalised embedding space.

    Parameters
    ----------
    cfg
        The model configuration; ``cfg.panel`` is the gene panel (the dataset's genes, in column order).
    load_weights
        Load each tower's published weights (``TowerCfg.weights``). ``False`` builds the architecture only,
        for loading a HESCAPE checkpoint that already holds every weight.

    ``forward(images, counts)`` takes raw data — ``(B, 3, H, W)`` uint8 patches and ``(B, G)`` raw counts — and
    each encoder prepares its own input with its contract (:mod:`hescape.models.contracts`). It returns the
    normalised embeddings, ``logit_scale`` (exponentiated, as open_clip passes it) and ``logit_bias`` (SigLIP
    only, else None). Call :meth:`clamp_logit_scale` after every optimiser step.
    """

    def __init__(self, cfg: ModelCfg, *, load_weights: bool = True):
        super().__init__()
        if not cfg.panel:
            msg = "the model needs its gene panel (ModelCfg.panel: the dataset's gene names); found an empty panel"
            raise HescapeModelError(msg)
        self.cfg = cfg
        self.image_encoder = create_image_encoder(cfg.image.name, cfg.image.weights if load_weights else None,
                                                  contract=cfg.image.contract, **cfg.image.options)
        self.gene_encoder = create_gene_encoder(cfg.gene.name, cfg.gene.weights if load_weights else None,
                                                panel=cfg.panel, gene_ids=cfg.gene_ids, contract=cfg.gene.contract,
                                                **cfg.gene.options)
        head = {"dropout": cfg.head_dropout, "hidden": cfg.head_hidden, "norm": cfg.head_norm}
        self.image_proj = ProjectionHead(self.image_encoder.out_dim, cfg.embed_dim,
                                         cfg.image.projection or cfg.projection, **head)
        self.gene_proj = ProjectionHead(self.gene_encoder.out_dim, cfg.embed_dim,
                                        cfg.gene.projection or cfg.projection, **head)
        for key, enc, tower in (("image", self.image_encoder, cfg.image), ("gene", self.gene_encoder, cfg.gene)):
            entry = get_encoder_entry(tower.name, key)
            mode = tower.finetune or entry.default_finetune
            if (load_weights and mode in ("frozen", "lora") and entry.pretrained and enc.weights_tag == "random-init"
                    and not tower.allow_random_init):
                msg = (f"{key} encoder {tower.name!r} is a pretrained encoder but no weights were given, and "
                       f"finetune={mode!r} would train around a random trunk; give its weights "
                       f"(model.{key}_weights=… or its options, see `hescape-models list`), or finetune='full' to "
                       f"train the architecture from scratch")
                raise HescapeModelError(msg)
            apply_finetune(enc, mode, rank=tower.lora_rank, alpha=tower.lora_alpha,
                           dropout=tower.lora_dropout, targets=tower.lora_targets)
        if cfg.image.projection == "transformer" or (cfg.image.projection is None and cfg.projection == "transformer"):
            if not hasattr(self.image_encoder, "forward_tokens"):
                msg = f"projection 'transformer' needs tokens; image encoder {cfg.image.name!r} gives none"
                raise HescapeModelError(msg)
        siglip = cfg.loss == "siglip"
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale_siglip if siglip else cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias)) if siglip else None
        self.loss_fn = create_loss(cfg.loss)

    @property
    def n_genes(self) -> int:
        return len(self.cfg.panel)

    @property
    def panel(self) -> tuple[str, ...]:
        return tuple(self.cfg.panel)

    def train(self, mode: bool = True):
        super().train(mode)
        for enc in (self.image_encoder, self.gene_encoder):
            if getattr(enc, "finetune_mode", "full") == "frozen":
                enc.eval()  # a frozen trunk keeps fixed BatchNorm statistics and no dropout
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Trunk features (tokens when the image head is a transformer) of raw ``(B, 3, H, W)`` patches."""
        x = self.image_encoder.preprocess(images)
        if self.image_proj.wants_tokens:
            return self.image_encoder.forward_tokens(x)
        return self.image_encoder.forward_features(x)

    def gene_features(self, counts: torch.Tensor) -> torch.Tensor:
        """Trunk features of raw counts ``(B, G)``."""
        self.gene_encoder.check_counts(counts)
        return self.gene_encoder.forward_features(self.gene_encoder.preprocess(counts))

    def encode_image(self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Raw ``(B, 3, H, W)`` patches → ``(B, embed_dim)`` unit vectors (float32, also under bf16 autocast).

        ``features``: the trunk's output for those patches (:meth:`image_features`, e.g. from a feature cache of a
        frozen trunk) instead of the patches; only the projection head runs."""
        feats = self.image_features(images) if features is None else features
        return F.normalize(self.image_proj(feats).float(), dim=-1)

    def encode_gene(self, counts: torch.Tensor | None = None, *, features: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Raw counts ``(B, G)`` over the model's panel → ``(B, embed_dim)`` unit vectors (float32); or the gene
        trunk's ``features`` (:meth:`gene_features`) instead of the counts."""
        feats = self.gene_features(counts) if features is None else features
        return F.normalize(self.gene_proj(feats).float(), dim=-1)

    def forward(self, images: torch.Tensor | None, counts: torch.Tensor | None, *,
                image_features: torch.Tensor | None = None, gene_features: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor | None]:
        """Embeddings of a batch; a tower given its trunk features (``image_features``/``gene_features``) skips its
        trunk (its input may then be None)."""
        return {
            "image_features": self.encode_image(images, features=image_features),
            "gene_features": self.encode_gene(counts, features=gene_features),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the log scale to [0, ln 100] in place — after the optimiser step, as open_clip does — so the value
        used and logged is the value stored, and a scale pushed past the bound keeps its gradient."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def loss(self, out: dict) -> dict[str, torch.Tensor]:
        return self.loss_fn(out["image_features"], out["gene_features"], out["logit_scale"], out["logit_bias"])

    def describe(self) -> dict:
        """Encoder names, weights tags, contracts and parameter counts (what a checkpoint records)."""
        towers = {}
        for key, enc, proj in (("image", self.image_encoder, self.image_proj), ("gene", self.gene_encoder,
                                                                                  self.gene_proj)):
            towers[key] = {"encoder": enc.encoder_name, "weights": enc.weights_tag,
                           "finetune": getattr(enc, "finetune_mode", "full"), "contract": enc.contract.to_dict(),
                           "out_dim": enc.out_dim, "projection": proj.kind,
                           "params": count_parameters(enc), "head_params": count_parameters(proj)}
        return {"towers": towers, "params": count_parameters(self)}

    def recorded_cfg(self) -> ModelCfg:
        """The configuration with each tower's contract written in, for checkpoints: reloading it restores the
        exact preprocessing even if an encoder's default contract changes later."""
        return dataclasses.replace(
            self.cfg,
            image=dataclasses.replace(self.cfg.image, contract=self.image_encoder.contract.to_dict(),
                                      finetune=self.image_encoder.finetune_mode),
            gene=dataclasses.replace(self.cfg.gene, contract=self.gene_encoder.contract.to_dict(),
                                     finetune=self.gene_encoder.finetune_mode))


def cfg_to_dict(cfg: ModelCfg) -> dict:
    """Plain-value dict of a :class:`ModelCfg` (JSON-safe)."""
    d = dataclasses.asdict(cfg)
    d["panel"] = list(cfg.panel)
    d["gene_ids"] = None if cfg.gene_ids is None else list(cfg.gene_ids)
    return d


def _tower(d: dict | str, key: str) -> TowerCfg:
    if isinstance(d, str):
        return TowerCfg(d)
    if not isinstance(d, dict) or "name" not in d:
        msg = f"model config {key!r}: expected a tower dict with a 'name', found {d!r}"
        raise HescapeModelError(msg)
    d = dict(d)
    d["lora_targets"] = tuple(d.get("lora_targets", ()))
    known = {f.name for f in dataclasses.fields(TowerCfg)}
    unknown = sorted(set(d) - known)
    if unknown:
        msg = f"model config {key!r}: unknown field(s) {unknown}; expected some of {sorted(known)}"
        raise HescapeModelError(msg)
    return TowerCfg(**d)


def cfg_from_dict(d: dict) -> ModelCfg:
    """Inverse of :func:`cfg_to_dict`. Refuses the pre-registry layout (``image.timm_name``) with the fix."""
    d = dict(d)
    if isinstance(d.get("image"), dict) and "timm_name" in d["image"]:
        msg = ("this checkpoint was written by hescape-models 0.1 (image tower given as timm_name); retrain it with "
               "this version or use hescape-models 0.1 to load it")
        raise HescapeModelError(msg)
    known = {f.name for f in dataclasses.fields(ModelCfg)}
    unknown = sorted(set(d) - known)
    if unknown:
        msg = f"model config: unknown field(s) {unknown}; expected some of {sorted(known)}"
        raise HescapeModelError(msg)
    image, gene = _tower(d.pop("image", "vit_nano"), "image"), _tower(d.pop("gene", "mlp"), "gene")
    d["panel"] = tuple(d.get("panel", ()))
    if d.get("gene_ids") is not None:
        d["gene_ids"] = tuple(d["gene_ids"])
    return ModelCfg(image=image, gene=gene, **d)

