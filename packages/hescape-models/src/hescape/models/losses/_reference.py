"""Tiled pure-torch CLIP and SigLIP losses: the reference for the Triton kernels and the CPU fallback.

Neither loss ever holds the M×N logit matrix; memory is O((M + N)·d + tile²).

Derivation
----------
Notation: image features ``v`` (M×d), gene features ``g`` (N×d), exponentiated scale ``s``, bias ``b``,
positive pairs ``(i, i + o)`` for a diagonal offset ``o`` (0 on one device; ``rank·M`` for a local loss),
``δ_ij = [j = i + o]``, logits ``z_ij = s·<v_i, g_j> (+ b)``.

CLIP. Row and column log-sum-exps ``r_i = log Σ_j exp z_ij``, ``c_j = log Σ_i exp z_ij`` are built tile
by tile with ``lse(a ∪ b) = logaddexp(lse(a), lse(b))``. With row weight ``w_r`` and column weight ``w_c``

    L = w_r Σ_i (r_i − z_{i,i+o}) + w_c Σ_j (c_j − z_{j−o,j}).

open_clip's ClipLoss is ``w_r = w_c = 1/(2B)``, o = 0: (CE(logits_per_image) + CE(logits_per_text)) / 2
with the mean over the batch, since logits_per_text = zᵀ. Differentiating,

    G_ij := ∂L/∂z_ij = w_r (exp(z_ij − r_i) − δ_ij) + w_c (exp(z_ij − c_j) − δ_ij).

SigLIP. Labels ``y_ij = 2δ_ij − 1`` and ``−log σ(x) = softplus(−x)`` give

    L = (1/M) Σ_ij softplus(−y_ij z_ij),        G_ij = (σ(z_ij) − δ_ij) / M,

(off the diagonal softplus(z) with derivative σ(z); on it softplus(−z) with derivative −σ(−z) = σ(z) − 1,
which is evaluated as −σ(−z) to avoid cancellation). open_clip divides by the image batch size M too.

Chain rule, shared by both: with ``A_i = Σ_j G_ij g_j`` and ``C_j = Σ_i G_ij v_i`` (accumulated tile by tile
in a second pass that recomputes the logits from the saved O(M + N) statistics),

    ∂L/∂v_i = s·A_i,   ∂L/∂g_j = s·C_j,   ∂L/∂s = Σ_ij G_ij <v_i, g_j> = Σ_i <v_i, A_i>,   ∂L/∂b = Σ_ij G_ij.

All accumulation is fp32; 16-bit inputs are upcast once (O((M + N)·d)) and gradients are cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import HescapeModelError
from ..ops._utils import check_pair, check_scalar

__all__ = ["DEFAULT_TILE", "TorchClipFunction", "TorchSigLipFunction", "clip_loss_torch", "siglip_loss_torch"]

DEFAULT_TILE = 1024  # 4 MiB fp32 per tile buffer; large enough that per-tile Python overhead is negligible on CPU


def _check_tile(tile: int) -> None:
    if not isinstance(tile, int) or tile < 1:
        msg = f"expected a positive integer tile size, found {tile!r}; use e.g. tile={DEFAULT_TILE}"
        raise HescapeModelError(msg)


def _tiles(n: int, tile: int):
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


class _OnlineLSE:
    """Running ``(max, sum of exp(x − max))`` per row or column; merged tile by tile (O(n) memory)."""

    def __init__(self, n: int, device: torch.device):
        self.m = torch.full((n,), float("-inf"), device=device)
        self.s = torch.zeros(n, device=device)

    def update(self, a: int, b: int, z: torch.Tensor, e: torch.Tensor, dim: int) -> None:
        mt = z.amax(dim, keepdim=True)  # tile max per row (dim=1) or per column (dim=0)
        torch.sub(z, mt, out=e).exp_()
        st = e.sum(dim)
        mt = mt.squeeze(dim)
        m_old, s_old = self.m[a:b], self.s[a:b]
        m_new = torch.maximum(m_old, mt)
        s_old.mul_(torch.exp_(m_old - m_new)).add_(st.mul_(torch.exp_(mt - m_new)))
        m_old.copy_(m_new)

    def result(self) -> torch.Tensor:
        return self.s.log_().add_(self.m)


def _buffers(rows: int, cols: int, device: torch.device, n: int = 2) -> list[torch.Tensor | None]:
    """Reusable fp32 tile buffers (logits, exponentials): no per-tile allocation of rows×cols."""
    return [torch.empty(rows, cols, device=device) if k < n else None for k in range(2)]


def _grads_out(ctx, go, v, g, scale, v32, s32, a, c, extra: list[torch.Tensor | None]):
    """Apply the chain rule: scale the accumulated ``A``/``C`` and cast back to the input dtypes."""
    dv = (a * (go * s32)).to(v.dtype) if ctx.needs_input_grad[0] else None
    dg = (c * (go * s32)).to(g.dtype) if ctx.needs_input_grad[1] else None
    ds = None
    if ctx.needs_input_grad[2]:
        ds = (go * (v32 * a).sum()).to(scale.dtype).reshape(scale.shape)
    return dv, dg, ds, *extra


class TorchClipFunction(torch.autograd.Function):
    """Autograd function for the tiled weighted CLIP loss ``L`` defined in the module docstring."""

    @staticmethod
    def forward(ctx, v, g, scale, diag_offset: int, row_weight: float, col_weight: float, tile: int):
        v32, g32 = v.detach().float(), g.detach().float()
        s32 = scale.detach().float().reshape(())
        vs = v32 * s32  # s·v: every logit tile is then one matmul
        m, n = v.shape[0], g.shape[0]
        rows = _OnlineLSE(m, v.device)
        cols = _OnlineLSE(n, v.device) if col_weight else None
        z, e = _buffers(min(tile, m), min(tile, n), v.device)
        zpos = torch.empty(m, device=v.device)  # positive logits, read from the same tiles as the LSEs
        for i0, i1 in _tiles(m, tile):
            for j0, j1 in _tiles(n, tile):
                zt, et = z[: i1 - i0, : j1 - j0], e[: i1 - i0, : j1 - j0]
                torch.mm(vs[i0:i1], g32[j0:j1].T, out=zt)
                k = i0 + diag_offset - j0
                zd = zt.diagonal(k)
                if zd.numel():
                    start = i0 + max(0, -k)
                    zpos[start:start + zd.numel()] = zd
                rows.update(i0, i1, zt, et, dim=1)
                if cols is not None:
                    cols.update(j0, j1, zt, et, dim=0)
        del z, e
        rows = rows.result()
        cols = None if cols is None else cols.result()
        loss = row_weight * (rows - zpos).sum()
        if cols is not None:  # square, offset 0 (checked by the caller): column j's positive is row j
            loss = loss + col_weight * (cols - zpos).sum()
        ctx.save_for_backward(v, g, scale, rows, *(() if cols is None else (cols,)))
        ctx.cfg = (diag_offset, row_weight, col_weight, tile)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        v, g, scale, rows, *maybe_cols = ctx.saved_tensors
        cols = maybe_cols[0] if maybe_cols else None
        diag_offset, rw, cw, tile = ctx.cfg
        v32, g32 = v.float(), g.float()
        s32 = scale.float().reshape(())
        vs = v32 * s32
        a = torch.zeros_like(v32)
        c = torch.zeros_like(g32)
        zb, eb = _buffers(min(tile, v.shape[0]), min(tile, g.shape[0]), v.device)
        for i0, i1 in _tiles(v.shape[0], tile):
            for j0, j1 in _tiles(g.shape[0], tile):
                z, gz = zb[: i1 - i0, : j1 - j0], eb[: i1 - i0, : j1 - j0]
                torch.mm(vs[i0:i1], g32[j0:j1].T, out=z)
                torch.sub(z, rows[i0:i1, None], out=gz).exp_().mul_(rw)
                if cols is not None:
                    gz.add_(z.sub_(cols[None, j0:j1]).exp_(), alpha=cw)
                gz.diagonal(i0 + diag_offset - j0).sub_(rw + cw)
                a[i0:i1].addmm_(gz, g32[j0:j1])
                c[j0:j1].addmm_(gz.T, v32[i0:i1])
        return _grads_out(ctx, grad_out.float(), v, g, scale, v32, s32, a, c, [None, None, None, None])


class TorchSigLipFunction(torch.autograd.Function):
    """Autograd function for the tiled SigLIP loss ``(1/M) Σ_ij softplus(−y_ij z_ij)``."""

    @staticmethod
    def forward(ctx, v, g, scale, bias, diag_offset: int, tile: int):
        v32, g32 = v.detach().float(), g.detach().float()
        s32, b32 = scale.detach().float().reshape(()), bias.detach().float().reshape(())
        vs = v32 * s32
        m, n = v.shape[0], g.shape[0]
        total = torch.zeros((), device=v.device)
        zb, _ = _buffers(min(tile, m), min(tile, n), v.device, n=1)
        for i0, i1 in _tiles(m, tile):
            for j0, j1 in _tiles(n, tile):
                z = zb[: i1 - i0, : j1 - j0]
                torch.addmm(b32, vs[i0:i1], g32[j0:j1].T, out=z)
                z.diagonal(i0 + diag_offset - j0).neg_()  # y = +1 on the positives: softplus(−z) there
                total += F.softplus(z).sum()
        ctx.save_for_backward(v, g, scale, bias)
        ctx.cfg = (diag_offset, tile)
        return total / m

    @staticmethod
    def backward(ctx, grad_out):
        v, g, scale, bias = ctx.saved_tensors
        diag_offset, tile = ctx.cfg
        v32, g32 = v.float(), g.float()
        s32, b32 = scale.float().reshape(()), bias.float().reshape(())
        vs = v32 * s32
        m = v.shape[0]
        a, c = torch.zeros_like(v32), torch.zeros_like(g32)
        db = torch.zeros((), device=v.device)
        zb, _ = _buffers(min(tile, m), min(tile, g.shape[0]), v.device, n=1)
        for i0, i1 in _tiles(m, tile):
            for j0, j1 in _tiles(g.shape[0], tile):
                gz = zb[: i1 - i0, : j1 - j0]
                torch.addmm(b32, vs[i0:i1], g32[j0:j1].T, out=gz)
                k = i0 + diag_offset - j0
                zd = gz.diagonal(k).neg()
                gz.sigmoid_().mul_(1.0 / m)
                gz.diagonal(k).copy_(zd.sigmoid_().mul_(-1.0 / m))  # σ(z) − 1 = −σ(−z) on the positives
                db += gz.sum()
                a[i0:i1].addmm_(gz, g32[j0:j1])
                c[j0:j1].addmm_(gz.T, v32[i0:i1])
        go = grad_out.float()
        dbias = (go * db).to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None
        return _grads_out(ctx, go, v, g, scale, v32, s32, a, c, [dbias, None, None])


def clip_loss_torch(v: torch.Tensor, g: torch.Tensor, logit_scale: torch.Tensor, *, diag_offset: int = 0,
                    row_weight: float | None = None, col_weight: float | None = None,
                    tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Tiled CLIP loss; the defaults reproduce open_clip's ``ClipLoss`` on one device.

    ``row_weight``/``col_weight`` default to ``1/(2M)``; ``col_weight=0`` gives the one-directional
    (local-loss) term on a rectangular ``M×N`` matrix with positives at ``(i, i + diag_offset)``.
    """
    rw = 1.0 / (2 * v.shape[0]) if row_weight is None else float(row_weight)
    cw = 1.0 / (2 * v.shape[0]) if col_weight is None else float(col_weight)
    check_pair(v, g, square=cw != 0.0, diag_offset=diag_offset)
    check_scalar(logit_scale, "logit_scale", v)
    _check_tile(tile)
    return TorchClipFunction.apply(v, g, logit_scale, diag_offset, rw, cw, tile)


def siglip_loss_torch(v: torch.Tensor, g: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                      diag_offset: int = 0, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Tiled SigLIP loss, equal to open_clip's ``SigLipLoss`` on one device (sum over pairs / M)."""
    check_pair(v, g, diag_offset=diag_offset)
    check_scalar(logit_scale, "logit_scale", v)
    check_scalar(logit_bias, "logit_bias", v)
    _check_tile(tile)
    return TorchSigLipFunction.apply(v, g, logit_scale, logit_bias, diag_offset, tile)
