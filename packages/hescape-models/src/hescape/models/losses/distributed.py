"""Cross-rank feature gathering for contrastive losses (torch.distributed, any backend with all_gather).

``gather_features(..., gather_with_grad=True)`` concatenates every rank's features with an autograd-aware
all-gather: the backward pass all-reduces (sums) the incoming gradient and returns this rank's slice. Every rank
then holds ``world_size ×`` the gradient of the global loss with respect to its own features, which DDP's
gradient averaging turns back into the exact gradient (the same convention as open_clip's
``gather_features(gather_with_grad=True)``). With ``gather_with_grad=False`` the other ranks' features are
constants and only this rank's own slot carries gradient (open_clip's default; we keep the own slot even for a
local loss, so the positive pair is always differentiated).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import HescapeModelError

__all__ = ["all_gather_with_grad", "check_world", "gather_features"]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        world_size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # gloo has no reduce_scatter
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably. Every rank must pass the same shape."""
    return _AllGatherWithGrad.apply(x, group)


def _all_gather_keep_own(x: torch.Tensor, rank: int, group=None) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    with torch.no_grad():
        dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[rank] = x
    return torch.cat(parts, dim=0)


def check_world(rank: int, world_size: int, *, require_group: bool = True) -> None:
    """Validate ``rank``/``world_size``, and against the initialised process group when ``world_size > 1``."""
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        msg = f"expected 0 <= rank < world_size with world_size >= 1, found rank={rank}, world_size={world_size}"
        raise HescapeModelError(msg)
    if world_size == 1 or not require_group:
        return
    if not (dist.is_available() and dist.is_initialized()):
        msg = (f"world_size={world_size} expects an initialised torch.distributed process group, found none; "
               "call torch.distributed.init_process_group first or use world_size=1")
        raise HescapeModelError(msg)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        msg = (f"expected rank/world_size {rank}/{world_size} to match the process group, found "
               f"{dist.get_rank()}/{dist.get_world_size()}; pass rank=dist.get_rank(), "
               "world_size=dist.get_world_size()")
        raise HescapeModelError(msg)


def gather_features(img: torch.Tensor, gex: torch.Tensor | None, *, rank: int, world_size: int,
                    gather_with_grad: bool = True, group=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All ranks' image and gene features, concatenated in rank order (``gex=None`` gathers images only)."""
    check_world(rank, world_size)
    if world_size == 1:
        return img, gex
    gather = all_gather_with_grad if gather_with_grad else (lambda t, grp: _all_gather_keep_own(t, rank, grp))
    return gather(img, group), (None if gex is None else gather(gex, group))
