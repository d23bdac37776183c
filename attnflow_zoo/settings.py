"""The training vocabulary: the settings a recipe (``registry.Recipe``) and a run
(``training.TrainConfig``) share, with their defaults and the values each may take, written
once. Torch-free, so the registry (a leaf) builds its recipes on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, check_choice

#: Precisions a run can ask for ("fp32": no autocast; ``precision.autocast_for``).
PRECISIONS = ("fp32", "bf16", "fp16")
#: The learning-rate schedules after the warm-up.
SCHEDULES = ("constant", "cosine")
#: The optimizers training builds (``training.optim``).
OPTIMIZERS = ("adamax", "adam", "adamw")
#: An older run's ``amp`` -> ``precision``.
_AMP_TO_PRECISION = {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of a training run that a recipe states too.

    Attributes:
        steps: optimizer steps in total (wins over ``epochs``).
        epochs: passes over the training set (each epoch = N // batch_size steps).
        batch_size: global batch (split evenly over ranks under torchrun).
        optimizer: "adamax" (mAR-SCF's, the default), "adam" or "adamw" (TarFlow's).
        betas: the optimizer's (β₁, β₂); None: torch's default for it.
        weight_decay: the optimizer's weight decay (AdamW: decoupled), 0 for none.
        lr: learning rate after warm-up, at ``batch_size`` (never rescaled; mAR-SCF: Adamax
            8e-4).
        schedule: "constant" or "cosine" (timm schedulers) after warm-up.
        grad_clip: max global grad norm, or None for no clipping.
        ema_decay: EMA decay of the weights (timm ModelEmaV3 with warm-up; the published
            weights are the EMA), None for no EMA.
        noise_std: σ > 0 trains on x = (x_u8 + ½)/256 − ½ + σ·ε, ε ~ N(0, I) (TarFlow's
            Gaussian noise augmentation for sample quality, SPEC §6; the model's ``noise_std``
            records it); 0: uniform dequantisation (a likelihood run).
        max_shift: random translation ≤ ``max_shift`` px with edge padding (0: none).
        flip: horizontal flips; None: the dataset's rule (``data.default_flip``: on for CIFAR-10
            and CelebA, off for digits, local folders and in-memory data).
        precision: "fp32", "bf16" (CPU and CUDA) or "fp16" (CUDA, with a gradient scaler):
            the autocast of ``attnflow_zoo.precision``.
        class_loss_weight: w_y ≥ 0: the loss is bits/dim + w_y · the class head's
            cross-entropy in bits per image (Glow's ``y_cond``; a class-conditional model with
            ``class_head``; labels dropped to the null class are left out of it). The logged
            training loss includes the term; evaluations are bits/dim alone.
        class_lr_scale: a class-conditional model's class parameters (its class embedding,
            per-class prior shifts and class head: ``class_parameters()``) train at
            lr × this (``optim.param_groups``); 1: one lr for all.
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    optimizer: str = "adamax"
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0
    lr: float = 8e-4
    schedule: str = "constant"
    grad_clip: float | None = None
    ema_decay: float | None = 0.999
    noise_std: float = 0.0
    max_shift: int = 3
    flip: bool | None = None
    precision: str = "fp32"
    class_loss_weight: float = 0.0
    class_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        self.check_settings()

    def check_settings(self) -> None:
        """``ConfigError`` for a shared setting outside its values (every subclass runs it)."""
        if isinstance(self.betas, list):  # JSON and key=value settings give a list
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.steps is None and self.epochs is None:
            raise ConfigError("give the training length: steps or epochs")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("precision", PRECISIONS)):
            check_choice(name, getattr(self, name), allowed)
        for name in ("steps", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.max_shift < 0:
            raise ConfigError(f"max_shift must be ≥ 0, got {self.max_shift}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive (or None), got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not (isinstance(self.class_lr_scale, int | float) and math.isfinite(self.class_lr_scale)
                and self.class_lr_scale > 0):
            raise ConfigError(f"class_lr_scale must be a positive number, got "
                              f"{self.class_lr_scale!r}")
        for name in ("weight_decay", "noise_std", "class_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number ≥ 0, got {value!r}")
        if self.betas is not None and not (len(self.betas) == 2 and all(
                isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


def legacy_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Recorded or given settings in today's names: an older run's ``amp`` (CUDA autocast,
    "none" = fp32) becomes ``precision``; a one-number ``validation`` (an older run's, or the
    CLI's option) the split it means (``validation_split``)."""
    out = dict(settings)
    if "amp" in out:
        amp = out.pop("amp")
        if amp is not None:
            out.setdefault("precision", _AMP_TO_PRECISION.get(amp, amp))
    if "validation" in out:
        for key, value in validation_split(out.pop("validation")).items():
            out.setdefault(key, value)
    return out


def validation_split(validation: float) -> dict[str, Any]:
    """A validation split given as one number (an older run's ``validation``, the CLI's
    option) as ``TrainConfig``'s fields: a fraction below 1 (0: none) is
    ``validation_fraction``, a whole number from 1 up ``validation_images``."""
    number = isinstance(validation, int | float) and not isinstance(validation, bool)
    if not (number and math.isfinite(validation) and validation >= 0) or (
            validation >= 1 and validation != int(validation)):
        raise ConfigError(f"`validation` must be a fraction in [0, 1) or a whole number of "
                          f"images ≥ 1, got {validation!r}")
    if validation < 1:
        return {"validation_fraction": float(validation), "validation_images": None}
    return {"validation_images": int(validation)}
