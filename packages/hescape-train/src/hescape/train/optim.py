"""AdamW with decoupled weight decay on the right parameters, and the warm-up + cosine learning-rate schedule.

The schedule and the exclusions follow the CLIP recipe the HESCAPE paper trains with:

* learning rate: linear warm-up over ``warmup_steps`` then cosine decay to 0 at the last step (open_clip
  ``src/open_clip_train/scheduler.py``, ``cosine_lr``: ``lr * (step + 1) / warmup`` then
  ``0.5 * (1 + cos(pi * e / es)) * lr`` with ``e = step - warmup``, ``es = steps - warmup``);
* no weight decay on gains and biases — every parameter with fewer than 2 dimensions (biases, LayerNorm /
  BatchNorm weights, ``logit_scale``, ``logit_bias``), as open_clip ``src/open_clip_train/main.py`` excludes
  ``p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name`` — and none on the names a timm model lists in its
  ``no_weight_decay()`` (position embeddings and class/register tokens: timm ``vision_transformer.py``
  ``VisionTransformer.no_weight_decay`` → ``{"pos_embed", "cls_token", "dist_token"}``; timm
  ``optim/_param_groups.py`` ``param_groups_weight_decay`` applies them the same way), or in an encoder's
  ``no_weight_decay_names`` (hescape-models). Parameters that do not train (``requires_grad=False``: frozen
  trunks, the base weights under LoRA) are left out of the optimiser.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["lr_at", "no_weight_decay_names", "param_groups", "build_optimizer"]


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``.

    ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, then
    ``lr * 0.5 * (1 + cos(pi * min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps))))``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names a submodule excludes from weight decay: timm's ``no_weight_decay()`` of any submodule
    (names relative to it), and hescape-models encoders' ``no_weight_decay_names`` (relative to the encoder)."""
    names: set[str] = set()
    params = {n for n, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        listed: set[str] = set(getattr(module, "no_weight_decay_names", ()) or ())
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            try:
                listed |= set(fn())
            except TypeError:  # a no_weight_decay that is not timm's (takes arguments)
                pass
        for n in listed:
            full = f"{prefix}.{n}" if prefix else n
            if full in params:
                names.add(full)
            else:  # timm lists some names as prefixes of parameters (e.g. "pos_embed" of a wrapped module)
                names.update(p for p in params if p.startswith(full + "."))
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: ``{"params", "names", "weight_decay"}`` with decay, and
    without (see the module docstring for which parameters go where). Empty groups are kept (stable layout)."""
    skip = no_weight_decay_names(model)
    decay, no_decay = {"names": [], "params": []}, {"names": [], "params": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if (p.ndim < 2 or name.endswith(".bias") or name in skip) else decay
        group["names"].append(name)
        group["params"].append(p)
    return [{**decay, "weight_decay": weight_decay}, {**no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg`` an :class:`~hescape.train.config.OptimConfig`."""
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
