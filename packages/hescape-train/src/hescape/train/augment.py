"""Training-patch augmentation: flips, 90° rotations and stain jitter in optical density, drawn from their own
random generator (never the global one, never the DataLoader's), so that results do not depend on
``data.num_workers`` and a resumed run continues the same random sequence."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["augment", "HED_TO_OD"]

# Haematoxylin, eosin and residual optical-density vectors (rows; Ruifrok & Johnston, Anal Quant Cytol Histol
# 2001), the residual orthogonal to both: OD (RGB) = concentrations @ HED_TO_OD. Computed in NumPy so that
# importing this module runs no torch operation (safe to fork afterwards).
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_R = np.cross(_H, _E)
HED_TO_OD = np.stack([_H / np.linalg.norm(_H), _E / np.linalg.norm(_E), _R / np.linalg.norm(_R)])
_OD_TO_HED = np.linalg.inv(HED_TO_OD)


def augment(images: torch.Tensor, gen: torch.Generator, stain_jitter: float = 0.0,
            hed_jitter: float = 0.0) -> torch.Tensor:
    """Random flip and 90° rotation per patch (H&E has no preferred orientation), and optionally stain
    augmentation in optical density (OD = -ln I):

    * ``hed_jitter``: colour deconvolution of each patch into haematoxylin and eosin amounts (Ruifrok & Johnston
      vectors), each scaled by ``exp(hed_jitter · N(0, 1))`` per patch, then recomposed (HED augmentation,
      Tellez et al., IEEE TMI 2018);
    * ``stain_jitter``: each patch's per-channel OD scaled by ``1 + stain_jitter · N(0, 1)`` (clamped at 0.5).

    Parameters
    ----------
    images
        ``(B, 3, H, W)`` uint8, or float in [0, 1].
    gen
        The augmentation generator (CPU); every random number is drawn from it, in a fixed order.

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)``: float in [0, 1] when a stain augmentation is on, else the input dtype.
    """
    if stain_jitter > 0 or hed_jitter > 0:
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        od = -torch.log(x.clamp_min(1.0 / 255.0))
        if hed_jitter > 0:
            to_hed = torch.from_numpy(_OD_TO_HED).float()
            to_od = torch.from_numpy(HED_TO_OD).float()
            amount = torch.exp(hed_jitter * torch.randn(len(x), 3, 1, 1, generator=gen))
            amount[:, 2] = 1.0  # the residual channel keeps its amount
            conc = torch.einsum("bchw,cs->bshw", od, to_hed) * amount
            od = torch.einsum("bshw,sc->bchw", conc, to_od).clamp_min(0.0)
        if stain_jitter > 0:
            scale = 1.0 + stain_jitter * torch.randn(len(x), 3, 1, 1, generator=gen)
            od = od * scale.clamp_min(0.5)
        images = torch.exp(-od)
    flip = torch.rand(len(images), generator=gen) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    k = torch.randint(0, 4, (len(images),), generator=gen)
    out = images.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(images[sel], r, dims=(-2, -1))
    return out
