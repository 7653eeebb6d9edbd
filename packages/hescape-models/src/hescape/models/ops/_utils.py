"""Helpers shared by the fused-loss kernels and their torch reference; no Triton import here."""

from __future__ import annotations

import os

import torch

from ..errors import HescapeModelError

__all__ = ["SUPPORTED_DTYPES", "check_pair", "check_scalar", "triton_interpret_enabled", "triton_usable"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_pair(v: torch.Tensor, g: torch.Tensor, *, square: bool = False, diag_offset: int = 0) -> None:
    """Validate two feature matrices ``v`` (M×d) and ``g`` (N×d) whose positive pairs are ``(i, i + diag_offset)``."""
    for name, t in (("image features", v), ("gene features", g)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            msg = f"{name}: expected a 2-D tensor (batch, dim), found {shape}; flatten or stack the embeddings"
            raise HescapeModelError(msg)
        if t.dtype not in SUPPORTED_DTYPES:
            msg = f"{name}: expected dtype float32, bfloat16 or float16, found {t.dtype}; cast with .float()"
            raise HescapeModelError(msg)
        if t.shape[0] == 0 or t.shape[1] == 0:
            msg = f"{name}: expected a non-empty batch and dim, found shape {tuple(t.shape)}; skip empty batches"
            raise HescapeModelError(msg)
    if v.shape[1] != g.shape[1]:
        msg = (f"expected image and gene features of the same dim, found {v.shape[1]} and {g.shape[1]}; "
               "project both towers to the same embed_dim")
        raise HescapeModelError(msg)
    if v.dtype != g.dtype or v.device != g.device:
        msg = (f"expected image and gene features with one dtype and device, found {v.dtype}/{v.device} and "
               f"{g.dtype}/{g.device}; cast one of them with .to(other)")
        raise HescapeModelError(msg)
    m, n = v.shape[0], g.shape[0]
    if square and (m != n or diag_offset != 0):
        msg = (f"a symmetric (image→gene and gene→image) loss expects a square logit matrix with positives on the "
               f"main diagonal, found {m}×{n} with diagonal offset {diag_offset}; use local_loss for rectangular")
        raise HescapeModelError(msg)
    if diag_offset < 0 or diag_offset + m > n:
        msg = (f"expected every image row to have its positive gene column, i.e. 0 <= offset and offset + {m} <= {n}, "
               f"found offset {diag_offset}; check rank/world_size and that every rank has the same batch size")
        raise HescapeModelError(msg)


def check_scalar(t: torch.Tensor | None, name: str, like: torch.Tensor) -> None:
    """Validate a one-element parameter (``logit_scale``/``logit_bias``) living on the features' device."""
    if t is None:
        msg = f"expected a {name} tensor, found None; build the model with loss='siglip' to get a logit_bias"
        raise HescapeModelError(msg)
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        msg = f"{name}: expected a one-element tensor, found {found}; pass e.g. torch.tensor(10.0)"
        raise HescapeModelError(msg)
    if t.device != like.device:
        msg = f"{name}: expected it on {like.device} like the features, found {t.device}; move it with .to()"
        raise HescapeModelError(msg)
    if not t.is_floating_point():
        msg = f"{name}: expected a floating-point tensor, found {t.dtype}; cast with .float()"
        raise HescapeModelError(msg)


def triton_interpret_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through Triton's numpy interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` (CUDA with Triton, or CPU under the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and triton_interpret_enabled()
