"""``TrainConfig``: every training setting, frozen and JSON-plain (saved with each checkpoint)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the one place of their defaults; the CLI passes only what it is given).

    Attributes:
        steps: optimizer steps in total (wins over ``epochs``).
        epochs: passes over the training set (each epoch = N // batch_size steps).
        batch_size: global batch (split evenly over ranks under torchrun).
        lr: Adamax learning rate after warm-up (mAR-SCF: 8e-4).
        warmup_steps: linear warm-up length in optimizer steps (the original counted images).
        schedule: "constant" or "cosine" (timm schedulers) after warm-up.
        min_lr: the cosine schedule's final lr.
        grad_clip: max global grad norm, or None for no clipping.
        ema_decay: EMA decay of the weights (timm ModelEmaV3 with warm-up), None for no EMA.
        augment: random shift ≤ ``max_shift`` px with edge padding (+ flip if ``flip``).
        flip: horizontal flips; None: the dataset's rule (``data.default_flip``: on for CIFAR-10
            and CelebA, off for digits, local folders and in-memory data).
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: how many step directories to keep (the newest).
        log_every: log training metrics every this many steps.
        eval_every: held-out bits/dim every this many steps (and at the end), None: only at end.
        eval_batch_size: batch size of the held-out evaluation (part of its noise stream).
        eval_seed: seed of the held-out evaluation's dequantisation noise.
        seed: seed of shuffling, augmentation and dequantisation noise.
        max_nonfinite: stop with ``TrainingError`` after this many consecutive non-finite steps.
        amp: "none", "bf16" or "fp16" autocast (CUDA only; the log-density is summed in fp32).
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 200
    schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = 0.999
    augment: bool = True
    max_shift: int = 3
    flip: bool | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int | None = None
    eval_batch_size: int = 256
    eval_seed: int = 0
    seed: int = 0
    max_nonfinite: int = 10
    amp: str = "none"

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("give the training length: steps or epochs")
        for name in ("steps", "epochs", "batch_size", "checkpoint_every", "log_every",
                     "eval_every", "eval_batch_size", "max_nonfinite", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("warmup_steps", "max_shift", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive (or None), got {self.grad_clip}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-plain dict (``TrainConfig(**d)`` rebuilds them)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
