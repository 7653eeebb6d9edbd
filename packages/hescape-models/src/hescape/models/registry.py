"""Named model configurations: ``create_model(name, **overrides)``, ``list_models(pattern)``.

Names follow ``<image encoder>_<gene encoder>_<size>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import warnings
from collections.abc import Callable

from .config import GeneEncoderCfg, ImageEncoderCfg, ModelCfg
from .errors import HescapeModelError
from .model import HescapeCLIP

__all__ = ["register_model", "list_models", "get_model_cfg", "create_model"]

_REGISTRY: dict[str, Callable[[], ModelCfg]] = {}


def register_model(fn: Callable[[], ModelCfg]) -> Callable[[], ModelCfg]:
    """Register a function returning a :class:`ModelCfg` under its name."""
    if fn.__name__ in _REGISTRY:
        warnings.warn(f"model {fn.__name__!r} is registered twice; the later one wins", stacklevel=2)
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_cfg(name: str) -> ModelCfg:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        msg = f"unknown model {name!r}: expected one of {list_models()}.{hint}"
        raise HescapeModelError(msg)
    return _REGISTRY[name]()


def create_model(name: str, *, n_genes: int, **overrides) -> HescapeCLIP:
    """Build a registered model for a panel of ``n_genes`` genes.

    ``overrides`` set top-level :class:`ModelCfg` fields (``embed_dim=64``, ``loss="siglip"``); ``None``
    values are dropped so the registered defaults apply.
    """
    cfg = get_model_cfg(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(ModelCfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        msg = f"unknown model option(s) {unknown}: expected some of {sorted(known)}"
        raise HescapeModelError(msg)
    cfg = dataclasses.replace(cfg, gene=dataclasses.replace(cfg.gene, n_genes=n_genes), **overrides)
    return HescapeCLIP(cfg)


@register_model
def vit_mlp_nano() -> ModelCfg:
    """4-block ViT (width 128) on 64 px patches + the paper's MLP gene tower: trains on a CPU in minutes."""
    return ModelCfg(image=ImageEncoderCfg(image_size=64, patch_size=8, width=128, depth=4, heads=4),
                    gene=GeneEncoderCfg(), embed_dim=128)


@register_model
def vit_mlp_tiny() -> ModelCfg:
    """ViT-Tiny (width 192, 12 blocks, 224 px, patch 16) + MLP gene tower."""
    return ModelCfg(image=ImageEncoderCfg(timm_name="vit_tiny_patch16_224", image_size=224, patch_size=16,
                                          width=192, depth=12, heads=3), gene=GeneEncoderCfg(), embed_dim=128)


@register_model
def vit_mlp_small() -> ModelCfg:
    """ViT-Small (width 384, 12 blocks, 224 px, patch 16) + MLP gene tower."""
    return ModelCfg(image=ImageEncoderCfg(timm_name="vit_small_patch16_224", image_size=224, patch_size=16,
                                          width=384, depth=12, heads=6), gene=GeneEncoderCfg(), embed_dim=128)
