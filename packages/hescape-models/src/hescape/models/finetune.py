"""How much of a pretrained tower trains: everything, nothing (frozen), or LoRA adapters through peft."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .config import FINETUNE_MODES
from .errors import HescapeModelError

__all__ = ["apply_finetune", "count_parameters"]


def _freeze_all(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def apply_finetune(encoder: nn.Module, mode: str, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.1,
                   targets: Sequence[str] = ()) -> nn.Module:
    """Set which parameters of ``encoder`` train, in place, and return it.

    Parameters
    ----------
    encoder
        An image or gene encoder (its published weights already loaded).
    mode
        ``full``: every parameter trains. ``frozen``: none does, and the encoder stays in eval mode (no dropout,
        fixed BatchNorm statistics), so its features are a deterministic function of its input. ``lora``: peft
        injects LoRA adapters (``r = rank``, ``lora_alpha = alpha``, ``lora_dropout = dropout``, no bias) into the
        modules whose names end with one of ``targets`` (default: the encoder's ``lora_targets``); only the
        adapters train. The reference uses r = 8, α = 16, dropout 0.1 on ViT ``qkv``/``proj`` (LoRA, Hu et al. 2021).

    Raises
    ------
    HescapeModelError
        Unknown mode, LoRA on an encoder without targets, or targets that match no module.
    """
    if mode not in FINETUNE_MODES:
        msg = f"unknown finetune mode {mode!r}: expected one of {FINETUNE_MODES}"
        raise HescapeModelError(msg)
    encoder.finetune_mode = mode
    if mode == "full":
        return encoder
    if mode == "frozen":
        _freeze_all(encoder)
        encoder.eval()
        return encoder
    targets = tuple(targets) or tuple(getattr(encoder, "lora_targets", ()))
    name = getattr(encoder, "encoder_name", type(encoder).__name__)
    if not targets:
        msg = (f"encoder {name!r} declares no LoRA target modules; give lora_targets=… (hescape-train: "
               f"model.image_lora_targets=… / model.gene_lora_targets=…) or use finetune=full/frozen")
        raise HescapeModelError(msg)
    names = [n for n, _ in encoder.named_modules()]
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not matched:
        msg = (f"encoder {name!r}: LoRA targets {list(targets)} match no module; module names end with e.g. "
               f"{sorted({n.rsplit('.', 1)[-1] for n in names if n})[:12]}")
        raise HescapeModelError(msg)
    from peft import LoraConfig, inject_adapter_in_model

    _freeze_all(encoder)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, encoder)
    for n, p in encoder.named_parameters():
        p.requires_grad_("lora_" in n)
    return encoder


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``{"total": …, "trainable": …}`` parameter counts (shared parameters counted once)."""
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}
