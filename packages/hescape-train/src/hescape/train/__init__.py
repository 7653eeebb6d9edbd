"""hescape.train: the ``hescape-train`` command and its training loop."""

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .errors import HescapeConfigError

__version__ = "0.1.0"

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_config", "HescapeConfigError", "main", "train"]


def main(argv: list[str] | None = None) -> int:
    """Run ``hescape-train`` with ``argv`` (a list of CLI arguments)."""
    from .cli import main as _main

    return _main(argv)


def train(cfg: TrainConfig):
    """Train with a :class:`TrainConfig`; returns a ``RunResult``."""
    from .trainer import train as _train

    return _train(cfg)
