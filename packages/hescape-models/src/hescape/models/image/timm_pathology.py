"""Pathology image encoders built with timm: UNI, UNI2-h, Prov-GigaPath, H-optimus-0/1, H0-mini, Virchow2, ResNet-50.

Each entry is the published architecture built with ``timm.create_model(..., pretrained=False)`` and the
published constructor arguments, the published pooled embedding, the input contract and where the weights live.
The ViTs share one wrapper, :class:`PathologyViT` (the timm model is held as ``self.trunk``); the HEST ResNet-50
baseline is :class:`TruncatedResNet`. Facts are from ``shared/reference/encoders.md`` and the public code named per
entry (TRIDENT = mahmoodlab/TRIDENT ``trident/patch_encoder_models/load.py``; HEST = mahmoodlab/HEST
``src/hest/bench/cpath_model_zoo/inference_models.py``).

Models and licences (weights are never downloaded by this module; ``weights="hf"`` asks the hub):

=========== ======================== =========== ======== ============== ====== ========== =======================
name        paper / card             pooling     dim      input px       µm/px  field      weights licence
=========== ======================== =========== ======== ============== ====== ========== =======================
uni         Chen et al. 2024, NatMed CLS         1024     224            0.5    112 µm     CC-BY-NC-ND-4.0, gated
uni2_h      MahmoodLab/UNI2-h        CLS         1536     224            0.5    112 µm     CC-BY-NC-ND-4.0, gated
gigapath    Xu et al. 2024, Nature   CLS         1536     256, crop 224  0.5    128 (112)  Apache-2.0, gated
h_optimus_0 bioptimus/releases v0    CLS         1536     224            0.5    112 µm     Apache-2.0, gated
h_optimus_1 bioptimus/H-optimus-1    CLS         1536     224            0.5    112 µm     Bioptimus terms, gated
h0_mini     Filiot et al. 2025       cls[+mean]  768/1536 224            0.5    112 µm     Bioptimus terms, gated
virchow2    Zimmermann et al. 2024   CLS+mean    2560     224            0.5*   112 µm     CC-BY-NC-ND-4.0, gated
resnet50    He et al. 2016 (HEST)    avg layer3  1024     224            none   (112 µm)   BSD-3-Clause
=========== ======================== =========== ======== ============== ====== ========== =======================

Scale (``ImageContract.um_per_px``) is the resolution the network expects its input at; ``field`` is what the
default input covers, ``input × µm/px`` (GigaPath resizes to 256 px = 128 µm and the network sees the central
224 px = 112 µm). Sources: UNI trained on 256/512 px tiles at 20× = 0.5 µm/px (UNI paper, Methods); the UNI README
states none for UNI2-h, TRIDENT runs it at 20×; Prov-GigaPath "is trained with 0.5 mpp preprocessed slides"
(prov-gigapath ``demo/1_slide_mpp_check.py``); H-optimus-0 "expects images of size 224x224 that were extracted at
0.5 microns per pixel" (HF card); H-optimus-1 and H0-mini: TRIDENT README ``--patch_size 224 --mag 20`` and the
Bioptimus SDK's ``TileSpec(224, MPP(0.5))`` for h0-mini. *Virchow2 was trained on mixed magnifications (5×, 10×,
20×, 40×, i.e. 2–0.25 µm/px; Virchow2 paper); 0.5 is the 20× that HEST and TRIDENT feed it. ResNet-50 carries
ImageNet weights with no physical scale (``um_per_px=None``); HEST runs it on 224 px at 0.5 µm/px (112 µm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from torch import nn

from ..base import ImageEncoder
from ..contracts import IMAGENET_MEAN, IMAGENET_STD, ImageContract
from ..errors import HescapeModelError
from ..weights import WeightsSpec
from ..zoo import EncoderEntry, register_encoder

__all__ = ["PathologyViT", "TruncatedResNet", "H_OPTIMUS_MEAN", "H_OPTIMUS_STD", "VIT_LORA_TARGETS", "POOLINGS"]

#: H-optimus-0 normalisation (bioptimus/H-optimus-0 HF card; the same in TRIDENT for H-optimus-1 and in
#: owkin/plism-benchmark ``plismbench/models/bioptimus.py`` for H-optimus-1 and H0-mini).
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: LoRA on the attention projections only. The HESCAPE reference uses ``("qkv", "proj")``; peft matches a target
#: as a module-name suffix after a dot, so ``"proj"`` also catches the patch-embedding conv ``patch_embed.proj``;
#: ``attn.qkv``/``attn.proj`` adapt attention and nothing else.
VIT_LORA_TARGETS = ("attn.qkv", "attn.proj")

#: ``cls``: the CLS token after the final norm; ``cls+mean``: CLS concatenated with the mean of the patch tokens
#: (the tokens after the CLS and register tokens).
POOLINGS = ("cls", "cls+mean")


class PathologyViT(ImageEncoder):
    """A timm ViT (``self.trunk``, classifier removed) with the published pooling.

    Parameters
    ----------
    timm_name
        timm architecture the published weights were made for.
    pooling
        ``"cls"`` (``(B, C)``) or ``"cls+mean"`` (``(B, 2C)``), see :data:`POOLINGS`.
    **timm_kwargs
        Published constructor arguments (``img_size``, ``patch_size``, ``init_values``, ``mlp_layer``,
        ``reg_tokens``, …) and size overrides (``depth``, ``embed_dim``, ``num_heads``) for tiny test versions.

    Raises
    ------
    HescapeModelError
        Unknown pooling, or arguments timm rejects.
    """

    lora_targets = VIT_LORA_TARGETS

    def __init__(self, timm_name: str, *, pooling: str = "cls", **timm_kwargs):
        super().__init__()
        if pooling not in POOLINGS:
            msg = f"image encoder {timm_name}: expected pooling in {POOLINGS}, found {pooling!r}"
            raise HescapeModelError(msg)
        try:
            self.trunk = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
        except (AssertionError, RuntimeError, TypeError, ValueError) as e:
            msg = f"cannot build {timm_name} with {sorted(timm_kwargs)}: {e}"
            raise HescapeModelError(msg) from None
        self.pooling = pooling
        self.out_dim = self.trunk.embed_dim * (2 if pooling == "cls+mean" else 1)
        params = dict(self.trunk.named_parameters())
        self.no_weight_decay_names = tuple(f"trunk.{n}" for n in sorted(self.trunk.no_weight_decay()) if n in params)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens at the front of :meth:`forward_tokens`."""
        return self.trunk.num_prefix_tokens

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised input → ``(B, prefix + (S / patch)², C)`` tokens after the final norm."""
        return self.trunk.forward_features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised input → ``(B, out_dim)`` pooled embedding."""
        tokens = self.forward_tokens(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


class TruncatedResNet(ImageEncoder):
    """HEST's ResNet-50 baseline: torchvision ImageNet ResNet-50 cut after ``layer3``, average-pooled.

    HEST builds ``timm.create_model("resnet50.tv_in1k", features_only=True, out_indices=[3], num_classes=0)`` and
    applies ``AdaptiveAvgPool2d(1)`` (HEST ``ResNet50InferenceEncoder``; ``pretrained_configs/resnet50_trunc.json``;
    the same in TRIDENT): ``layer4`` and ``fc`` are not part of the network, the embedding is 1024-d.

    Parameters
    ----------
    layers
        Bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``; the fourth stage is not built). Tests pass
        ``(1, 1, 1, 1)``.
    """

    def __init__(self, *, layers: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        self.trunk = timm.create_model("resnet50.tv_in1k", pretrained=False, features_only=True, out_indices=(3,),
                                       num_classes=0, layers=tuple(layers))
        self.out_dim = self.trunk.feature_info.channels()[-1]

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)[0]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` → ``(B, (S / 16)², 1024)``: the ``layer3`` map as tokens."""
        return self._feature_map(x).flatten(2).transpose(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` → ``(B, 1024)``: the ``layer3`` map averaged over space."""
        return F.adaptive_avg_pool2d(self._feature_map(x), 1).flatten(1)


# ---- published key layouts -> ours -------------------------------------------------------------------------------

def timm_vit_to_trunk(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published timm ViT checkpoint (un-prefixed keys, no wrapper: each is loaded ``strict=True`` into
    ``timm.create_model(..., num_classes=0)`` by TRIDENT) → ``trunk.``-prefixed keys."""
    return {f"trunk.{k}": v for k, v in state_dict.items()}


_RESNET_UNUSED = ("layer4.", "fc.")


def torchvision_resnet_to_trunk(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision / timm ``resnet50.tv_in1k`` checkpoint → ours: drops ``layer4.*`` and ``fc.*`` (not part of the
    truncated network) and prefixes the rest with ``trunk.``."""
    return {f"trunk.{k}": v for k, v in state_dict.items() if not k.startswith(_RESNET_UNUSED)}


# ---- registry entries --------------------------------------------------------------------------------------------

def _sized(contract: ImageContract, img_size: int) -> ImageContract:
    """``contract`` for an input of ``img_size`` px at the same µm/px (the resize keeps its ratio to the crop)."""
    if img_size == contract.input_size:
        return contract
    resize = None if contract.resize_size is None else round(contract.resize_size * img_size / contract.input_size)
    return dataclasses.replace(contract, input_size=img_size, resize_size=resize)


def _vit_builder(timm_name: str, published: dict, pooling: str, contract: ImageContract):
    # Size options build tiny versions of the same family for tests; another img_size also changes the shape of a
    # fixed pos_embed, so published weights then fail to load with an error naming it.
    def build(*, img_size: int = contract.input_size, depth: int | None = None, embed_dim: int | None = None,
              num_heads: int | None = None, pooling: str = pooling) -> PathologyViT:
        sizes = {k: v for k, v in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads))
                 if v is not None}
        enc = PathologyViT(timm_name, pooling=pooling, **{**published, "img_size": img_size, **sizes})
        enc.contract = _sized(contract, img_size)
        return enc

    build.__name__ = f"build_{timm_name}"
    return build


def _hf(repo: str, files: tuple[str, ...], licence: str) -> WeightsSpec:
    """A gated Hugging Face repository holding an un-prefixed timm ViT checkpoint."""
    return WeightsSpec(files=files, hf_id=repo, licence=licence, gated=True, url=f"https://huggingface.co/{repo}",
                       convert=timm_vit_to_trunk)


def _register_vit(name: str, timm_name: str, published: dict, *, pooling: str, contract: ImageContract,
                  weights: WeightsSpec, out_dim: int, params: int, description: str) -> None:
    build = _vit_builder(timm_name, published, pooling, contract)
    register_encoder(EncoderEntry(name=name, modality="image", builder=build, contract=contract, out_dim=out_dim,
                                  pooling=pooling, weights=weights, lora_targets=VIT_LORA_TARGETS, params=params,
                                  description=description))


_IMAGENET_224 = ImageContract(input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              um_per_px=0.5)
# The H-optimus cards feed 224 px tiles with ToTensor + Normalize only; other sizes are resized as TRIDENT does
# (transforms.Resize(224), bilinear).
_H_OPTIMUS_224 = ImageContract(input_size=224, interpolation="bilinear", mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD,
                               um_per_px=0.5)
_UNI_CC = "CC-BY-NC-ND-4.0 (non-commercial academic research; MahmoodLab terms of use)"
_BIOPTIMUS_RESEARCH = "Bioptimus terms on the gated card (academic, non-commercial research use)"

# UNI: UNI README_old.md L69 / TRIDENT UNIInferenceEncoder; Resize(224) + CenterCrop(224) + ImageNet statistics.
_register_vit("uni", "vit_large_patch16_224",
              dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
              pooling="cls", contract=_IMAGENET_224, out_dim=1024, params=303_350_784,
              weights=_hf("MahmoodLab/UNI", ("pytorch_model.bin",), _UNI_CC),
              description="UNI v1 (ViT-L/16, DINOv2 on Mass-100K), CLS 1024-d; 224 px at 0.5 µm/px")

# UNI2-h: UNI README.md L362-418 / TRIDENT UNIv2InferenceEncoder; same transform as UNI.
_register_vit("uni2_h", "vit_giant_patch14_224",
              dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                   mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
                   reg_tokens=8, dynamic_img_size=True),
              pooling="cls", contract=_IMAGENET_224, out_dim=1536, params=681_394_176,
              weights=_hf("MahmoodLab/UNI2-h", ("pytorch_model.bin",), _UNI_CC),
              description="UNI2-h (ViT-h/14-reg8: 24 blocks, 1536, SwiGLU), CLS 1536-d; 224 px at 0.5 µm/px")

# Prov-GigaPath tile encoder: TRIDENT GigaPathInferenceEncoder local build (the timm entry point adds
# init_values=1e-5, SwiGLUPacked and SiLU); prov-gigapath demo/3_load_tile_encoder.py: Resize(256, bicubic) +
# CenterCrop(224) + ImageNet statistics.
_register_vit("gigapath", "vit_giant_patch14_dinov2",
              dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                   mlp_ratio=5.33334),
              pooling="cls", out_dim=1536, params=1_134_953_984,
              contract=ImageContract(input_size=224, resize_size=256, interpolation="bicubic", mean=IMAGENET_MEAN,
                                     std=IMAGENET_STD, um_per_px=0.5),
              weights=_hf("prov-gigapath/prov-gigapath", ("pytorch_model.bin",),
                          "Apache-2.0 (prov-gigapath 09d8e87; research use only per its README)"),
              description="Prov-GigaPath tile encoder (ViT-g/16, SwiGLU), CLS 1536-d; 256 px at 0.5 µm/px, crop 224")

# H-optimus-0: bioptimus/releases models/h-optimus/v0/README.md (g/14, 4 registers, 40 blocks, 24 heads, 1536);
# HF card: init_values=1e-5, dynamic_img_size=False, 224 px at 0.5 µm/px; TRIDENT: global_pool="token".
_H_OPTIMUS_KWARGS = dict(img_size=224, init_values=1e-5, global_pool="token", dynamic_img_size=False)
_register_vit("h_optimus_0", "vit_giant_patch14_reg4_dinov2", _H_OPTIMUS_KWARGS,
              pooling="cls", contract=_H_OPTIMUS_224, out_dim=1536, params=1_134_774_272,
              weights=_hf("bioptimus/H-optimus-0", ("pytorch_model.bin",), "Apache-2.0"),
              description="H-optimus-0 (ViT-g/14, 4 registers, SwiGLU), CLS 1536-d; 224 px at 0.5 µm/px")

# H-optimus-1: bioptimus/releases holds H-optimus-0 only. TRIDENT HOptimus1InferenceEncoder loads the local
# pytorch_model.bin strict=True into the H-optimus-0 architecture and kwargs and normalises with the H-optimus-0
# statistics; owkin/plism-benchmark HOptimus1 does the same (1536-d). So the parameter count is H-optimus-0's.
_register_vit("h_optimus_1", "vit_giant_patch14_reg4_dinov2", _H_OPTIMUS_KWARGS,
              pooling="cls", contract=_H_OPTIMUS_224, out_dim=1536, params=1_134_774_272,
              weights=_hf("bioptimus/H-optimus-1", ("pytorch_model.bin",), _BIOPTIMUS_RESEARCH),
              description="H-optimus-1 (H-optimus-0 architecture, ~1M slides), CLS 1536-d; 224 px at 0.5 µm/px")

# H0-mini: owkin/plism-benchmark (commit 18a7797, plismbench/models/bioptimus.py) builds it as
# vit_base_patch14_reg4_dinov2 (768, 12 blocks, 12 heads, 4 registers), img_size 224, init_values 1e-5, SwiGLU
# with DINOv2 hidden rounding (mlp_ratio 4 -> 2048 hidden), i.e. timm SwiGLUPacked at mlp_ratio 2.66667*2 (fc1
# 768->4096, fc2 2048->768). The 343,027,735-byte fp32 checkpoint it shipped fits 85,739,520 parameters (the
# mlp_ratio-4 SwiGLUPacked reading of the facts sheet, 71.6M, would be 286 MB); the paper says 86M.
# Pooling: HEST bench and TRIDENT default to CLS (768-d); "cls+mean" (1536-d) is the Bioptimus usage snippet and the
# output_type "cls+patch_mean" of the h0-mini example in the Bioptimus SDK docs (docs.bioptimus.com).
_register_vit("h0_mini", "vit_base_patch14_reg4_dinov2",
              dict(img_size=224, patch_size=14, init_values=1e-5, mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked,
                   act_layer=nn.SiLU, dynamic_img_size=False),
              pooling="cls", contract=_H_OPTIMUS_224, out_dim=768, params=85_739_520,
              weights=_hf("bioptimus/H0-mini", ("pytorch_model.bin", "model.safetensors"), _BIOPTIMUS_RESEARCH),
              description="H0-mini (ViT-B/14 distilled from H-optimus-0, 4 registers), CLS 768-d or cls+mean "
                          "1536-d; 224 px at 0.5 µm/px")

# Virchow2: TRIDENT Virchow2InferenceEncoder (and HEST): tokens (B, 261, 1280), embedding = CLS ++ mean(tokens[:,
# 5:]); transform Resize(224, bicubic) + ImageNet statistics, no crop.
_register_vit("virchow2", "vit_huge_patch14_224",
              dict(img_size=224, init_values=1e-5, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
                   dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
              pooling="cls+mean", out_dim=2560, params=631_239_424,
              contract=ImageContract(input_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                     um_per_px=0.5),
              weights=_hf("paige-ai/Virchow2", ("model.safetensors", "pytorch_model.bin"),
                          "CC-BY-NC-ND-4.0 (Paige terms of use)"),
              description="Virchow2 (ViT-H/14, 4 registers, SwiGLU), CLS+mean 2560-d; 224 px (mixed-magnification "
                          "training, 0.5 µm/px as in HEST)")


# HEST feeds 224 px at 0.5 µm/px with ToTensor + Normalize (ImageNet); TRIDENT resizes to 224 (bilinear) and
# centre-crops. ImageNet weights carry no physical scale, hence um_per_px=None. No LoRA targets: the adapters here
# go on ViT attention; the CNN baseline is trained fully or kept frozen.
register_encoder(EncoderEntry(
    name="resnet50", modality="image", builder=TruncatedResNet,
    contract=ImageContract(input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    out_dim=1024, pooling="avg", lora_targets=(), params=8_543_296,
    weights=WeightsSpec(files=("model.safetensors", "pytorch_model.bin", "resnet50-0676ba61.pth"),
                        hf_id="timm/resnet50.tv_in1k", licence="BSD-3-Clause (torchvision weights)", gated=False,
                        url="https://huggingface.co/timm/resnet50.tv_in1k", convert=torchvision_resnet_to_trunk,
                        ignore=(r"\.num_batches_tracked$",)),
    description="ResNet-50 ImageNet (torchvision) truncated after layer3 + average pool, 1024-d (HEST baseline)"))
