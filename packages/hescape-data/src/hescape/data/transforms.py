"""Gene-expression transforms applied to raw pseudo-spot counts before a gene encoder."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import HescapeDataError

__all__ = ["log1p", "normalize_total_log1p", "get_gene_transform", "GENE_TRANSFORMS"]


def log1p(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + x)`` of raw counts (the DRVI / MLP convention of HESCAPE)."""
    return torch.log1p(x.float())


def normalize_total_log1p(x: torch.Tensor, target_sum: float = 1e4) -> torch.Tensor:
    """Scale each row to ``target_sum`` total counts, then ``log1p``. Rows of zeros stay zero."""
    x = x.float()
    total = x.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.log1p(x / total * target_sum)


GENE_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x.float(),
    "log1p": log1p,
    "normalize_total_log1p": normalize_total_log1p,
}


def get_gene_transform(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Look up a gene transform by name (``identity``, ``log1p``, ``normalize_total_log1p``)."""
    try:
        return GENE_TRANSFORMS[name]
    except KeyError:
        msg = f"unknown gene transform {name!r}: expected one of {sorted(GENE_TRANSFORMS)}"
        raise HescapeDataError(msg) from None
