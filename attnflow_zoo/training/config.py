"""``TrainConfig``: every training setting, frozen and JSON-plain (saved with each checkpoint)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..precision import PRECISIONS
from ..registry import OPTIMIZERS


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the one place of their defaults; the CLI passes only what it is given).

    Attributes:
        steps: optimizer steps in total (wins over ``epochs``).
        epochs: passes over the training set (each epoch = N // batch_size steps).
        batch_size: global batch (split evenly over ranks under torchrun).
        optimizer: "adamax" (mAR-SCF's, the default), "adam" or "adamw" (TarFlow's).
        betas: the optimizer's (β₁, β₂); None: torch's default for it.
        weight_decay: the optimizer's weight decay (AdamW: decoupled), 0 for none.
        lr: learning rate after warm-up (mAR-SCF: Adamax 8e-4).
        warmup_steps: linear warm-up length in optimizer steps (the original counted images).
        schedule: "constant" or "cosine" (timm schedulers) after warm-up.
        min_lr: the cosine schedule's final lr.
        grad_clip: max global grad norm, or None for no clipping.
        ema_decay: EMA decay of the weights (timm ModelEmaV3 with warm-up), None for no EMA.
        noise_std: σ > 0 trains on x = (x_u8 + ½)/256 − ½ + σ·ε, ε ~ N(0, I) (TarFlow's
            Gaussian noise augmentation for sample quality, SPEC §6; the model's
            ``noise_std`` records it); 0: uniform dequantisation (a likelihood run).
        augment: random shift ≤ ``max_shift`` px with edge padding (+ flip if ``flip``).
        flip: horizontal flips; None: the dataset's rule (``data.default_flip``: on for CIFAR-10
            and CelebA, off for digits, local folders and in-memory data).
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: how many step directories to keep (the newest; ``best/`` is kept
            apart and never rotated away).
        log_every: log training metrics every this many steps.
        eval_every: validation bits/dim (and a sample grid) every this many steps and at the
            end; None: only at the end. The held-out (test) split is scored at the end only.
        validation: the validation split carved out of the training images (seeded by ``seed``):
            a fraction in (0, 1) or a count ≥ 1 of images, 0 for none. It picks the ``best``
            checkpoint; the held-out split never does.
        eval_batch_size: batch size of the held-out evaluation (part of its noise stream).
        eval_seed: seed of the held-out evaluation's dequantisation noise.
        seed: seed of shuffling, augmentation and dequantisation noise.
        max_nonfinite: stop with ``TrainingError`` after this many consecutive non-finite steps.
        precision: "fp32", "bf16" (CPU and CUDA) or "fp16" (CUDA, with a gradient scaler):
            the autocast of ``attnflow_zoo.precision`` (conditioners and prior convolutions in
            the low precision; logdets, log-densities and the data path in float32). Replaces
            the CUDA-only ``amp`` of older runs ("none" = "fp32"; ``from_dict`` reads both).
        compile: ``torch.compile`` the training step (``attnflow_zoo.compilation``; the same
            model to float tolerance, so a resume may switch it freely).
        class_loss_weight: w_y ≥ 0: the loss is bits/dim + w_y · the class head's
            cross-entropy in bits per image (Glow's ``y_cond``; a class-conditional model with
            ``class_head``; labels dropped to the null class are left out of it). The logged
            training loss includes the term; evaluations are bits/dim alone.
        class_lr_scale: a class-conditional model's class parameters (its class embedding,
            per-class prior shifts and class head: ``class_parameters()``) train at
            lr × this (``optim.param_groups``); 1: one lr for all.
        max_seconds: a time budget: the run ends after the step during which this many seconds
            of wall time have passed since this segment's first step (a resumed run gets the
            budget afresh), exactly like a run that reached its steps: final evaluation,
            checkpoint and ``run.json`` (status finished, ``stop_reason`` "max_seconds").
            None: no budget.
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    optimizer: str = "adamax"
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0
    lr: float = 8e-4
    warmup_steps: int = 200
    schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = 0.999
    noise_std: float = 0.0
    augment: bool = True
    max_shift: int = 3
    flip: bool | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int | None = None
    validation: float = 0.02
    eval_batch_size: int = 256
    eval_seed: int = 0
    seed: int = 0
    max_nonfinite: int = 10
    precision: str = "fp32"
    compile: bool = False
    max_seconds: float | None = None
    class_loss_weight: float = 0.0
    class_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("give the training length: steps or epochs")
        self._check_optimizer()
        for name in ("steps", "epochs", "batch_size", "checkpoint_every", "log_every",
                     "eval_every", "eval_batch_size", "max_nonfinite", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("warmup_steps", "max_shift", "min_lr", "class_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not (math.isfinite(self.validation) and self.validation >= 0) or (
                self.validation >= 1 and self.validation != int(self.validation)):
            raise ConfigError(f"validation must be a fraction in (0, 1), a whole count ≥ 1 or 0, "
                              f"got {self.validation}")
        if not (math.isfinite(self.class_lr_scale) and self.class_lr_scale > 0):
            raise ConfigError(f"class_lr_scale must be a positive number, got "
                              f"{self.class_lr_scale}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive (or None), got {self.grad_clip}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{self.precision!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds)
                                                 and self.max_seconds > 0):
            raise ConfigError(f"max_seconds must be a positive number of seconds (or None), got "
                              f"{self.max_seconds}")

    def _check_optimizer(self) -> None:
        if isinstance(self.betas, list):  # as JSON gives it back
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                              f"{self.optimizer!r}")
        if self.betas is not None and not (isinstance(self.betas, tuple) and len(self.betas) == 2
                                           and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("weight_decay", "noise_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number ≥ 0, got {value!r}")

    def validation_count(self, num_images: int) -> int:
        """How many of ``num_images`` training images the validation split takes."""
        if self.validation == 0:
            return 0
        if self.validation < 1:
            return max(1, round(self.validation * num_images))
        return int(self.validation)

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> TrainConfig:
        """The config of a ``to_dict`` of this or an older version (``legacy_settings``)."""
        return cls(**legacy_settings(settings))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-plain dict (``TrainConfig(**d)`` rebuilds them; tuples as
        lists, as they come back from run.json)."""
        out = dataclasses.asdict(self)
        if out["betas"] is not None:
            out["betas"] = list(out["betas"])
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


#: An older run's ``amp`` -> ``precision``.
_AMP_TO_PRECISION = {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}


def legacy_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Recorded settings in today's names: an older run's ``amp`` becomes ``precision``."""
    out = dict(settings)
    if "amp" in out:
        amp = out.pop("amp")
        out.setdefault("precision", _AMP_TO_PRECISION.get(amp, amp))
    return out


def check_device(config: TrainConfig, device: torch.device) -> None:
    """``ConfigError`` for settings the device cannot honour (never silently ignored)."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA device and this run is on "
                          f"{device.type}; use --precision bf16 (or --device cuda on a GPU "
                          "machine)")


# --- what may change when a run is resumed ---------------------------------------------------
#: Settings that change no weight of the run (logging and bookkeeping): free on resume.
RESUME_FREE = frozenset({"steps", "epochs", "total_steps", "checkpoint_every",
                         "keep_checkpoints", "log_every", "eval_every", "max_nonfinite",
                         "eval_limit", "max_seconds", "compile"})
#: Settings a resumed run can never change, and why.
RESUME_LOCKED = {
    "batch_size": "step s trains on images s·B … (s+1)·B of its epoch's shuffle, so another "
                  "batch size would re-show some images and skip others",
    "seed": "the seed draws the validation split out of the training images, so another seed "
            "would train on validation images",
    "validation": "the validation images were carved out of the training images, so another "
                  "split would train on them",
}


def check_resume(saved: dict[str, Any], current: dict[str, Any], allow: Iterable[str] = ()
                 ) -> list[str]:
    """Compare a run's recorded settings with the new ones (``TrainConfig.to_dict()`` plus the
    data: ``dataset``, ``limit``, ``eval_limit``); return the changed keys allowed by ``allow``.

    Free keys (``RESUME_FREE``) may change, except the run's length where the learning-rate
    schedule depends on it (a cosine schedule, or a warm-up cut short by the length); locked keys
    (``RESUME_LOCKED``) never; any other change (the recipe: lr, schedule, EMA, augmentation,
    precision, the data, …) is a ``ConfigError`` unless its key is in ``allow``
    (``--override KEY``). An older run's ``amp`` is compared as ``precision``.
    """
    saved, current = legacy_settings(saved), legacy_settings(current)
    allow = set(allow)
    known = set(saved) | set(current)
    unknown = sorted(allow - known)
    if unknown:
        raise ConfigError(f"--override {unknown[0]}: no such setting; choose from "
                          f"{', '.join(sorted(known - RESUME_FREE - set(RESUME_LOCKED)))}")
    changed = sorted(k for k in known if k in saved and saved.get(k) != current.get(k))
    refused, allowed = [], []
    for key in changed:
        if key == "total_steps":  # the length in steps: judged through steps / epochs
            continue
        if key in RESUME_LOCKED:
            raise ConfigError(f"cannot resume with {key}={current.get(key)!r}: the run used "
                              f"{saved.get(key)!r}, and {RESUME_LOCKED[key]}; keep "
                              f"{saved.get(key)!r} or start a new --out")
        if key in RESUME_FREE and not (key in ("steps", "epochs")
                                       and _length_moves_lr(saved, current)):
            continue
        (allowed if key in allow else refused).append(key)
    if refused:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in refused)
        if {"steps", "epochs"} & set(refused):
            detail += " (the learning-rate schedule is fitted to the run's length: its cosine or "\
                      "its warm-up, cut to the length, would change)"
        flags = " ".join(f"--override {k}" for k in refused)
        raise ConfigError(f"--resume would change the run's {detail}; keep the run's settings, "
                          f"or pass {flags} to change them from the resumed step on")
    return allowed


def _length_moves_lr(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether another ``steps`` / ``epochs`` changes the learning rate of steps already planned:
    a cosine schedule spans the run, and the warm-up is cut to the run's length."""
    if "cosine" in (saved.get("schedule"), current.get("schedule")):
        return True
    warmup = current.get("warmup_steps") or 0
    lengths = [saved.get("total_steps") or saved.get("steps"),
               current.get("total_steps") or current.get("steps")]
    if None in lengths:  # a length in epochs, not yet in steps: ``fit`` checks again with it
        return False
    return min(warmup, lengths[0]) != min(warmup, lengths[1])
