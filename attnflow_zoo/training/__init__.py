"""Training: ``TrainConfig`` (config), ``fit`` (loop), checkpoints for exact resume (state) and
torchrun helpers (distributed)."""

from .config import TrainConfig
from .loop import FitResult, fit, train_preset

__all__ = ["FitResult", "TrainConfig", "fit", "train_preset"]
