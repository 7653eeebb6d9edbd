"""Tiled pure-torch CLIP and SigLIP losses: the CPU path and the algorithm the Triton kernels follow.

Neither loss ever holds the M×N logit matrix. Memory is O((M + N)·d + tile²) per worker: each of the ``W``
workers (``W = torch.get_num_threads()`` on CPU, capped by the number of row tiles; 1 on other devices) holds two
tile² fp32 buffers and, in the backward, its own N×d share of ``C``. At B = 8192, d = 128, tile = 512, W = 2 that
is ≈ 2·(2 + 4) MiB plus the O(B·d) inputs/gradients, against the 256 MiB of a single B×B fp32 logit matrix.

Threading: on CPU the row tiles are split into ``W`` contiguous blocks, each run by a Python thread whose torch
ops are single-threaded (ops release the GIL). Intra-op threading of tile-sized ops would put an OpenMP barrier
after every op; on a loaded machine a barrier waits for a descheduled thread, which made the 2-thread path 2–4×
slower than the B×B one. Column statistics and ``C`` are reduced over blocks in block order, so results are
deterministic for a given thread count (and agree with other counts to fp32 rounding).

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

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ..errors import HescapeModelError
from ..ops._utils import check_pair, check_scalar

__all__ = ["DEFAULT_TILE", "TorchClipFunction", "TorchSigLipFunction", "clip_loss_torch", "siglip_loss_torch"]

DEFAULT_TILE = 512  # 1 MiB fp32 per tile buffer: fits a per-core L2; per-tile Python overhead is ~2% at d=128


def _check_tile(tile: int) -> None:
    if not isinstance(tile, int) or tile < 1:
        msg = f"expected a positive integer tile size, found {tile!r}; use e.g. tile={DEFAULT_TILE}"
        raise HescapeModelError(msg)


def _tiles(n: int, tile: int, lo: int = 0):
    return [(a, min(a + tile, n)) for a in range(lo, n, tile)]


def _row_blocks(m: int, tile: int, device: torch.device) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per worker thread, each a whole number of row tiles.

    On CPU with ``torch.get_num_threads() = T > 1`` the rows are split between ``T`` Python threads that each run
    single-threaded torch ops (which release the GIL). Intra-op threading of small tile ops would instead put a
    thread barrier after every op; on a busy machine each barrier can cost a scheduler time slice. The split
    depends only on ``(m, tile, T)``, so results are deterministic for a given thread count.
    """
    n_tiles = -(-m // tile)
    workers = min(torch.get_num_threads(), n_tiles) if device.type == "cpu" else 1
    if workers <= 1:
        return [(0, m)]
    cuts = [round(k * n_tiles / workers) * tile for k in range(workers + 1)]
    return [(a, min(b, m)) for a, b in zip(cuts, cuts[1:], strict=False) if a < min(b, m)]


def _run_blocks(fn, blocks: list[tuple[int, int]]) -> list:
    """``[fn(r0, r1) for (r0, r1) in blocks]``, concurrently (one single-threaded worker per block) when several."""
    if len(blocks) == 1:
        with torch.no_grad():
            return [fn(*blocks[0])]
    threads = torch.get_num_threads()

    def work(r0: int, r1: int):
        torch.set_num_threads(1)  # this thread's OpenMP/MKL team; restored before the thread returns
        try:
            with torch.no_grad():
                return fn(r0, r1)
        finally:
            torch.set_num_threads(threads)

    with ThreadPoolExecutor(len(blocks), thread_name_prefix="hescape-loss") as pool:
        futures = [pool.submit(work, r0, r1) for r0, r1 in blocks]
        return [f.result() for f in futures]


class _OnlineLSE:
    """Running ``(max, sum of exp(x − max))`` per row or column; merged tile by tile (O(n) memory)."""

    def __init__(self, n: int, device: torch.device):
        self.m = torch.full((n,), float("-inf"), device=device)
        self.s = torch.zeros(n, device=device)

    def update(self, a: int, b: int, z: torch.Tensor, e: torch.Tensor, dim: int) -> None:
        mt = z.amax(dim, keepdim=True)  # tile max per row (dim=1) or per column (dim=0)
        torch.sub(z, mt, out=e).exp_()
        self._merge(a, b, mt.squeeze(dim), e.sum(dim))

    def _merge(self, a: int, b: int, mt: torch.Tensor, st: torch.Tensor) -> None:
        m_old, s_old = self.m[a:b], self.s[a:b]
        m_new = torch.maximum(m_old, mt)
        s_old.mul_(torch.exp_(m_old - m_new)).add_(st.mul_(torch.exp_(mt - m_new)))
        m_old.copy_(m_new)

    def merge(self, other: _OnlineLSE) -> _OnlineLSE:
        self._merge(0, self.m.numel(), other.m, other.s)
        return self

    def result(self) -> torch.Tensor:
        return self.s.log_().add_(self.m)


def _buffers(rows: int, cols: int, device: torch.device, n: int = 2) -> list[torch.Tensor | None]:
    """Reusable fp32 tile buffers (logits, exponentials): no per-tile allocation of rows×cols."""
    return [torch.empty(rows, cols, device=device) if k < n else None for k in range(2)]


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0]
    for p in parts[1:]:
        out.add_(p)
    return out


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
        dev = v.device
        rows = torch.empty(m, device=dev)
        zpos = torch.empty(m, device=dev)  # positive logits, read from the same tiles as the LSEs

        def block(r0: int, r1: int):
            cols = _OnlineLSE(n, dev) if col_weight else None  # this block's rows only; merged below
            z, e = _buffers(min(tile, r1 - r0), min(tile, n), dev)
            for i0, i1 in _tiles(r1, tile, r0):
                row = _OnlineLSE(i1 - i0, dev)
                for j0, j1 in _tiles(n, tile):
                    zt, et = z[: i1 - i0, : j1 - j0], e[: i1 - i0, : j1 - j0]
                    torch.mm(vs[i0:i1], g32[j0:j1].T, out=zt)
                    k = i0 + diag_offset - j0
                    zd = zt.diagonal(k)
                    if zd.numel():
                        start = i0 + max(0, -k)
                        zpos[start:start + zd.numel()] = zd
                    row.update(0, i1 - i0, zt, et, dim=1)
                    if cols is not None:
                        cols.update(j0, j1, zt, et, dim=0)
                rows[i0:i1] = row.result()
            return cols

        parts = _run_blocks(block, _row_blocks(m, tile, dev))
        loss = row_weight * (rows - zpos).sum()
        cols = None
        if col_weight:  # square, offset 0 (checked by the caller): column j's positive is row j
            for p in parts[1:]:
                parts[0].merge(p)
            cols = parts[0].result()
            loss = loss + col_weight * (cols - zpos).sum()
        ctx.save_for_backward(v, g, scale, rows, *(() if cols is None else (cols,)))
        ctx.cfg = (diag_offset, row_weight, col_weight, tile)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        v, g, scale, rows, *maybe_cols = ctx.saved_tensors
        cols = maybe_cols[0] if maybe_cols else None
        diag_offset, rw, cw, tile = ctx.cfg
        v32, g32 = v.detach().float(), g.detach().float()
        s32 = scale.detach().float().reshape(())
        vs = v32 * s32
        m, n = v.shape[0], g.shape[0]
        a, c0 = torch.empty_like(v32), torch.zeros_like(g32)

        def block(r0: int, r1: int):
            c = c0 if r0 == 0 else torch.zeros_like(g32)  # this block's share of C; summed in block order
            zb, eb = _buffers(min(tile, r1 - r0), min(tile, n), v.device)
            for i0, i1 in _tiles(r1, tile, r0):
                ai = a[i0:i1].zero_()
                for j0, j1 in _tiles(n, tile):
                    z, gz = zb[: i1 - i0, : j1 - j0], eb[: i1 - i0, : j1 - j0]
                    torch.mm(vs[i0:i1], g32[j0:j1].T, out=z)
                    torch.sub(z, rows[i0:i1, None], out=gz).exp_().mul_(rw)
                    if cols is not None:
                        gz.add_(z.sub_(cols[None, j0:j1]).exp_(), alpha=cw)
                    gz.diagonal(i0 + diag_offset - j0).sub_(rw + cw)
                    ai.addmm_(gz, g32[j0:j1])
                    c[j0:j1].addmm_(gz.T, v32[i0:i1])
            return c

        c = _sum_in_order(_run_blocks(block, _row_blocks(m, tile, v.device)))
        return _grads_out(ctx, grad_out.float(), v, g, scale, v32, s32, a, c, [None, None, None, None])


class TorchSigLipFunction(torch.autograd.Function):
    """Autograd function for the tiled SigLIP loss ``(1/M) Σ_ij softplus(−y_ij z_ij)``."""

    @staticmethod
    def forward(ctx, v, g, scale, bias, diag_offset: int, tile: int):
        v32, g32 = v.detach().float(), g.detach().float()
        s32, b32 = scale.detach().float().reshape(()), bias.detach().float().reshape(())
        vs = v32 * s32
        m, n = v.shape[0], g.shape[0]

        def block(r0: int, r1: int):
            total = torch.zeros((), device=v.device)
            zb, _ = _buffers(min(tile, r1 - r0), min(tile, n), v.device, n=1)
            for i0, i1 in _tiles(r1, tile, r0):
                for j0, j1 in _tiles(n, tile):
                    z = zb[: i1 - i0, : j1 - j0]
                    torch.addmm(b32, vs[i0:i1], g32[j0:j1].T, out=z)
                    z.diagonal(i0 + diag_offset - j0).neg_()  # y = +1 on the positives: softplus(−z) there
                    total += F.softplus(z).sum()
            return total

        total = _sum_in_order(_run_blocks(block, _row_blocks(m, tile, v.device)))
        ctx.save_for_backward(v, g, scale, bias)
        ctx.cfg = (diag_offset, tile)
        return total / m

    @staticmethod
    def backward(ctx, grad_out):
        v, g, scale, bias = ctx.saved_tensors
        diag_offset, tile = ctx.cfg
        v32, g32 = v.detach().float(), g.detach().float()
        s32, b32 = scale.detach().float().reshape(()), bias.detach().float().reshape(())
        vs = v32 * s32
        m, n = v.shape[0], g.shape[0]
        a, c0 = torch.empty_like(v32), torch.zeros_like(g32)

        def block(r0: int, r1: int):
            c = c0 if r0 == 0 else torch.zeros_like(g32)  # this block's share of C; summed in block order
            db = torch.zeros((), device=v.device)
            zb, _ = _buffers(min(tile, r1 - r0), min(tile, n), v.device, n=1)
            for i0, i1 in _tiles(r1, tile, r0):
                ai = a[i0:i1].zero_()
                for j0, j1 in _tiles(n, tile):
                    gz = zb[: i1 - i0, : j1 - j0]
                    torch.addmm(b32, vs[i0:i1], g32[j0:j1].T, out=gz)
                    k = i0 + diag_offset - j0
                    zd = gz.diagonal(k).neg()
                    gz.sigmoid_().mul_(1.0 / m)
                    gz.diagonal(k).copy_(zd.sigmoid_().mul_(-1.0 / m))  # σ(z) − 1 = −σ(−z) on the positives
                    db += gz.sum()
                    ai.addmm_(gz, g32[j0:j1])
                    c[j0:j1].addmm_(gz.T, v32[i0:i1])
            return c, db

        parts = _run_blocks(block, _row_blocks(m, tile, v.device))
        c = _sum_in_order([p[0] for p in parts])
        db = _sum_in_order([p[1] for p in parts])
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
