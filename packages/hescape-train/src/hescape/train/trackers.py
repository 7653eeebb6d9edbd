"""Experiment trackers beside the metrics files: TensorBoard and Weights & Biases, when installed and asked for.

The JSON Lines and CSV files (:mod:`hescape.train.metrics`) are always written and are the record of a run; the
trackers only mirror the same numbers. ``log.tensorboard=true`` writes event files to ``RUN_DIR/tensorboard``
through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
``pip install "hescape-train[tensorboard]"``). ``log.wandb=true`` starts a ``wandb`` run in ``RUN_DIR`` named
after the run directory, with the resolved configuration (needs ``wandb``: ``pip install "hescape-train[wandb]"``;
without a login set ``WANDB_MODE=offline``). A resumed run appends to the same TensorBoard directory and resumes
the W&B run by its id (the run directory's name). Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from .errors import HescapeConfigError

__all__ = ["Trackers", "check_trackers"]


def check_trackers(log_cfg) -> None:
    """Refuse a tracker that is asked for but not installed (before any heavy work).

    Raises
    ------
    HescapeConfigError
        ``log.tensorboard`` without the tensorboard package, ``log.wandb`` without wandb.
    """
    for key, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if getattr(log_cfg, key) and importlib.util.find_spec(module) is None:
            msg = (f"log.{key}=true needs the {module} package, which is not installed; "
                   f"pip install \"hescape-train[{extra}]\" or drop log.{key}")
            raise HescapeConfigError(msg)


class Trackers:
    """The trackers of one run (none: every call does nothing).

    Parameters
    ----------
    log_cfg
        A :class:`~hescape.train.config.LogConfig`.
    run_dir
        The run directory (``None`` on ranks > 0: nothing is logged there).
    config
        The resolved configuration (a plain dict), recorded by W&B.
    """

    def __init__(self, log_cfg=None, run_dir: Path | None = None, config: dict | None = None):
        self._tb = self._wandb = None
        if log_cfg is None or run_dir is None:
            return
        if log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if log_cfg.wandb:
            import wandb

            self._wandb = wandb.init(project=log_cfg.wandb_project, name=Path(run_dir).name, id=Path(run_dir).name,
                                     dir=str(run_dir), config=config or {}, resume="allow")

    def log(self, record: dict, step: int, prefix: str = "") -> None:
        """Log the finite numbers of ``record`` at ``step`` under ``prefix`` + key."""
        if self._tb is None and self._wandb is None:
            return
        values = {f"{prefix}{k}": float(v) for k, v in record.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
