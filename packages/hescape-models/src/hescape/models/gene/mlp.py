"""Gene-expression MLPs trained from scratch: the paper's baseline and the reference code's smaller form."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..base import GeneEncoder
from ..contracts import GeneContract
from ..errors import HescapeModelError
from ..zoo import EncoderEntry, register_encoder

__all__ = ["MLPGeneEncoder", "SmallMLPGeneEncoder"]


class MLPGeneEncoder(GeneEncoder):
    """The paper's MLP (section 3): two layers, hidden width ``hidden_mult × G`` (2 × the panel).

    ``(B, G)`` raw counts → ``log1p`` (the contract) → Linear(G, h) → LayerNorm → GELU → Dropout → Linear(h, h),
    ``out_dim = h``.
    """

    def __init__(self, panel: Sequence[str], gene_ids: Sequence[str] | None = None, hidden_mult: int = 2, dropout: float = 0.1):
        super().__init__()
        if hidden_mult < 1 or not 0.0 <= dropout < 1.0:
            msg = f"mlp gene encoder: expected hidden_mult >= 1 and 0 <= dropout < 1, found {hidden_mult}, {dropout}"
            raise HescapeModelError(msg)
        self.panel = tuple(panel)
        hidden = hidden_mult * len(self.panel)
        self.net = nn.Sequential(nn.Linear(len(self.panel), hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.out_dim = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallMLPGeneEncoder(GeneEncoder):
    """The reference code's ``generic`` encoder: Linear(G, w), then ``layers`` × [BatchNorm, ReLU, Dropout(0.1),
    Linear(w, w)], then BatchNorm and ReLU; ``out_dim = w`` (peng-lab/hescape ``gexp_encoder.py``)."""

    def __init__(self, panel: Sequence[str], gene_ids: Sequence[str] | None = None, width: int = 128, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.panel = tuple(panel)
        mods: list[nn.Module] = [nn.Linear(len(self.panel), width)]
        for _ in range(layers):
            mods += [nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width)]
        mods += [nn.BatchNorm1d(width), nn.ReLU()]
        self.net = nn.Sequential(*mods)
        self.out_dim = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


register_encoder(EncoderEntry(
    name="mlp", modality="gene", builder=MLPGeneEncoder, contract=GeneContract(preprocessing="log1p"),
    pooling="none", description="two-layer MLP, hidden 2 × panel, on log1p counts (the paper's baseline; from scratch)"))
register_encoder(EncoderEntry(
    name="mlp_small", modality="gene", builder=SmallMLPGeneEncoder, contract=GeneContract(preprocessing="log1p"),
    out_dim=128, pooling="none",
    description="Linear(G,128) + 3 × [BN, ReLU, Dropout, Linear(128,128)] (the reference code's 'generic' form)"))
