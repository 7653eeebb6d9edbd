"""hescape.train: the ``hescape-train`` command and its training loop.

Importing this package loads no torch: the training stack (:mod:`hescape.train.trainer`) is imported when a run
starts.
"""

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config, resume_config, validate_config
from .errors import HescapeConfigError, TrainingDivergedError

__version__ = "0.1.0"

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_config", "resume_config",
           "validate_config", "HescapeConfigError", "TrainingDivergedError", "main", "train"]


def main(argv: list[str] | None = None) -> int:
    """Run ``hescape-train`` with ``argv`` (a list of CLI arguments)."""
    from .cli import main as _main

    return _main(argv)


def train(cfg: TrainConfig, *, resume=None):
    """Train with a :class:`TrainConfig` (``resume``: a run directory to continue); returns a ``RunResult``."""
    from .trainer import train as _train

    return _train(cfg, resume=resume)
