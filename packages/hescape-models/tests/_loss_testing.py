"""Shared helpers of the loss tests: inputs, a verbose allclose and naive references (not collected by pytest)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hescape.models.losses.naive import clip_loss_naive, siglip_loss_naive

DTYPE_PARAMS = {  # dtype: (atol as a fraction of max|expected|, rtol) for values and gradients
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}


def make_inputs(b: int, d: int, dtype: torch.dtype, scale: float, bias: float, *, seed: int = 0, n: int | None = None,
                device: str = "cpu"):
    """L2-normalised features (as the model emits) in ``dtype``, and fp32 scale/bias leaves."""
    gen = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    g = F.normalize(torch.randn(b if n is None else n, d, generator=gen), dim=-1)
    g = g.to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(scale, device=device, requires_grad=True)
    bb = torch.tensor(bias, device=device, requires_grad=True)
    return v, g, s, bb


def grads(loss: torch.Tensor, inputs, grad_output: float):
    """Gradients of ``grad_output · loss`` w.r.t. ``inputs`` (None where unused), the value detached."""
    out = torch.autograd.grad(loss, inputs, grad_outputs=torch.tensor(grad_output, dtype=loss.dtype,
                                                                        device=loss.device), allow_unused=True)
    return loss.detach(), out


def assert_verbose_allclose(actual: torch.Tensor | None, expected: torch.Tensor | None, *, atol: float, rtol: float,
                            name: str, floor: float = 1e-30) -> None:
    """``|a − e| <= atol·max(max|e|, floor) + rtol·|e|`` elementwise; the message lists the worst mismatches."""
    if expected is None or actual is None:
        if actual is not expected:
            msg = f"{name}: one gradient is None, expected {expected!r}, found {actual!r}"
            raise AssertionError(msg)
        return
    a, e = actual.detach().double().cpu().reshape(-1), expected.detach().double().cpu().reshape(-1)
    if a.shape != e.shape:
        msg = f"{name}: expected shape {tuple(expected.shape)}, found {tuple(actual.shape)}"
        raise AssertionError(msg)
    bound = atol * max(e.abs().max().item(), floor) + rtol * e.abs()
    err = (a - e).abs()
    bad = (err > bound) | ~torch.isfinite(a)
    if bad.any():
        idx = torch.argsort(err - bound, descending=True)[:5]
        rows = ", ".join(f"[{i}] {a[i].item():.6g} vs {e[i].item():.6g}" for i in idx.tolist())
        msg = (f"{name}: {int(bad.sum())}/{a.numel()} mismatches (max err {err.max().item():.3g}, "
               f"atol {atol}·max|e|, rtol {rtol}); worst: {rows}")
        raise AssertionError(msg)


def naive_clip_rect(v, g, s, offset: int, row_weight: float, col_weight: float):
    """Materialised weighted CLIP loss on an M×N logit matrix (columns only when square)."""
    return clip_loss_naive(v, g, s, offset=offset, row_weight=row_weight, col_weight=col_weight)


def naive_siglip_rect(v, g, s, b, offset: int):
    return siglip_loss_naive(v, g, s, b, offset=offset)
