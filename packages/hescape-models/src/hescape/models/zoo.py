"""The encoder registry: one entry = architecture + weights + input contract.

``create_image_encoder(name, weights=…, **options)`` and ``create_gene_encoder(name, weights=…, panel=…,
**options)`` build a registered encoder, give it its contract and load its weights. Built-in families
register themselves in :mod:`hescape.models.image` and :mod:`hescape.models.gene`; a user package adds an
encoder without editing ours by declaring an entry point in the group ``hescape.image_encoders`` or
``hescape.gene_encoders`` whose object is an :class:`EncoderEntry`, a list of them, or a function returning
either::

    [project.entry-points."hescape.image_encoders"]
    my_vit = "my_package.encoders:my_vit_entry"
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from .base import GeneEncoder, ImageEncoder, as_panel
from .contracts import GeneContract, ImageContract, contract_from_dict
from .errors import HescapeModelError
from .weights import WeightsSpec, load_weights, resolve_weights

__all__ = ["EncoderEntry", "register_encoder", "get_encoder_entry", "list_image_encoders", "list_gene_encoders",
           "create_image_encoder", "create_gene_encoder", "describe_encoders", "ENTRY_POINT_GROUPS"]

ENTRY_POINT_GROUPS = {"image": "hescape.image_encoders", "gene": "hescape.gene_encoders"}
_BUILTIN_MODULES = ("hescape.models.image", "hescape.models.gene")


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder.

    Parameters
    ----------
    name
        Registry name (``uni``, ``nicheformer``, …).
    modality
        ``"image"`` or ``"gene"``.
    builder
        ``builder(**options)`` (image) or ``builder(panel=…, **options)`` (gene) returning a randomly initialised
        :class:`~hescape.models.base.ImageEncoder` / :class:`~hescape.models.base.GeneEncoder`.
    contract
        Default input contract (a checkpoint may record another, which then wins).
    out_dim
        Feature dimension at the default options (``None`` when it depends on the panel).
    pooling
        How token features become one vector (``cls``, ``cls+mean``, ``mean``, ``attentional``, …).
    weights
        Where the published weights are and how to load them; ``None`` for random-init-only encoders.
    lora_targets
        Module-name suffixes LoRA adapts by default (peft ``target_modules``).
    params
        Parameter count at the default options, from the facts sheet (checked by the tests on the meta device).
    description
        One line for ``list``: what it is and the source of its facts.
    pretrained
        Whether the encoder is meant to run with trained weights (default: it has a :class:`WeightsSpec`).
    default_finetune
        Fine-tuning mode when a configuration gives none: ``frozen`` for pretrained encoders, else ``full``.
    """

    name: str
    modality: str
    builder: Callable[..., nn.Module]
    contract: ImageContract | GeneContract
    out_dim: int | None = None
    pooling: str = ""
    weights: WeightsSpec | None = None
    lora_targets: tuple[str, ...] = ()
    params: int | None = None
    description: str = ""
    pretrained: bool | None = None
    default_finetune: str | None = None

    def __post_init__(self):
        # A pretrained encoder is one with published (or separately trained) weights; it defaults to a frozen trunk
        # (the paper's benchmark setting) and refuses frozen/LoRA training on a random init.
        if self.pretrained is None:
            object.__setattr__(self, "pretrained", self.weights is not None)
        if self.default_finetune is None:
            object.__setattr__(self, "default_finetune", "frozen" if self.pretrained else "full")
        if self.modality not in ENTRY_POINT_GROUPS:
            msg = f"encoder {self.name!r}: modality must be 'image' or 'gene', found {self.modality!r}"
            raise HescapeModelError(msg)
        if self.contract.kind != self.modality:
            msg = f"encoder {self.name!r}: a {self.modality} encoder needs a {self.modality} contract"
            raise HescapeModelError(msg)

    def summary(self) -> dict[str, Any]:
        """Plain-value description (for ``list`` output and run records)."""
        return {"name": self.name, "modality": self.modality, "out_dim": self.out_dim, "pooling": self.pooling,
                "params": self.params, "lora_targets": list(self.lora_targets), "contract": self.contract.to_dict(),
                "pretrained": self.pretrained, "default_finetune": self.default_finetune,
                "weights": None if self.weights is None else {
                    "hf_id": self.weights.hf_id, "files": list(self.weights.files), "licence": self.weights.licence,
                    "gated": self.weights.gated, "url": self.weights.url},
                "description": self.description}


_REGISTRY: dict[str, dict[str, EncoderEntry]] = {"image": {}, "gene": {}}
_loaded = False


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    """Add ``entry`` to the registry (a later entry of the same name replaces it, with a warning)."""
    reg = _REGISTRY[entry.modality]
    if entry.name in reg and reg[entry.name] is not entry:
        warnings.warn(f"{entry.modality} encoder {entry.name!r} is registered twice; the later one wins", stacklevel=2)
    reg[entry.name] = entry
    return entry


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    for modality, group in ENTRY_POINT_GROUPS.items():
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, EncoderEntry):
                    obj = obj()
                entries = [obj] if isinstance(obj, EncoderEntry) else list(obj)
                for e in entries:
                    if not isinstance(e, EncoderEntry) or e.modality != modality:
                        msg = f"expected {modality} EncoderEntry objects, found {type(e).__name__}"
                        raise TypeError(msg)
                    register_encoder(e)
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break the built-in encoders
                warnings.warn(f"encoder plugin {ep.name!r} ({ep.value}) of group {group} failed to load: {e}",
                              stacklevel=2)


def reload_plugins() -> None:
    """Scan the entry points again (after installing a plugin in a running process)."""
    global _loaded
    _loaded = False
    _load_plugins()


def get_encoder_entry(name: str, modality: str) -> EncoderEntry:
    _load_plugins()
    reg = _REGISTRY[modality]
    if name not in reg:
        close = difflib.get_close_matches(name, list(reg), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        msg = f"unknown {modality} encoder {name!r}: expected one of {sorted(reg)}.{hint}"
        raise HescapeModelError(msg)
    return reg[name]


def list_image_encoders() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY["image"])


def list_gene_encoders() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY["gene"])


def describe_encoders() -> list[dict[str, Any]]:
    """Every registered encoder with its contract, weights source and parameter count."""
    _load_plugins()
    return [e.summary() for m in ("image", "gene") for e in sorted(_REGISTRY[m].values(), key=lambda e: e.name)]


def _contract(entry: EncoderEntry, contract) -> ImageContract | GeneContract:
    if contract is None:
        return entry.contract
    if isinstance(contract, dict):
        contract = contract_from_dict(contract)
    if contract.kind != entry.modality:
        msg = f"encoder {entry.name!r}: expected a {entry.modality} contract, found a {contract.kind} one"
        raise HescapeModelError(msg)
    return contract


def _finish(enc: nn.Module, entry: EncoderEntry, contract, weights) -> nn.Module:
    # A recorded contract wins; else the one the builder set for its options (e.g. another input size); else the
    # entry's default.
    enc.contract = _contract(entry, contract) if contract is not None else getattr(enc, "contract", entry.contract)
    enc.encoder_name = entry.name
    if not getattr(enc, "lora_targets", ()):
        enc.lora_targets = entry.lora_targets
    if not hasattr(enc, "weights_tag"):  # a builder that loaded its own weights (DRVI's model_dir) set its tag
        enc.weights_tag = "random-init"
    if weights is not None:
        if entry.weights is None:
            msg = (f"encoder {entry.name!r} loads no weights file through weights= (it is random-init only, or takes "
                   f"its trained model through its own options, e.g. model_dir=); drop weights={weights!r}")
            raise HescapeModelError(msg)
        enc.weights_tag = load_weights(enc, weights, entry.weights, entry.name)
    return enc


def _check_weights_first(entry: EncoderEntry, weights) -> None:
    """Find a weights file before building the architecture (a typo must not cost a 1-billion-parameter build)."""
    if weights is None or entry.weights is None or isinstance(weights, dict) or not isinstance(weights, str | os.PathLike):
        return
    if str(weights) == "hf" or str(weights).startswith("hf:"):
        return
    resolve_weights(weights, entry.weights, entry.name)


def _create(entry: EncoderEntry, base: type, weights, contract, options: dict, inputs: dict) -> nn.Module:
    """Find the weights, build ``entry`` with ``inputs`` and ``options``, check its type, attach contract + weights."""
    _check_weights_first(entry, weights)
    try:
        enc = entry.builder(**inputs, **_options(entry, options))
    except TypeError as e:
        msg = f"{entry.modality} encoder {entry.name!r}: bad option(s) {sorted(options)}: {e}"
        raise HescapeModelError(msg) from None
    if not isinstance(enc, base):
        msg = (f"{entry.modality} encoder {entry.name!r}: its builder returned {type(enc).__name__}, expected "
               f"{base.__name__}")
        raise HescapeModelError(msg)
    return _finish(enc, entry, contract, weights)


def _options(entry: EncoderEntry, options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def create_image_encoder(name: str, weights=None, *, contract: ImageContract | dict | None = None,
                         **options) -> ImageEncoder:
    """Build the image encoder ``name``.

    Parameters
    ----------
    name
        Registry name (:func:`list_image_encoders`).
    weights
        ``None`` (random init), a weights file or directory, ``"hf"`` (download when online and granted) or a state
        dict in the published layout.
    contract
        Input contract to use instead of the entry's default (a checkpoint's recorded one).
    **options
        Architecture options of the entry's builder (tiny configurations for tests, pooling choices).

    Raises
    ------
    HescapeModelError
        Unknown name or option; :class:`~hescape.models.weights.WeightsError` for weights that do not fit.
    """
    return _create(get_encoder_entry(name, "image"), ImageEncoder, weights, contract, options, {})


def create_gene_encoder(name: str, weights=None, *, panel: Sequence[str] | None = None,
                        gene_ids: Sequence[str] | None = None, contract: GeneContract | dict | None = None,
                        **options) -> GeneEncoder:
    """Build the gene encoder ``name`` for a gene ``panel`` (the dataset's genes, in column order).

    Parameters are those of :func:`create_image_encoder`, plus ``panel`` (gene names) and ``gene_ids`` (their
    Ensembl ids, the manifest's ``gene_ids``, when known). Builders are called as ``builder(panel=…,
    gene_ids=…, **options)``. Encoders with a pretrained vocabulary map the panel into it (Ensembl id first,
    then symbol) and report the coverage; the MLP takes the panel as its input layer.
    """
    entry = get_encoder_entry(name, "gene")
    panel = as_panel(panel, name=name)
    ids = None if gene_ids is None else tuple(str(g) for g in gene_ids)
    if ids is not None and len(ids) != len(panel):
        msg = f"gene encoder {name!r}: {len(ids)} gene_ids for a panel of {len(panel)} genes"
        raise HescapeModelError(msg)
    return _create(entry, GeneEncoder, weights, contract, options, {"panel": panel, "gene_ids": ids})


def replace_contract(entry: EncoderEntry, **changes) -> EncoderEntry:
    """A copy of ``entry`` with contract fields changed (for variants of one architecture)."""
    return dataclasses.replace(entry, contract=dataclasses.replace(entry.contract, **changes))
