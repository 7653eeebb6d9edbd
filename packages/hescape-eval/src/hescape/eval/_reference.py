"""Pure-torch blockwise match ranks: the reference implementation and the fallback backend.

Scores come from one ``q_block @ g.T`` product per block, and each row's threshold is read out of the
same product it is compared with, so ties are consistent within a row whatever the BLAS does.
"""

from __future__ import annotations

import torch

__all__ = ["torch_ranks"]


def torch_ranks(q: torch.Tensor, g: torch.Tensor, q_labels: torch.Tensor | None, g_labels: torch.Tensor | None,
                *, block_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks, best-positive scores and best-positive indices (see :mod:`hescape.eval._backend`).

    ``q`` and ``g`` are validated float32/float64 matrices on one device; labels are int64 or ``None``
    (diagonal positives). Memory is ``O(block_size · N_g)``.
    """
    nq, ng = q.shape[0], g.shape[0]
    dev = q.device
    ranks = torch.empty(nq, dtype=torch.int64, device=dev)
    best = torch.empty(nq, dtype=q.dtype, device=dev)
    best_idx = torch.empty(nq, dtype=torch.int64, device=dev)
    cols = torch.arange(ng, device=dev)
    for start in range(0, nq, block_size):
        stop = min(start + block_size, nq)
        s = q[start:stop] @ g.T  # (b, ng)
        if q_labels is None:
            p = torch.arange(start, stop, device=dev)
            t = s.gather(1, p.unsqueeze(1))
        else:
            pos = q_labels[start:stop].unsqueeze(1) == g_labels.unsqueeze(0)
            t = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
            # first (lowest-index) positive reaching the maximum; argmax returns the first maximum
            p = (pos & (s == t)).to(torch.int8).argmax(dim=1)
        higher = (s > t).sum(dim=1)
        tie_before = ((s == t) & (cols.unsqueeze(0) < p.view(-1, 1))).sum(dim=1)
        ranks[start:stop] = higher + tie_before
        best[start:stop] = t.view(-1)
        best_idx[start:stop] = p.view(-1)
    return ranks, best, best_idx
