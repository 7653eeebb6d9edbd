"""Checkpoints of a run: weights as safetensors, the rest as tensors and plain values, written atomically.

Layout under ``RUN_DIR/checkpoints/``::

    index.json                    {"format", "last": "step-00000688", "best": "step-00000645", "step", ...}
    step-00000645/model.safetensors   the weights (safetensors; metadata: format, step, model_cfg, genes)
    step-00000645/state.pt            everything else (TrainState.side_state() + run facts), torch.save
    step-00000688/...

Exactly two checkpoints are kept: the last one and the one with the best validation score (one directory when
they coincide). A checkpoint is written as a whole: both files go to a temporary directory
(``.tmp-step-…``), each is fsync-ed, the directory is renamed into place, then ``index.json`` is replaced
atomically, and only then is the checkpoint it no longer names deleted. A process killed at any instant leaves
``index.json`` naming complete checkpoints; leftovers (temporary or unnamed directories) are removed by the next
:meth:`Checkpointer.clean`. Nothing is ever unpickled: ``state.pt`` is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings, lists, tuples, dicts only) and ``model.safetensors`` with safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from hescape.data.outputs import dir_mode, file_mode

from .atomic import atomic_write_json, fsync_dir
from .errors import HescapeConfigError
from .faults import fault_point

__all__ = ["FORMAT", "Checkpointer", "save_weights", "load_weights", "read_weights_metadata", "resolve_checkpoint",
           "load_model_checkpoint", "read_checkpoint"]

#: ``format`` of index.json, of the safetensors metadata and of state.pt.
FORMAT = "hescape-train-checkpoint/1"
WEIGHTS = "model.safetensors"
SIDE = "state.pt"
INDEX = "index.json"
_STEP_DIR = re.compile(r"^step-\d{8,}$")


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``state_dict`` as safetensors at ``path`` and fsync it. Tensors sharing storage are stored as copies
    (safetensors refuses shared storage; ``load_state_dict`` restores the sharing from the module)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for k, v in state_dict.items():
        t = v.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        tensors[k] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())
    _fsync_file(path)


def read_weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (``{}`` when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _unsafe(path: Path, e: Exception, what: str) -> HescapeConfigError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return HescapeConfigError(f"{what}: expected a hescape-train checkpoint (safetensors weights, a side file of "
                              f"tensors and plain values), found {path}, a file torch cannot load safely "
                              f"({type(e).__name__}: {first}); give a run directory or one of its checkpoints")


def load_side(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``state.pt`` read with ``torch.load(weights_only=True)``; refuses anything else in one line."""
    path = Path(path)
    try:
        side = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad or unsafe file
        raise _unsafe(path, e, what) from None
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        found = side.get("format") if isinstance(side, dict) else type(side).__name__
        msg = f"{what}: {path} is not a {FORMAT} side file (found format {found!r}); the file is from elsewhere"
        raise HescapeConfigError(msg)
    return side


class Checkpointer:
    """Writes and reads the checkpoints of one run directory (see the module docstring for the layout)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"

    @staticmethod
    def name_for(step: int) -> str:
        """Directory name of the checkpoint taken after ``step`` optimiser steps."""
        return f"step-{step:08d}"

    def read_index(self) -> dict | None:
        """``index.json`` as a dict, or None before the first checkpoint."""
        p = self.dir / INDEX
        if not p.is_file():
            return None
        try:
            index = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            msg = f"{p} cannot be read ({e}); the run directory is damaged"
            raise HescapeConfigError(msg) from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or "last" not in index:
            msg = f"{p}: expected a {FORMAT} index, found {str(index)[:120]!r}"
            raise HescapeConfigError(msg)
        return index

    def path(self, name: str) -> Path:
        return self.dir / name

    def save(self, state, run_facts: dict, weights_metadata: dict[str, str]) -> str:
        """Write ``state`` (a :class:`~hescape.train.state.TrainState`) as checkpoint ``name_for(state.step)``,
        make it the last one in ``index.json`` (and ``state.best_dir`` the best), delete the others.

        ``run_facts`` (model_cfg, encoders, genes, config, …) go into the side file beside the state;
        ``weights_metadata`` (strings) into the safetensors header. Returns the checkpoint's name.
        """
        self.dir.mkdir(exist_ok=True)
        name = self.name_for(state.step)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.dir))
        try:
            os.chmod(tmp, dir_mode())  # mkdtemp makes 0700; give the directory the usual permissions
            meta = {"format": FORMAT, "step": str(state.step), **weights_metadata}
            save_weights(tmp / WEIGHTS, state.model.state_dict(), meta)
            fault_point("checkpoint_partial")
            side = {"format": FORMAT, **state.side_state(), **run_facts}
            torch.save(side, tmp / SIDE)
            _fsync_file(tmp / SIDE)
            fsync_dir(tmp)
            final = self.dir / name
            if final.exists():  # the same step written again by a resumed run: replace it whole
                trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=self.dir))
                os.replace(final, trash / name)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.dir)
        fault_point("checkpoint_before_index")
        best = state.best_dir if state.best_dir else None
        atomic_write_json(self.dir / INDEX, {"format": FORMAT, "last": name, "best": best, "step": state.step,
                                             "epoch": state.epoch, "batch": state.batch,
                                             "best_epoch": state.best_epoch})
        fault_point("checkpoint_after_index")
        self.clean({name, best} - {None})
        return name

    def clean(self, keep: set[str] | None = None) -> None:
        """Delete temporary directories and every checkpoint not in ``keep`` (default: those index.json names)."""
        if not self.dir.is_dir():
            return
        if keep is None:
            index = self.read_index() or {}
            keep = {index.get("last"), index.get("best")} - {None}
        for p in self.dir.iterdir():
            if p.is_dir() and (p.name.startswith((".tmp-", ".old-")) or (_STEP_DIR.match(p.name) and p.name not in keep)):
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(self.dir)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Weights and side file of checkpoint ``name``; refuses a pair whose steps differ."""
        d = self.dir / name
        weights, side = _read_pair(d, f"checkpoint {d}")
        return weights, side


def _read_pair(d: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not (d / WEIGHTS).is_file() or not (d / SIDE).is_file():
        msg = f"{what}: expected {WEIGHTS} and {SIDE} in {d}, found {sorted(p.name for p in d.iterdir())}"
        raise HescapeConfigError(msg)
    side = load_side(d / SIDE, what)
    try:
        meta = read_weights_metadata(d / WEIGHTS)
        weights = load_weights(d / WEIGHTS)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise _unsafe(d / WEIGHTS, e, what) from None
    if meta.get("step") != str(side.get("step")):
        msg = (f"{what}: {WEIGHTS} is from step {meta.get('step')} but {SIDE} from step {side.get('step')}; the "
               "two files come from different checkpoints")
        raise HescapeConfigError(msg)
    return weights, side


# -- model.init_checkpoint: a run directory, a checkpoint directory or file, or a checkpoint.pt of version 0.1 --

def resolve_checkpoint(path: str | os.PathLike, what: str = "model.init_checkpoint") -> Path:
    """The checkpoint directory (or legacy single file) that ``path`` names.

    A run directory or its ``checkpoints`` folder → the best checkpoint in ``index.json``; a checkpoint directory,
    or its ``model.safetensors`` / ``state.pt`` → that directory; any other file → a single-file checkpoint of
    hescape-train 0.1 (``checkpoint.pt``), read with ``torch.load(weights_only=True)``.
    """
    p = Path(path)
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            if (folder / INDEX).is_file():
                index = Checkpointer(folder.parent).read_index() or {}
                name = index.get("best") or index.get("last")
                return folder / name
        if (p / WEIGHTS).is_file():
            return p
        msg = (f"{what}={str(path)!r}: expected a run directory (with checkpoints/{INDEX}) or a checkpoint directory "
               f"(with {WEIGHTS}), found a directory without either; give the run directory of a finished run")
        raise HescapeConfigError(msg)
    if p.is_file():
        return p.parent if p.name in (WEIGHTS, SIDE) else p
    msg = f"{what}={str(path)!r} does not exist; give a run directory or a checkpoint of an earlier run"
    raise HescapeConfigError(msg)


def load_model_checkpoint(path: str | os.PathLike, what: str = "model.init_checkpoint") -> dict:
    """``{"model_cfg": dict, "genes": list, "state_dict": dict, "source": Path}`` of the checkpoint at ``path``
    (see :func:`resolve_checkpoint`). Only the weights and their metadata are read (not the optimiser state).

    Raises
    ------
    HescapeConfigError
        A path that names no checkpoint, a file that is not safetensors or not loadable with ``weights_only=True``
        (pickled code is never run), or a checkpoint without its model configuration.
    """
    src = resolve_checkpoint(path, what)
    if src.is_dir():
        weights_file = src / WEIGHTS
        try:
            meta = read_weights_metadata(weights_file)
            state_dict = load_weights(weights_file)
        except Exception as e:  # noqa: BLE001
            raise _unsafe(weights_file, e, f"{what}={str(path)!r}") from None
        try:
            model_cfg, genes = json.loads(meta["model_cfg"]), json.loads(meta["genes"])
        except (KeyError, ValueError):
            msg = (f"{what}={str(path)!r}: {weights_file} has no hescape-train model configuration in its metadata; "
                   "give a checkpoint written by hescape-train")
            raise HescapeConfigError(msg) from None
        return {"model_cfg": model_cfg, "genes": genes, "state_dict": state_dict, "source": weights_file}
    try:  # a single-file checkpoint.pt of hescape-train 0.1; weights_only: loading it cannot run code
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad or unsafe file
        raise _unsafe(src, e, f"{what}={str(path)!r}") from None
    if not isinstance(ckpt, dict):
        msg = f"{what}={str(path)!r}: expected a hescape-train checkpoint (a dict), found {type(ckpt).__name__}"
        raise HescapeConfigError(msg)
    return {"model_cfg": ckpt.get("model_cfg"), "genes": list(ckpt.get("genes", [])),
            "state_dict": ckpt.get("state_dict"), "source": src}


def read_checkpoint(path: str | os.PathLike, which: str = "best") -> dict:
    """Everything one checkpoint holds: its side file's entries (``step``, ``optimizer``, ``rng``, ``model_cfg``,
    ``encoders``, ``genes``, ``train_config``, …) plus ``"state_dict"`` (the weights) and ``"dir"``.

    ``path`` is a run directory (``which`` = ``"best"`` or ``"last"`` picks the checkpoint in ``index.json``) or a
    checkpoint directory.
    """
    p = Path(path)
    if (p / "checkpoints" / INDEX).is_file():
        index = Checkpointer(p).read_index()
        name = index.get(which) or index["last"]
        p = p / "checkpoints" / name
    weights, side = _read_pair(p, f"checkpoint {p}")
    return {**side, "state_dict": weights, "dir": p}

