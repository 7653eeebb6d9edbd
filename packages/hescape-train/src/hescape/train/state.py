"""Everything a run needs to continue exactly, and nothing else: the :class:`TrainState` is what a checkpoint saves.

Model weights go to ``model.safetensors``; the rest — optimiser state, the step (the learning-rate schedule's
position), the epoch and the batch within it (the sampler's position), the random states of Python, NumPy, torch
(CPU and CUDA) and of the augmentation generator, the best validation score and where its checkpoint is, the
current epoch's losses so far, and the byte length of each metrics file — goes to ``state.pt`` as tensors and plain
values only, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TrainState", "capture_rng", "restore_rng"]


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Random states of Python, NumPy, torch (CPU, every CUDA device) and of each named generator, as tensors and
    plain values (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    return out


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_rng`; generators named in ``state`` but not in ``generators`` are an error."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g_state in state["generators"].items():
        generators[name].set_state(g_state)


@dataclass
class TrainState:
    """The mutable state of a run (see the module docstring). ``model`` and ``optimizer`` are live objects; the
    other fields are plain values. ``epoch`` counts completed epochs and ``batch`` the batches done in the current
    one, so the next step is batch ``batch`` of epoch ``epoch`` (0-based) and global step ``step``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]
    step: int = 0
    epoch: int = 0
    batch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_dir: str | None = None
    metrics_sizes: dict[str, int] = field(default_factory=dict)

    def side_state(self) -> dict:
        """What ``state.pt`` holds (the model's weights go to ``model.safetensors``)."""
        return {
            "step": self.step, "epoch": self.epoch, "batch": self.batch,
            "epoch_losses": torch.tensor(self.epoch_losses, dtype=torch.float64),
            "best_score": float(self.best_score), "best_epoch": self.best_epoch, "best_dir": self.best_dir,
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng(self.generators),
            "metrics_sizes": dict(self.metrics_sizes),
        }

    def load_side_state(self, side: dict) -> None:
        """Restore everything but the weights from a ``state.pt`` dict (see :meth:`side_state`)."""
        self.step, self.epoch, self.batch = int(side["step"]), int(side["epoch"]), int(side["batch"])
        self.epoch_losses = side["epoch_losses"].tolist()
        self.best_score, self.best_epoch = float(side["best_score"]), int(side["best_epoch"])
        self.best_dir = side["best_dir"]
        self.metrics_sizes = {str(k): int(v) for k, v in side["metrics_sizes"].items()}
        self.optimizer.load_state_dict(side["optimizer"])
        restore_rng(side["rng"], self.generators)
