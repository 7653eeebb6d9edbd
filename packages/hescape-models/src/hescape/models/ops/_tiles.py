"""Triton pieces shared by the fused-loss kernels: the guarded import, launch settings and the tiled dot product."""

from __future__ import annotations

import torch

from ..errors import HescapeModelError

__all__ = ["BLOCK_M", "BLOCK_N", "kernel_settings", "require_triton", "tile_dot", "tl", "triton"]

try:  # guarded: the package must import on machines where Triton is missing or broken
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

BLOCK_M = 64
BLOCK_N = 64


def require_triton() -> None:
    if triton is None:
        msg = ("expected an importable triton for the fused loss kernels, found none; install triton (Linux) or "
               "use impl='torch'")
        raise HescapeModelError(msg)


def kernel_settings(v: torch.Tensor) -> dict:
    """``BLOCK_K`` for the feature width and the dot precision: exact fp32 for fp32 inputs, TF32 for 16-bit
    inputs (their values are exact in TF32)."""
    block_k = max(16, min(64, triton.next_power_of_2(v.shape[1])))
    return {"BLOCK_K": block_k, "PRECISION": "ieee" if v.dtype == torch.float32 else "tf32"}


if triton is not None:

    @triton.jit
    def tile_dot(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``<a_rows, b_cols>`` of one (BLOCK_M, BLOCK_N) tile, fp32 accumulation over D in BLOCK_K steps."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            kmask = ks < D
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        return acc
else:  # pragma: no cover
    tile_dot = None
