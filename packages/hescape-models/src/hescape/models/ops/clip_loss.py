"""Fused tiled CLIP loss in Triton: the logit matrix is never written to memory.

Derivation (the same algorithm as ``hescape.models.losses._tiled``; the tests compare both with :mod:`hescape.models.losses.naive`)
-----------------------------------------------------------------------------------------------------
Features ``v`` (M×d), ``g`` (N×d), exponentiated scale ``s``, logits ``z_ij = s·<v_i, g_j>``, positives at
``(i, i + o)`` with ``δ_ij = [j = i + o]``. With ``r_i = logsumexp_j z_ij`` and ``c_j = logsumexp_i z_ij``

    L = w_r Σ_i (r_i − z_{i,i+o}) + w_c Σ_j (c_j − z_{j−o,j})          (open_clip: w_r = w_c = 1/(2B), o = 0)
    G_ij = ∂L/∂z_ij = w_r (exp(z_ij − r_i) − δ_ij) + w_c (exp(z_ij − c_j) − δ_ij)
    ∂L/∂v = s·G g,   ∂L/∂g = s·Gᵀ v,   ∂L/∂s = Σ_i <v_i, (G g)_i>.

Forward: ``_clip_loss_lse_kernel`` streams column tiles past a block of rows and keeps an online
(max, sum-exp) pair per row; called on (v, g) it gives ``r``, on (g, v) it gives ``c``.
Backward: ``_clip_loss_grad_kernel`` recomputes each logit tile, forms ``G`` and accumulates ``G·B`` for a
block of rows of ``A``; on (v, g) it yields ``G g``, on (g, v) with the roles of ``r``/``c`` and ``w_r``/``w_c``
swapped and offset ``−o`` it yields ``Gᵀ v`` (the transpose of the same G). The host scales by ``s`` and
``grad_output``. Accumulation is fp32, offsets are int64; fp32 inputs use IEEE dots, 16-bit inputs are upcast and
use TF32 dots (their values are exact in TF32).
"""

from __future__ import annotations

import torch

from ._tiles import BLOCK_M, BLOCK_N, kernel_settings, require_triton, tile_dot, tl, triton
from ._utils import check_pair, check_scalar

__all__ = ["ClipLossFunction", "clip_loss_backward", "clip_loss_forward", "clip_loss_triton"]


if triton is not None:

    @triton.jit
    def _clip_loss_lse_kernel(a_ptr, b_ptr, lse_ptr, pos_ptr, scale_ptr, M, N, D, stride_a, stride_b, diag_offset,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < M
        s = tl.load(scale_ptr).to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        pos = tl.zeros((BLOCK_M,), tl.float32)  # the positive logit z_{i,i+o}, from the same tiles as the LSE
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < N
            acc = tile_dot(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                           PRECISION)
            z = tl.where(cmask[None, :], acc * s, float("-inf"))
            pos += tl.sum(tl.where(cols[None, :] == rows[:, None] + diag_offset, z, 0.0), 1)
            m_new = tl.maximum(m_i, tl.max(z, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m_i = m_new
        tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=rmask)
        tl.store(pos_ptr + rows, pos, mask=rmask)

    @triton.jit
    def _clip_loss_grad_kernel(a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, out_ptr, scale_ptr, M, N, D,
                               stride_a, stride_b, stride_out, diag_offset, w_row, w_col,
                               HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
                               PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        outs = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
        rmask = rows < M
        omask = outs < D
        s = tl.load(scale_ptr).to(tl.float32)
        if HAS_ROW:
            lse_r = tl.load(lse_a_ptr + rows, mask=rmask, other=0.0)
        out = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < N
            acc = tile_dot(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                           PRECISION)
            z = acc * s
            is_pos = cols[None, :] == rows[:, None] + diag_offset
            grad = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if HAS_ROW:
                grad += w_row * (tl.exp(z - lse_r[:, None]) - is_pos.to(tl.float32))
            if HAS_COL:
                lse_c = tl.load(lse_b_ptr + cols, mask=cmask, other=0.0)
                grad += w_col * (tl.exp(z - lse_c[None, :]) - is_pos.to(tl.float32))
            grad = tl.where(rmask[:, None] & cmask[None, :], grad, 0.0)
            bo = tl.load(b_ptr + cols[:, None] * stride_b + outs[None, :], mask=cmask[:, None] & omask[None, :],
                         other=0.0).to(tl.float32)
            out = tl.dot(grad, bo, out, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_out + outs[None, :], out, mask=rmask[:, None] & omask[None, :])


def _lse(a: torch.Tensor, b: torch.Tensor, s32: torch.Tensor, diag_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row log-sum-exps of ``s·a bᵀ`` and each row's positive logit."""
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    lse = torch.empty(m, device=a.device, dtype=torch.float32)
    pos = torch.empty(m, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(m, BLOCK_M),)
    _clip_loss_lse_kernel[grid](a, b, lse, pos, s32, m, n, d, a.stride(0), b.stride(0), diag_offset,
                                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **kernel_settings(a))
    return lse, pos


def _grad_rows(a, b, lse_a, lse_b, s32, diag_offset: int, w_row: float, w_col: float) -> torch.Tensor:
    """``Σ_j G_ij b_j`` for every row ``i`` of ``a`` (fp32, unscaled by ``s``)."""
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    out = torch.empty(m, d, device=a.device, dtype=torch.float32)
    block_do = max(16, min(128, triton.next_power_of_2(d)))
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(d, block_do))
    dummy = s32  # never read when the matching HAS_ flag is off
    _clip_loss_grad_kernel[grid](a, b, dummy if lse_a is None else lse_a, dummy if lse_b is None else lse_b, out,
                                 s32, m, n, d, a.stride(0), b.stride(0), out.stride(0), diag_offset,
                                 float(w_row), float(w_col), HAS_ROW=w_row != 0.0, HAS_COL=w_col != 0.0,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DO=block_do, **kernel_settings(a))
    return out


def clip_loss_forward(v: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, diag_offset: int, row_weight: float,
                      col_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss (fp32 scalar), row log-sum-exps ``r`` and column log-sum-exps ``c`` (None when ``col_weight == 0``)."""
    require_triton()
    v, g = v.contiguous(), g.contiguous()
    s32 = scale.detach().float().reshape(1).contiguous()
    rows, zpos = _lse(v, g, s32, diag_offset)
    loss = row_weight * (rows - zpos).sum()
    cols = None
    if col_weight:  # square with offset 0 (checked by the caller): column j's positive is row j
        cols, zpos_c = _lse(g, v, s32, 0)
        loss = loss + col_weight * (cols - zpos_c).sum()
    return loss, rows, cols


def clip_loss_backward(v, g, scale, rows, cols, diag_offset: int, row_weight: float, col_weight: float,
                       grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 gradients ``(∂L/∂v, ∂L/∂g, ∂L/∂s)`` times ``grad_out``."""
    require_triton()
    v, g = v.contiguous(), g.contiguous()
    s32 = scale.detach().float().reshape(1).contiguous()
    a = _grad_rows(v, g, rows, cols, s32, diag_offset, row_weight, col_weight)
    c = _grad_rows(g, v, cols, rows, s32, -diag_offset, col_weight, row_weight)
    go = grad_out.float()
    ds = go * (v.float() * a).sum()
    return a * (go * s32), c * (go * s32), ds


class ClipLossFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(v, g, logit_scale, diag_offset, row_weight, col_weight)``."""

    @staticmethod
    def forward(ctx, v, g, scale, diag_offset: int, row_weight: float, col_weight: float):
        loss, rows, cols = clip_loss_forward(v, g, scale, diag_offset, row_weight, col_weight)
        ctx.save_for_backward(v, g, scale, rows, *(() if cols is None else (cols,)))
        ctx.cfg = (diag_offset, row_weight, col_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        v, g, scale, rows, *maybe_cols = ctx.saved_tensors
        diag_offset, rw, cw = ctx.cfg
        dv, dg, ds = clip_loss_backward(v, g, scale, rows, maybe_cols[0] if maybe_cols else None, diag_offset, rw, cw,
                                        grad_out)
        return (dv.to(v.dtype) if ctx.needs_input_grad[0] else None,
                dg.to(g.dtype) if ctx.needs_input_grad[1] else None,
                ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
                None, None, None)


def clip_loss_triton(v: torch.Tensor, g: torch.Tensor, logit_scale: torch.Tensor, *, diag_offset: int = 0,
                     row_weight: float | None = None, col_weight: float | None = None) -> torch.Tensor:
    """Fused CLIP loss; the defaults reproduce open_clip's ``ClipLoss`` on one device."""
    rw = 1.0 / (2 * v.shape[0]) if row_weight is None else float(row_weight)
    cw = 1.0 / (2 * v.shape[0]) if col_weight is None else float(col_weight)
    check_pair(v, g, square=cw != 0.0, diag_offset=diag_offset)
    check_scalar(logit_scale, "logit_scale", v)
    return ClipLossFunction.apply(v, g, logit_scale, diag_offset, rw, cw)
