"""Input contracts: what an encoder expects to be fed, owned by the encoder and recorded in checkpoints.

A HESCAPE dataset delivers physical data only: RGB ``uint8`` patches at the dataset's µm/px and raw counts
per pseudo-spot. Every encoder turns those into its own input with its contract, inside ``preprocess``, so a
model can never be fed inputs prepared for another (the role timm's ``pretrained_cfg`` and open_clip's
``preprocess_cfg`` play for their models).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import HescapeModelError

__all__ = ["ImageContract", "GeneContract", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_MEAN", "OPENAI_STD",
           "GENE_PREPROCESSING", "contract_from_dict"]

#: ImageNet statistics (torchvision / timm ``IMAGENET_DEFAULT_MEAN``/``STD``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP statistics (open_clip ``OPENAI_DATASET_MEAN``/``STD``), used by CONCH.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ImageContract:
    """How an image encoder wants its patches.

    Parameters
    ----------
    input_size
        Side in pixels of the square tensor the network sees.
    resize_size
        Side the patch is resized to before a centre crop of ``input_size`` (timm's ``crop_pct`` =
        input_size / resize_size); ``None`` resizes straight to ``input_size``.
    interpolation
        ``"bilinear"`` or ``"bicubic"`` (antialiased when downsampling).
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB values.
    um_per_px
        Resolution the encoder was trained at (µm per pixel of its input), or ``None`` when it has none
        (random init). Used to warn when a dataset's patches reach the network at another scale.
    """

    input_size: int
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    um_per_px: float | None = None
    kind: str = field(default="image", init=False)

    def __post_init__(self):
        if self.input_size <= 0 or (self.resize_size is not None and self.resize_size < self.input_size):
            msg = (f"image contract: expected input_size > 0 and resize_size >= input_size, found "
                   f"input_size={self.input_size}, resize_size={self.resize_size}")
            raise HescapeModelError(msg)
        if self.interpolation not in _INTERPOLATIONS:
            msg = f"image contract: interpolation must be one of {_INTERPOLATIONS}, found {self.interpolation!r}"
            raise HescapeModelError(msg)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` patches (``uint8`` 0–255, or float in [0, 1]) → ``(B, 3, S, S)`` float32 network input."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"expected images of shape (B, 3, H, W), found {tuple(images.shape)}"
            raise HescapeModelError(msg)
        if images.dtype == torch.uint8:
            x = images.float().div_(255.0)
        else:
            x = images.float()
            lo, hi = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
            if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
                msg = (f"expected raw RGB patches (uint8 0–255, or float in [0, 1]), found float values in "
                       f"[{lo:.3g}, {hi:.3g}]; pass the dataset's uint8 patches: each encoder normalises its own input")
                raise HescapeModelError(msg)
        first = self.resize_size or self.input_size
        if x.shape[-2:] != (first, first):
            x = F.interpolate(x, size=(first, first), mode=self.interpolation, antialias=True, align_corners=False)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)
        if first != self.input_size:
            o = (first - self.input_size) // 2
            x = x[..., o:o + self.input_size, o:o + self.input_size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def effective_um_per_px(self, patch_um_per_px: float, patch_px: int) -> float:
        """µm per pixel at which a ``patch_px`` patch at ``patch_um_per_px`` reaches the network."""
        return patch_um_per_px * patch_px / (self.resize_size or self.input_size)

    def scale_warning(self, patch_um_per_px: float | None, patch_px: int, tolerance: float = 0.25) -> str | None:
        """A sentence when the effective scale differs from ``um_per_px`` by more than ``tolerance`` (else None)."""
        if self.um_per_px is None or not patch_um_per_px:
            return None
        eff = self.effective_um_per_px(patch_um_per_px, patch_px)
        if abs(math.log(eff / self.um_per_px)) <= math.log1p(tolerance):
            return None
        return (f"patches of {patch_px} px at {patch_um_per_px:g} µm/px reach the encoder at {eff:.3g} µm/px, but it "
                f"was trained at {self.um_per_px:g} µm/px; rebuild the dataset with patches of "
                f"{self.um_per_px * (self.resize_size or self.input_size):.0f} µm for this encoder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Gene preprocessing names, each a function of raw counts defined in the module of the encoder that uses it;
#: the three generic ones are implemented here.
GENE_PREPROCESSING = ("raw", "log1p", "normalize_total_log1p", "nicheformer_tokens", "scfoundation_values")


@dataclass(frozen=True)
class GeneContract:
    """How a gene encoder wants its expression: computed from raw counts ``(B, G)`` of the model's panel.

    Parameters
    ----------
    preprocessing
        ``raw`` (counts as float), ``log1p`` (``log(1 + x)``; the MLP and DRVI), ``normalize_total_log1p``
        (each row scaled to ``target_sum`` then ``log1p``), ``nicheformer_tokens`` (rank tokens) or
        ``scfoundation_values`` (log-normalised values with T and S tokens).
    target_sum
        Row total after library-size normalisation (``normalize_total_log1p``, Nicheformer, scFoundation).
    vocabulary
        What the encoder's input genes are: ``"panel"`` (the dataset's own genes, in order) or the name and size
        of a pretrained vocabulary the panel is mapped into (e.g. ``"nicheformer-20310"``).
    options
        Further preprocessing settings of the encoder (context tokens, technology, context length, …).
    """

    preprocessing: str = "log1p"
    target_sum: float = 1e4
    vocabulary: str = "panel"
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="gene", init=False)

    def __post_init__(self):
        if self.preprocessing not in GENE_PREPROCESSING:
            msg = f"gene contract: preprocessing must be one of {GENE_PREPROCESSING}, found {self.preprocessing!r}"
            raise HescapeModelError(msg)
        if not self.target_sum > 0:
            msg = f"gene contract: target_sum must be > 0, found {self.target_sum}"
            raise HescapeModelError(msg)

    def apply_generic(self, counts: torch.Tensor) -> torch.Tensor:
        """The generic preprocessings (``raw``, ``log1p``, ``normalize_total_log1p``) of ``(B, G)`` counts."""
        x = counts.float()
        if self.preprocessing == "raw":
            return x
        if self.preprocessing == "log1p":
            return torch.log1p(x)
        if self.preprocessing == "normalize_total_log1p":
            total = x.sum(dim=-1, keepdim=True)
            return torch.log1p(torch.where(total > 0, x / total.clamp_min(1e-12) * self.target_sum, x))
        msg = f"preprocessing {self.preprocessing!r} is specific to its encoder; call the encoder's preprocess"
        raise HescapeModelError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __hash__(self):  # options is a dict: hash its sorted repr
        return hash((self.preprocessing, self.target_sum, self.vocabulary, repr(sorted(self.options.items()))))


def contract_from_dict(d: dict[str, Any]) -> ImageContract | GeneContract:
    """Rebuild a contract written by ``to_dict`` (checkpoints, run configs)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind == "image":
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return ImageContract(**d)
    if kind == "gene":
        return GeneContract(**d)
    msg = f"expected a contract dict with kind 'image' or 'gene', found kind={kind!r}"
    raise HescapeModelError(msg)
