"""Loading published encoder weights: safetensors or ``torch.load(weights_only=True)``, never pickle code.

A :class:`WeightsSpec` says where an encoder's weights come from (files accepted in a directory, Hugging Face
repository, licence, gated access) and how to turn the published key layout into ours (``convert``). Every
failure — no file, a gated repository without access, a file that is not a state dict, missing, unexpected or
mis-shaped keys — is one :class:`WeightsError` naming the file, what it lacks and how to get the right one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import HescapeModelError

#: File names accepted in a weights directory for every encoder (Hugging Face's two conventions).
STANDARD_FILES = ("model.safetensors", "pytorch_model.bin")

__all__ = ["STANDARD_FILES", "WeightsSpec", "WeightsError", "read_state_dict", "resolve_weights", "load_weights", "file_digest"]


class WeightsError(HescapeModelError):
    """Weights that cannot be found, read or loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where an encoder's published weights live and how their keys map to ours.

    Parameters
    ----------
    files
        File names accepted inside a weights directory, in order of preference (e.g. ``("model.safetensors",
        "pytorch_model.bin")``).
    hf_id
        Hugging Face repository (``weights="hf"`` downloads from it when online and access is granted).
    licence
        Licence of the weights, as published.
    gated
        Whether the repository asks users to accept terms before download.
    url
        Where a person gets the weights (model card, paper repository).
    convert
        ``state_dict -> state_dict`` from the published layout to this package's modules (unwrap, rename,
        drop buffers); ``None`` when the layouts agree.
    ignore
        Regular expressions of our keys that a published file may lack (non-persistent buffers).
    """

    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    hf_id: str | None = None
    licence: str = "unknown"
    gated: bool = False
    url: str | None = None
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    ignore: tuple[str, ...] = ()

    def how_to_get(self) -> str:
        where = self.url or (f"https://huggingface.co/{self.hf_id}" if self.hf_id else "its authors")
        gate = " (gated: accept its terms there and log in with `huggingface-cli login`)" if self.gated else ""
        return f"download {' or '.join(self.files)} from {where}{gate}; licence {self.licence}"


def file_digest(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file (hex), streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _numpy_plain_values() -> list:
    """numpy scalar and dtype classes: plain values a training checkpoint may hold beside its tensors (a Lightning
    checkpoint's learning rates computed with ``np.cos``). Allowing them runs no code; every other global stays
    refused. Files written under numpy < 2 name the scalar ``numpy.core.multiarray.scalar``."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    classes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                           "uint8", "bool")]
    return [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            *classes]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``.

    Raises
    ------
    WeightsError
        The file is missing, truncated, executes code when unpickled, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"weights file {path} does not exist"
        raise WeightsError(msg)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            msg = f"weights file {path}: expected a safetensors file, found one that cannot be read ({e})"
            raise WeightsError(msg) from None
    try:
        with torch.serialization.safe_globals(_numpy_plain_values()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean the same here
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+) was not", text)
        if refused or "Weights only load failed" in text:
            what = refused.group(1) if refused else "pickled objects that are not tensors or plain values"
            msg = (f"weights file {path}: refused to unpickle {what} (loading it could run code; weights are loaded "
                   f"with weights_only=True); get the published tensors-only file (.safetensors or pytorch_model.bin) "
                   f"from the encoder's authors, or have the file's producer re-save just its state dict")
        else:
            first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
            msg = (f"weights file {path}: expected tensors saved with torch.save or a .safetensors file, found a file "
                   f"that cannot be read ({first}); the file may be truncated or of another format")
        raise WeightsError(msg) from None
    if not isinstance(obj, Mapping):
        msg = f"weights file {path}: expected a dict of tensors, found {type(obj).__name__}"
        raise WeightsError(msg)
    return dict(obj)


def resolve_weights(source: str | os.PathLike, spec: WeightsSpec, name: str) -> Path:
    """The weights file for ``source``: a file, a directory holding one of ``spec.files``, or ``"hf"``."""
    if str(source) == "hf" or str(source).startswith("hf:"):
        repo = str(source)[3:] or spec.hf_id if str(source) != "hf" else spec.hf_id
        if not repo:
            msg = f"encoder {name!r} has no Hugging Face repository; give a local weights path"
            raise WeightsError(msg)
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            msg = (f"weights='hf' needs huggingface_hub; pip install huggingface_hub, or {spec.how_to_get()} and "
                   "pass the local path")
            raise WeightsError(msg) from None
        errors = []
        for fname in spec.files:
            try:
                return Path(hf_hub_download(repo, fname))
            except Exception as e:  # noqa: BLE001 - offline, gated, missing file: report them all at once
                errors.append(f"{fname}: {type(e).__name__}")
        msg = (f"encoder {name!r}: cannot download weights from {repo} ({'; '.join(errors)}); "
               f"{spec.how_to_get()}, then pass weights=/path/to/the/file")
        raise WeightsError(msg)
    path = Path(source).expanduser()
    if path.is_dir():
        names = list(dict.fromkeys((*spec.files, *STANDARD_FILES)))
        present = [path / f for f in names if (path / f).is_file()]
        if len(present) > 1:
            msg = (f"encoder {name!r}: {path} holds several weights files ({', '.join(p.name for p in present)}); "
                   f"expected one — pass the file you mean, e.g. weights={present[0]}")
            raise WeightsError(msg)
        if present:
            return present[0]
        found = sorted(p.name for p in path.iterdir())[:8]
        msg = (f"encoder {name!r}: expected one of {list(spec.files)} in {path}, found {found}; "
               f"{spec.how_to_get()}")
        raise WeightsError(msg)
    if not path.is_file():
        msg_0 = f"encoder {name!r}: weights path {path} does not exist; {spec.how_to_get()}"
        raise WeightsError(msg_0)
    return path


def _short(keys, n: int = 6) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _layout_hint(unexpected: list[str], own: set[str]) -> str:
    """A hint when the unexpected keys are ours with a common extra segment (``module.`` of DataParallel, …)."""
    for extra in ("module.", "model.", "backbone.", "_orig_mod.", "encoder."):
        if unexpected and all(extra in k and k.replace(extra, "", 1) in own for k in unexpected):
            return f" (its keys carry an extra {extra!r}, which the published file does not: strip it)"
    return ""


def load_weights(module: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], spec: WeightsSpec,
                 name: str) -> str:
    """Load published weights into ``module`` with no missing, unexpected or mis-shaped key.

    Parameters
    ----------
    module
        The randomly initialised encoder.
    source
        A file, a directory, ``"hf"``/``"hf:<repo>"``, or an in-memory state dict in the published layout.
    spec
        The encoder's :class:`WeightsSpec` (its ``convert`` maps the published layout to ours).
    name
        The encoder's registry name (for messages).

    Returns
    -------
    str
        A weights tag for checkpoints: ``"<file name> sha256:<first 16 hex>"`` (``"state-dict"`` in memory).
    """
    if isinstance(source, Mapping):
        sd, where, tag = dict(source), "the given state dict", "state-dict"
    else:
        path = resolve_weights(source, spec, name)
        sd, where = read_state_dict(path), str(path)
        tag = f"{path.name} sha256:{file_digest(path)[:16]}"
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if spec.convert is not None:
        try:
            sd = spec.convert(sd)
        except KeyError as e:
            msg = f"encoder {name!r}: {where} lacks the key {e} of the published layout; {spec.how_to_get()}"
            raise WeightsError(msg) from None
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        hint = next((f" (the tensors are wrapped in {k.rsplit('.', 1)[-1]!r}: save that entry alone)" for k in bad
                     if isinstance(sd[k], Mapping)), "")
        msg = f"encoder {name!r}: {where} holds non-tensor entries ({_short(bad)}); expected a state dict{hint}"
        raise WeightsError(msg)
    own = module.state_dict()
    ignore = [re.compile(p) for p in spec.ignore]
    missing = [k for k in own if k not in sd and not any(p.search(k) for p in ignore)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        hint = _layout_hint(unexpected, set(own))
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_short(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped: {_short(shapes, 3)}")
        msg = (f"encoder {name!r}: {where} does not match the architecture ({'; '.join(parts)}){hint}; expected the "
               f"published weights of {name}: {spec.how_to_get()}")
        raise WeightsError(msg)
    module.load_state_dict(sd, strict=False)
    return tag
