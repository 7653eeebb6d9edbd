"""Fused tiled SigLIP loss in Triton: the logit matrix is never written to memory.

Derivation (the same algorithm as ``hescape.models.losses._tiled``; the tests compare both with :mod:`hescape.models.losses.naive`)
-----------------------------------------------------------------------------------------------------
Features ``v`` (M×d), ``g`` (N×d), exponentiated scale ``s``, bias ``b``, logits ``z_ij = s·<v_i, g_j> + b``,
labels ``y_ij = +1`` at the positives ``(i, i + o)`` (``δ_ij``) and −1 elsewhere. Since −log σ(x) = softplus(−x),

    L = (1/M) Σ_ij softplus(−y_ij z_ij)                       (open_clip's SigLipLoss: o = 0, M = B)
    G_ij = ∂L/∂z_ij = (σ(z_ij) − δ_ij) / M                    (−σ(−z) on the positives: no cancellation)
    ∂L/∂v = s·G g,   ∂L/∂g = s·Gᵀ v,   ∂L/∂s = Σ_i <v_i, (G g)_i>,   ∂L/∂b = Σ_ij G_ij.

``softplus(x) = max(x, 0) + log(1 + exp(−|x|))``, with ``exp(x)`` for x < −15 where the log would round to 0.
Forward: ``_siglip_loss_fwd_kernel`` writes one partial sum per row. Backward: ``_siglip_loss_grad_kernel``
recomputes each logit tile and accumulates ``G·B`` for a block of rows of ``A`` plus per-row sums of G (for ∂b);
on (v, g) it yields ``G g``, on (g, v) with offset ``−o`` it yields ``Gᵀ v``. fp32 accumulation, int64 offsets;
fp32 inputs use IEEE dots, 16-bit inputs are upcast and use TF32 dots (their values are exact in TF32).
"""

from __future__ import annotations

import torch

from ._tiles import BLOCK_M, BLOCK_N, kernel_settings, require_triton, tile_dot, tl, triton
from ._utils import check_pair, check_scalar

__all__ = ["SigLipLossFunction", "siglip_loss_backward", "siglip_loss_forward", "siglip_loss_triton"]


if triton is not None:

    @triton.jit
    def _siglip_logits(a_ptr, b_ptr, rows, cols, rmask, cmask, s, bias, D, stride_a, stride_b,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
        acc = tile_dot(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                       PRECISION)
        return acc * s + bias

    @triton.jit
    def _siglip_loss_fwd_kernel(a_ptr, b_ptr, out_ptr, scale_ptr, bias_ptr, M, N, D, stride_a, stride_b,
                                diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < M
        s = tl.load(scale_ptr).to(tl.float32)
        bias = tl.load(bias_ptr).to(tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < N
            z = _siglip_logits(a_ptr, b_ptr, rows, cols, rmask, cmask, s, bias, D, stride_a, stride_b,
                               BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            x = tl.where(cols[None, :] == rows[:, None] + diag_offset, -z, z)  # softplus(−y z)
            sp = tl.where(x < -15.0, tl.exp(x), tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
            total += tl.sum(tl.where(rmask[:, None] & cmask[None, :], sp, 0.0), 1)
        tl.store(out_ptr + rows, total, mask=rmask)

    @triton.jit
    def _siglip_loss_grad_kernel(a_ptr, b_ptr, out_ptr, gsum_ptr, scale_ptr, bias_ptr, M, N, D,
                                 stride_a, stride_b, stride_out, diag_offset, inv_m,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        outs = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
        rmask = rows < M
        omask = outs < D
        s = tl.load(scale_ptr).to(tl.float32)
        bias = tl.load(bias_ptr).to(tl.float32)
        out = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
        gsum = tl.zeros((BLOCK_M,), tl.float32)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < N
            z = _siglip_logits(a_ptr, b_ptr, rows, cols, rmask, cmask, s, bias, D, stride_a, stride_b,
                               BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            is_pos = cols[None, :] == rows[:, None] + diag_offset
            grad = tl.where(is_pos, -1.0 / (1.0 + tl.exp(z)), 1.0 / (1.0 + tl.exp(-z))) * inv_m
            grad = tl.where(rmask[:, None] & cmask[None, :], grad, 0.0)
            gsum += tl.sum(grad, 1)
            bo = tl.load(b_ptr + cols[:, None] * stride_b + outs[None, :], mask=cmask[:, None] & omask[None, :],
                         other=0.0).to(tl.float32)
            out = tl.dot(grad, bo, out, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_out + outs[None, :], out, mask=rmask[:, None] & omask[None, :])
        tl.store(gsum_ptr + tl.program_id(1).to(tl.int64) * M + rows, gsum, mask=rmask)


def _settings(v: torch.Tensor) -> dict:
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, **kernel_settings(v)}


def _scalars(scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale.detach().float().reshape(1).contiguous(), bias.detach().float().reshape(1).contiguous()


def siglip_loss_forward(v: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        diag_offset: int) -> torch.Tensor:
    """The loss as an fp32 scalar: per-row partial sums from the kernel, reduced and divided by M on the host."""
    require_triton()
    v, g = v.contiguous(), g.contiguous()
    s32, b32 = _scalars(scale, bias)
    m, n, d = v.shape[0], g.shape[0], v.shape[1]
    partial = torch.empty(m, device=v.device, dtype=torch.float32)
    _siglip_loss_fwd_kernel[(triton.cdiv(m, BLOCK_M),)](v, g, partial, s32, b32, m, n, d, v.stride(0), g.stride(0),
                                                       diag_offset, **_settings(v))
    return partial.sum() / m


def _grad_rows(a, b, s32, b32, diag_offset: int, inv_m: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    out = torch.empty(m, d, device=a.device, dtype=torch.float32)
    block_do = max(16, min(128, triton.next_power_of_2(d)))
    n_do = triton.cdiv(d, block_do)
    gsum = torch.empty(n_do, m, device=a.device, dtype=torch.float32)
    _siglip_loss_grad_kernel[(triton.cdiv(m, BLOCK_M), n_do)](a, b, out, gsum, s32, b32, m, n, d, a.stride(0),
                                                             b.stride(0), out.stride(0), diag_offset, inv_m,
                                                             BLOCK_DO=block_do, **_settings(a))
    return out, gsum[0]


def siglip_loss_backward(v, g, scale, bias, diag_offset: int, grad_out: torch.Tensor):
    """fp32 gradients ``(∂L/∂v, ∂L/∂g, ∂L/∂s, ∂L/∂b)`` times ``grad_out``."""
    require_triton()
    v, g = v.contiguous(), g.contiguous()
    s32, b32 = _scalars(scale, bias)
    inv_m = 1.0 / v.shape[0]
    a, gsum = _grad_rows(v, g, s32, b32, diag_offset, inv_m)
    c, _ = _grad_rows(g, v, s32, b32, -diag_offset, inv_m)
    go = grad_out.float()
    return a * (go * s32), c * (go * s32), go * (v.float() * a).sum(), go * gsum.sum()


class SigLipLossFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(v, g, logit_scale, logit_bias, diag_offset)``."""

    @staticmethod
    def forward(ctx, v, g, scale, bias, diag_offset: int):
        ctx.save_for_backward(v, g, scale, bias)
        ctx.diag_offset = diag_offset
        return siglip_loss_forward(v, g, scale, bias, diag_offset)

    @staticmethod
    def backward(ctx, grad_out):
        v, g, scale, bias = ctx.saved_tensors
        dv, dg, ds, db = siglip_loss_backward(v, g, scale, bias, ctx.diag_offset, grad_out)
        need = ctx.needs_input_grad
        return (dv.to(v.dtype) if need[0] else None, dg.to(g.dtype) if need[1] else None,
                ds.to(scale.dtype).reshape(scale.shape) if need[2] else None,
                db.to(bias.dtype).reshape(bias.shape) if need[3] else None, None)


def siglip_loss_triton(v: torch.Tensor, g: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                       diag_offset: int = 0) -> torch.Tensor:
    """Fused SigLIP loss, equal to open_clip's ``SigLipLoss`` on one device (sum over pairs / M)."""
    check_pair(v, g, diag_offset=diag_offset)
    check_scalar(logit_scale, "logit_scale", v)
    check_scalar(logit_bias, "logit_bias", v)
    return SigLipLossFunction.apply(v, g, logit_scale, logit_bias, diag_offset)
