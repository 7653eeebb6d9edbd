"""``nn.TransformerEncoderLayer`` whose forward calls its submodules, so LoRA adapters on them take effect.

Nicheformer and scFoundation are stacks of ``torch.nn.TransformerEncoderLayer``. Their published weights load into
the stock layer, but LoRA (peft) adapters injected into it are silently ignored:

* in eval mode (and whenever no layer weight requires grad, as under LoRA) torch takes its fused fast path
  ``torch._transformer_encoder_layer_fwd``, which reads ``linear1.weight``, ``linear2.weight`` and
  ``self_attn.out_proj.weight`` directly and never calls the adapted modules;
* in every mode ``nn.MultiheadAttention`` reads ``out_proj.weight``/``bias`` directly, so an adapter on
  ``self_attn.out_proj`` (the HESCAPE reference's LoRA target for Nicheformer) never runs.

:class:`EncoderLayer` keeps the stock constructor, parameters and state-dict keys, and computes the same function
(post-norm or pre-norm, ReLU/GELU, dropout) by calling ``self_attn.out_proj``, ``linear1`` and ``linear2`` as
modules, with ``torch.nn.functional.scaled_dot_product_attention`` for the attention itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EncoderLayer"]


class EncoderLayer(nn.TransformerEncoderLayer):
    """A ``batch_first`` :class:`torch.nn.TransformerEncoderLayer` that LoRA adapters can see.

    Same constructor and state-dict keys as the stock layer (``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
    ``self_attn.out_proj.*``, ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*``); ``forward(src,
    src_key_padding_mask)`` with ``src`` ``(B, L, D)`` and the mask ``(B, L)`` True at padding (ignored as keys).
    """

    def __init__(self, *args, **kwargs):
        kwargs["batch_first"] = True
        super().__init__(*args, **kwargs)

    def _attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.self_attn
        b, n, d = x.shape
        h = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if self.training else 0.0)
        return self.dropout1(attn.out_proj(out.transpose(1, 2).reshape(b, n, d)))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if src_mask is not None or is_causal:
            msg = "EncoderLayer supports a key padding mask only (no attention mask, not causal)"
            raise NotImplementedError(msg)
        x = src
        if self.norm_first:
            x = x + self._attention(self.norm1(x), src_key_padding_mask)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._attention(x, src_key_padding_mask))
        return self.norm2(x + self._ff_block(x))
