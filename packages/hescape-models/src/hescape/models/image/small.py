"""Small randomly initialised image encoders: the CPU demo and tests (no published weights)."""

from __future__ import annotations

import timm
import torch

from ..base import ImageEncoder
from ..contracts import ImageContract
from ..errors import HescapeModelError
from ..weights import WeightsSpec
from ..zoo import EncoderEntry, register_encoder

#: These encoders have no published weights, but take weights trained here (e.g. the image tower of an earlier run,
#: ``hescape.train.batch_benchmark.export_tower``): a safetensors/torch file of the encoder module's own state dict
#: (keys ``backbone.…``). They still default to training from scratch (``pretrained=False``).
OWN_WEIGHTS = WeightsSpec(files=("model.safetensors", "pytorch_model.bin"), licence="yours",
                          url="an earlier run of your own (its image tower's state dict)")

__all__ = ["TimmImageEncoder"]


class TimmImageEncoder(ImageEncoder):
    """A timm architecture built from scratch (classifier removed): ``(B, 3, S, S)`` → ``(B, num_features)``.

    Parameters
    ----------
    timm_name
        timm architecture (``vit_small_patch16_224``, ``resnet18``, …).
    image_size
        Input side in pixels; the contract resizes patches to it.
    **kwargs
        Further timm constructor arguments (``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` for ViTs).
    """

    def __init__(self, timm_name: str, image_size: int, **kwargs):
        super().__init__()
        vit = timm_name.startswith("vit")
        try:
            self.backbone = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                              **({"img_size": image_size} if vit else {}), **kwargs)
        except (RuntimeError, TypeError) as e:
            msg = f"cannot build image encoder {timm_name!r}: {e}. List choices with timm.list_models('vit*')"
            raise HescapeModelError(msg) from None
        self.out_dim = self.backbone.num_features
        self.contract = ImageContract(input_size=image_size)
        self.lora_targets = ("attn.qkv", "attn.proj") if vit else ()  # attention only, not patch_embed.proj

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` tokens after the final norm (ViTs; CNNs give their flattened feature map)."""
        t = self.backbone.forward_features(x)
        return t.flatten(2).transpose(1, 2) if t.ndim == 4 else t


def _vit(name, timm_name, size, patch, width, depth, heads, description):
    def build(image_size: int = size, patch_size: int = patch, width: int = width, depth: int = depth,
              heads: int = heads) -> TimmImageEncoder:
        return TimmImageEncoder(timm_name, image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                num_heads=heads)

    register_encoder(EncoderEntry(name=name, modality="image", builder=build, contract=ImageContract(input_size=size),
                                  out_dim=width, pooling="cls", lora_targets=("attn.qkv", "attn.proj"),
                                  description=description, weights=OWN_WEIGHTS, pretrained=False))


_vit("vit_nano", "vit_small_patch16_224", 64, 8, 128, 4, 4,
     "4-block ViT, width 128, 64 px input, patch 8 (random init; the CPU demo)")
_vit("vit_tiny", "vit_tiny_patch16_224", 224, 16, 192, 12, 3, "ViT-Ti/16 at 224 px (random init)")
_vit("vit_small", "vit_small_patch16_224", 224, 16, 384, 12, 6, "ViT-S/16 at 224 px (random init)")


def _cnn_tiny(image_size: int = 64) -> TimmImageEncoder:
    enc = TimmImageEncoder("resnet10t", image_size)
    enc.contract = ImageContract(input_size=image_size)
    return enc


register_encoder(EncoderEntry(name="cnn_tiny", modality="image", builder=_cnn_tiny,
                              contract=ImageContract(input_size=64), out_dim=512, pooling="avg",
                              description="timm resnet10t (random init; a small CNN for tests)", weights=OWN_WEIGHTS,
                              pretrained=False))
