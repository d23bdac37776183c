"""Training: ``TrainConfig`` (config), ``fit`` (loop), ``train_preset`` (preset), checkpoints for
exact resume (state), the run folder (run, record, report, lock), signals (interrupt) and
torchrun helpers (distributed)."""

from .config import TrainConfig
from .interrupt import TrainingInterrupted
from .loop import FitResult, fit
from .preset import train_preset

__all__ = ["FitResult", "TrainConfig", "TrainingInterrupted", "fit", "train_preset"]
