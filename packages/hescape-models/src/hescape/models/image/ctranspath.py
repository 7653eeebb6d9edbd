"""CTransPath: a Swin-T whose patch embedding is a small convolutional stem (registry name ``ctranspath``).

Paper: X. Wang et al., "Transformer-based unsupervised contrastive learning for histopathological image
classification", Medical Image Analysis 81, 102559 (2022), https://doi.org/10.1016/j.media.2022.102559.
Code and weights: https://github.com/Xiyue-Wang/TransPath (GPL-3.0; ``ctran.py``, ``get_features_CTransPath.py``;
the README links ``ctranspath.pth`` on Google Drive). CHIEF's copy, ``CHIEF_CTransPath.pth``, is what TRIDENT
downloads (HF dataset ``MahmoodLab/hest-bench``, ``fm_v1/ctranspath``, gated).

The authors built the model with a modified timm 0.5.4: ``create_model('swin_tiny_patch4_window7_224',
embed_layer=ConvStem)``, then ``model.head = nn.Identity()``. Here it is timm's current
:class:`~timm.models.swin_transformer.SwinTransformer` (which takes an ``embed_layer`` and calls it with
``output_fmt='NHWC'``) with :class:`ConvStem` as that layer. The feature is the average of the tokens after the
final LayerNorm, 768-d. :func:`convert_ctranspath` maps the published timm 0.5.4 key layout onto it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from ..base import ImageEncoder
from ..contracts import IMAGENET_MEAN, IMAGENET_STD, ImageContract
from ..errors import HescapeModelError
from ..weights import WeightsSpec
from ..zoo import EncoderEntry, register_encoder

__all__ = ["ConvStem", "CTransPathEncoder", "convert_ctranspath", "CTRANSPATH_PARAMS"]

#: Parameters of the full-size model without a classifier (facts sheet ``encoders.md``, computed on the meta device:
#: timm's Swin-T with its 4×4 PatchEmbed has 27,519,354; the stem has 5,580 instead of 4,896).
CTRANSPATH_PARAMS = 27_520_038

#: 224-px patches, resized (bilinear: torchvision ``Resize`` default in ``get_features_CTransPath.py``; TRIDENT too),
#: ImageNet mean/std. µm/px: the TransPath README (L45 at 26c6194) recommends "first try to extract features at
#: 1.0mpp"; TRIDENT's recommended setting (256-px tiles at 10×, README) lands near it. The paper's pretraining
#: magnification could not be checked here (full text not reachable).
_CONTRACT = ImageContract(input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          um_per_px=1.0)


class ConvStem(nn.Module):
    """TransPath's convolutional patch embedding (``ctran.py`` ``ConvStem``): ``(B, 3, H, W)`` → ``(B, H/4, W/4, C)``.

    ``proj`` is ``Conv3×3/2 (3→C/8, no bias) · BatchNorm · ReLU · Conv3×3/2 (C/8→C/4, no bias) · BatchNorm · ReLU ·
    Conv1×1 (C/4→C, bias)``, so its parameters sit at indices 0, 1, 3, 4 and 6 as in the published weights; ``norm``
    is a LayerNorm over channels. Tokens come out channels-last (NHWC), the layout timm's Swin stages take.

    The constructor takes the keyword arguments timm's ``SwinTransformer`` passes to its ``embed_layer``.

    Raises
    ------
    HescapeModelError
        ``patch_size`` other than 4 or ``embed_dim`` not divisible by 8 (the stem's fixed geometry); at run time, an
        input whose side differs from ``img_size`` (the Swin stages' attention masks are built for one size).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: type[nn.Module] | None = None, strict_img_size: bool = True,
                 output_fmt: str = "NHWC", device=None, dtype=None):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch_size != (4, 4) or embed_dim % 8 or output_fmt != "NHWC":
            msg = (f"ConvStem: expected patch_size 4, embed_dim divisible by 8 and output_fmt 'NHWC' (two stride-2 "
                   f"convolutions, widths C/8 and C/4), found patch_size {patch_size}, embed_dim {embed_dim}, "
                   f"output_fmt {output_fmt!r}")
            raise HescapeModelError(msg)
        dd = {"device": device, "dtype": dtype}
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (-(-img_size[0] // 4), -(-img_size[1] // 4))  # two stride-2, pad-1 convs: ceil(ceil(s/2)/2)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        c1, c2 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c1, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(c1, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(c2, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, embed_dim, kernel_size=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            msg = (f"CTransPath expects {self.img_size[0]}×{self.img_size[1]} input, found "
                   f"{x.shape[-2]}×{x.shape[-1]}; feed patches through the encoder's contract (preprocess)")
            raise HescapeModelError(msg)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class CTransPathEncoder(ImageEncoder):
    """CTransPath: ``(B, 3, S, S)`` normalised input → ``(B, 8 × embed_dim)``, the mean of the final-norm tokens.

    Parameters
    ----------
    image_size
        Input side in pixels (224 for the published weights; divisible by 32 so every stage halves evenly).
    embed_dim, depths, num_heads, window_size
        Swin settings; the defaults are Swin-T's (96; 2, 2, 6, 2; 3, 6, 12, 24; 7), the published architecture.
        Smaller values build tiny versions of the same architecture for tests.
    drop_path_rate
        Stochastic depth during training; 0.1 is the default of timm's Swin (0.5.4 and now), which TransPath and
        the HESCAPE reference code keep. No effect in eval mode.

    The timm model is ``trunk``: its state dict is the published one after :func:`convert_ctranspath`.
    """

    def __init__(self, image_size: int = 224, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, drop_path_rate: float = 0.1):
        super().__init__()
        if image_size <= 0 or image_size % (4 * 2 ** (len(depths) - 1)):
            msg = (f"ctranspath: expected image_size divisible by {4 * 2 ** (len(depths) - 1)} (patch 4, then "
                   f"{len(depths) - 1} halvings), found {image_size}")
            raise HescapeModelError(msg)
        self.trunk = SwinTransformer(img_size=image_size, patch_size=4, embed_dim=embed_dim, depths=tuple(depths),
                                     num_heads=tuple(num_heads), window_size=window_size, num_classes=0,
                                     global_pool="avg", drop_path_rate=drop_path_rate, embed_layer=ConvStem,
                                     norm_layer=nn.LayerNorm)
        self.out_dim = self.trunk.num_features
        self.contract = dataclasses.replace(_CONTRACT, input_size=image_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.forward_features(x), pre_logits=True)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, (S/32)², out_dim)`` tokens of the last stage after the final LayerNorm."""
        return self.trunk.forward_features(x).flatten(1, 2)


_OLD_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BUFFERS = (".attn_mask", ".relative_position_index")  # timm 0.5.4 saved them; timm now recomputes them
_HEAD = ("head.weight", "head.bias")  # timm 0.5.4's ImageNet classifier


def convert_ctranspath(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published CTransPath weights → :class:`CTransPathEncoder` keys.

    The published files (``ctranspath.pth`` and ``CHIEF_CTransPath.pth``) are a dict whose ``'model'`` entry is
    the state dict of a timm 0.5.4 Swin: both authors load it ``strict=True`` into that model after replacing the
    head by ``nn.Identity()`` (TransPath ``get_features_CTransPath.py``; CHIEF ``Get_CHIEF_patch_feature.py``), so it
    holds no ``head.*``, and TRIDENT, loading CHIEF's file after dropping ``attn_mask``, asserts the only missing keys
    are those masks. This function

    * unwraps ``'model'`` (a state dict given without the wrapper is taken as is);
    * drops the buffers timm now recomputes: every ``*.attn_mask`` and ``*.relative_position_index``;
    * drops ``head.weight``/``head.bias`` should a re-saved file carry timm 0.5.4's 1000-class classifier;
    * moves the patch merging from the end of stage *i* (``layers.i.downsample``, timm 0.5.4) to the start of
      stage *i + 1* (timm ≥ 0.9), as timm's ``swin_transformer.checkpoint_filter_fn`` does — only when the file is
      in the old layout (it has ``layers.0.downsample``); the merge's 2×2 concatenation order is the same in both;
    * prefixes ``trunk.``.

    Any other key is kept, so a foreign file fails loading with its keys named.
    """
    sd = state_dict["model"] if isinstance(state_dict.get("model"), Mapping) else state_dict
    old_layout = any(k.startswith("layers.0.downsample.") for k in sd)
    out = {}
    for k, v in sd.items():
        if k.endswith(_BUFFERS) or k in _HEAD:
            continue
        if old_layout:
            k = _OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        out[f"trunk.{k}"] = v
    return out


def _build(image_size: int = 224, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
           num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7,
           drop_path_rate: float = 0.1) -> CTransPathEncoder:
    return CTransPathEncoder(image_size=image_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                             window_size=window_size, drop_path_rate=drop_path_rate)


register_encoder(EncoderEntry(
    name="ctranspath", modality="image", builder=_build, contract=_CONTRACT, out_dim=768, pooling="mean",
    weights=WeightsSpec(
        files=("ctranspath.pth", "CHIEF_CTransPath.pth"), hf_id=None, licence="GPL-3.0 (TransPath repository)",
        gated=False, convert=convert_ctranspath,
        url=("https://github.com/Xiyue-Wang/TransPath (README: Google Drive link), or CHIEF_CTransPath.pth from "
             "https://huggingface.co/datasets/MahmoodLab/hest-bench/tree/main/fm_v1/ctranspath (gated)")),
    lora_targets=("qkv", "attn.proj"), params=CTRANSPATH_PARAMS,
    description="CTransPath: Swin-T + conv stem, mean of final-norm tokens, 768-d, 224 px (TransPath, MedIA 2022)"))
