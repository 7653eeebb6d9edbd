"""Projection heads from encoder features to the shared embedding: linear, MLP, transformer (paper Table 9)."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from .config import PROJECTIONS
from .errors import HescapeModelError

__all__ = ["ProjectionHead"]


def _heads_for(width: int, wanted: int = 8) -> int:
    return max(h for h in range(1, wanted + 1) if width % h == 0)


class ProjectionHead(nn.Module):
    """Map encoder features ``(B, in_dim)`` (or tokens ``(B, T, in_dim)``) to ``(B, out_dim)``.

    Parameters
    ----------
    in_dim, out_dim
        Encoder feature width and the shared embedding size d.
    kind
        ``linear``: one Linear. ``mlp``: timm ``Mlp`` with hidden width ``2·d``, GELU, LayerNorm and dropout
        (the HESCAPE reference's head, so its width does not grow with a 10k-wide gene tower). ``transformer``:
        a 4-layer ``nn.TransformerEncoder`` over the encoder's tokens (width ``in_dim``, 8 heads — fewer when
        ``in_dim`` is not divisible by 8 —, feed-forward ``d``), the first token, then a Linear; a tower
        without tokens gives its feature vector as a single token. Layer sizes follow the reference code's
        ``_build_head`` (peng-lab/hescape ``image_encoder.py``), which runs the encoder layer sequence-first on
        batch-first tokens; here attention runs over tokens (``batch_first=True``).
    dropout
        Dropout of the MLP head (the reference: 0.2).
    hidden
        Hidden width of the MLP head: ``None`` = ``2·d`` (the reference); ``0`` = ``in_dim`` (a plain two-layer
        projection as wide as the encoder); any other value is used as given.
    norm
        LayerNorm before the MLP head's second layer (the reference: yes).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", dropout: float = 0.2, hidden: int | None = None,
                 norm: bool = True):
        super().__init__()
        if kind not in PROJECTIONS:
            msg = f"unknown projection {kind!r}: expected one of {PROJECTIONS}"
            raise HescapeModelError(msg)
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            width = 2 * out_dim if hidden is None else (in_dim if hidden == 0 else hidden)
            if width < 1 or not 0.0 <= dropout < 1.0:
                msg = f"mlp projection head: expected hidden >= 0 and 0 <= dropout < 1, found {hidden}, {dropout}"
                raise HescapeModelError(msg)
            self.net = Mlp(in_dim, width, out_dim, drop=dropout, norm_layer=nn.LayerNorm if norm else None)
        else:
            layer = nn.TransformerEncoderLayer(in_dim, _heads_for(in_dim), dim_feedforward=out_dim, dropout=0.1,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
            self.net = nn.Linear(in_dim, out_dim)

    @property
    def wants_tokens(self) -> bool:
        return self.kind == "transformer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformer":
            tokens = x.unsqueeze(1) if x.ndim == 2 else x
            x = self.encoder(tokens)[:, 0]
        return self.net(x)
