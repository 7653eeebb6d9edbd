"""CONCH v1: the image tower of CONCH's CoCa ViT-B/16 at 448 px (registry name ``conch``).

Paper: M. Y. Lu et al., "A visual-language foundation model for computational pathology", Nature Medicine 30,
863–874 (2024). Code: https://github.com/mahmoodlab/CONCH (``conch/open_clip_custom/coca_model.py``,
``vision_tower.py``, ``transformer.py``, ``model_configs/conch_ViT-B-16.json``). Weights: ``pytorch_model.bin`` of
https://huggingface.co/MahmoodLab/CONCH (gated, CC-BY-NC-ND 4.0).

CONCH's ``VisualModel`` is a timm ``VisionTransformer`` trunk (width 768, depth 12, 12 heads, patch 16, 448 px, no
LayerScale, ``forward = forward_features``: every token after the final norm), an attentional pooler with one
512-d query over the tokens (``attn_pool_contrast``), ``ln_contrast`` and a 512×512 ``proj_contrast``; a second
pooler with 256 queries (``attn_pool_caption``, ``ln_caption``) feeds the captioning decoder, which is not needed
here. The image embedding ``encode_image(x, proj_contrast=False, normalize=False)`` — the one CONCH's README
recommends for linear probes and MIL and the one HEST and TRIDENT use — is ``ln_contrast(pool(trunk(x)))``,
512-d; ``proj_contrast=True`` multiplies it by ``proj_contrast`` (CONCH's retrieval embedding, before L2
normalisation). open_clip's :class:`~open_clip.transformer.AttentionalPooler` has the same parameters (``query``,
``attn.{q,k,v}_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj``, ``ln_q``, ``ln_k``) and the same computation
(its attention runs batch-first, CONCH's sequence-first), so it is used as is.

Note: the HESCAPE reference code (peng-lab/hescape ``constants.py``) resized CONCH's input to 480 px, not 448, and
fed its projection head the trunk's CLS token (768-d, ``image_encoder.py``: ``trunk = model.visual.trunk``, then
``x[:, 0, :]``), bypassing the attentional pooler. ``pooling="cls"`` reproduces the second choice; the trunk keeps
CONCH's ``dynamic_img_size=True``, so a contract of 480 px reproduces the first (position embeddings are
interpolated from 28×28 to 30×30 on every forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..base import ImageEncoder
from ..contracts import OPENAI_MEAN, OPENAI_STD, ImageContract
from ..errors import HescapeModelError
from ..weights import WeightsSpec
from ..zoo import EncoderEntry, register_encoder

__all__ = ["ConchVisualEncoder", "convert_conch", "CONCH_TRUNK_PARAMS", "CONCH_PARAMS"]

#: The ViT-B/16 trunk at 448 px (facts sheet ``encoders.md``, computed; ``pos_embed`` is (1, 785, 768)).
CONCH_TRUNK_PARAMS = 86_250_240
#: The visual tower built here: trunk + contrastive pooler 1,315,840 (query 512, q 512×512, k and v 768×512 each,
#: in-proj bias 1,536, out-proj 512×512 + 512, ln_q 1,024, ln_k 1,536) + ln_contrast 1,024 + proj_contrast 262,144.
#: CONCH's own visual tower also holds the caption pooler and ln_caption (2,563,584 more, 90,392,832 in all),
#: dropped here.
CONCH_PARAMS = 87_829_248

#: Resize(448, bicubic) + CenterCrop(448) (a square patch: the crop keeps everything), OpenAI CLIP mean/std
#: (CONCH ``factory.py`` L69–72, ``transform.py``, ``constants.py``). µm/px: CONCH's 1.17 M image–caption pairs come
#: from diverse sources (README abstract), not from slides tiled at one magnification, so no single training
#: resolution is published in the code; 0.5 is 20×, at which the authors' own tooling tiles slides for CONCH
#: (TRIDENT README: 512-px tiles at 20×, ≈0.57 µm/px after the resize to 448). Not checked against the paper's
#: methods text, which was not reachable here.
#: HESCAPE's reference code resized to 480 px instead (see the module docstring).
_CONTRACT = ImageContract(input_size=448, resize_size=448, interpolation="bicubic", mean=OPENAI_MEAN,
                          std=OPENAI_STD, um_per_px=0.5)

_POOLINGS = ("attentional", "cls")


class ConchVisualEncoder(ImageEncoder):
    """CONCH's image tower: ``(B, 3, S, S)`` normalised input → ``(B, out_dim)``.

    Parameters
    ----------
    image_size, patch_size, width, depth, heads, mlp_ratio
        The ViT trunk (448, 16, 768, 12, 12, 4 for the published weights; smaller for tests).
    embed_dim
        Width of the contrastive query, ``ln_contrast`` and ``proj_contrast`` (512).
    pooler_heads
        Heads of the attentional pooler (8).
    pooling
        ``"attentional"`` (default): the contrastive pooler's single query, then ``ln_contrast``, ``out_dim =
        embed_dim`` — CONCH's ``encode_image``. ``"cls"``: the trunk's CLS token after the final norm,
        ``out_dim = width`` — what the HESCAPE reference code used.
    proj_contrast
        Multiply the pooled vector by ``proj_contrast`` (CONCH's retrieval space; only with attentional pooling).

    Modules not used by the chosen pooling (``attn_pool_contrast``, ``ln_contrast``, ``proj_contrast``) are kept so
    the published file loads key for key, and frozen so they get no gradient (and no DDP unused-parameter error).
    """

    def __init__(self, image_size: int = 448, patch_size: int = 16, width: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, embed_dim: int = 512, pooler_heads: int = 8,
                 pooling: str = "attentional", proj_contrast: bool = False):
        super().__init__()
        if pooling not in _POOLINGS:
            msg = f"conch: pooling must be one of {_POOLINGS}, found {pooling!r}"
            raise HescapeModelError(msg)
        if proj_contrast and pooling != "attentional":
            msg = "conch: proj_contrast=True projects the attentional-pool vector; use it with pooling='attentional'"
            raise HescapeModelError(msg)
        self.pooling = pooling
        self.use_proj_contrast = bool(proj_contrast)
        # CONCH coca_model.py _build_vision_tower: timm defaults otherwise (class token, qkv bias, no LayerScale).
        self.trunk = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                       num_heads=heads, mlp_ratio=mlp_ratio, num_classes=0, dynamic_img_size=True)
        from open_clip.transformer import AttentionalPooler  # here: importing open_clip takes seconds

        self.attn_pool_contrast = AttentionalPooler(d_model=embed_dim, context_dim=width, n_head=pooler_heads,
                                                    n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width ** -0.5 * torch.randn(embed_dim, embed_dim))  # CONCH's init scale
        if pooling == "cls":
            for module in (self.attn_pool_contrast, self.ln_contrast):
                module.requires_grad_(False)
        if not self.use_proj_contrast:
            self.proj_contrast.requires_grad_(False)
        self.out_dim = embed_dim if pooling == "attentional" else width
        self.contract = dataclasses.replace(_CONTRACT, input_size=image_size, resize_size=image_size)

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n_queries, embed_dim)``: the contrastive pooler's output after ``ln_contrast`` (and projection)."""
        x = self.ln_contrast(self.attn_pool_contrast(tokens))
        return x @ self.proj_contrast if self.use_proj_contrast else x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, out_dim)``: the pooled query token (``attentional``) or every trunk token (``cls``)."""
        tokens = self.trunk.forward_features(x)
        return self._pooled(tokens) if self.pooling == "attentional" else tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]


# Parts of the CoCa checkpoint outside the image embedding, dropped by name: the text encoder, the captioning decoder
# (CONCH's README says its weights were removed from the release; dropped too should a file carry them), the caption
# pooler and its norm, and the contrastive temperature.
_DROP_PREFIXES = ("text.", "text_decoder.", "visual.attn_pool_caption.", "visual.ln_caption.")
_DROP_KEYS = ("logit_scale",)


def convert_conch(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CONCH's CoCa checkpoint → :class:`ConchVisualEncoder` keys.

    As CONCH's ``read_state_dict`` (``factory.py``): unwrap ``'state_dict'`` when present and strip a ``module.``
    prefix. Then drop the named text and caption parts (``text.*``, ``text_decoder.*``, ``visual.attn_pool_caption.*``,
    ``visual.ln_caption.*``, ``logit_scale``) and strip ``visual.`` from the rest (``visual.trunk.*``,
    ``visual.attn_pool_contrast.*``, ``visual.ln_contrast.*``, ``visual.proj_contrast``). Any other key is kept, so a
    foreign file fails loading with its keys named.
    """
    sd = state_dict["state_dict"] if isinstance(state_dict.get("state_dict"), Mapping) else state_dict
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k in _DROP_KEYS or k.startswith(_DROP_PREFIXES):
            continue
        out[k.removeprefix("visual.")] = v
    return out


def _build(image_size: int = 448, patch_size: int = 16, width: int = 768, depth: int = 12, heads: int = 12,
           mlp_ratio: float = 4.0, embed_dim: int = 512, pooler_heads: int = 8, pooling: str = "attentional",
           proj_contrast: bool = False) -> ConchVisualEncoder:
    return ConchVisualEncoder(image_size=image_size, patch_size=patch_size, width=width, depth=depth, heads=heads,
                              mlp_ratio=mlp_ratio, embed_dim=embed_dim, pooler_heads=pooler_heads, pooling=pooling,
                              proj_contrast=proj_contrast)


register_encoder(EncoderEntry(
    name="conch", modality="image", builder=_build, contract=_CONTRACT, out_dim=512, pooling="attentional",
    weights=WeightsSpec(files=("pytorch_model.bin",), hf_id="MahmoodLab/CONCH", licence="CC-BY-NC-ND-4.0",
                        gated=True, url="https://huggingface.co/MahmoodLab/CONCH", convert=convert_conch),
    # Attention qkv/proj as every ViT here. The HESCAPE reference lists "qkv"/"proj", which in peft also matches
    # trunk.patch_embed.proj (the patch-embedding conv); give lora_targets=("qkv", "proj") to reproduce that.
    lora_targets=("attn.qkv", "attn.proj"), params=CONCH_PARAMS,
    description=("CONCH v1 image tower: ViT-B/16 at 448 px + attentional pooler + ln_contrast, 512-d unprojected "
                 "(CONCH, Nat Med 2024)")))
