"""``TrainConfig``: every training setting, frozen and JSON-plain (saved with each checkpoint)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..precision import check_precision
from ..settings import TrainingSettings, legacy_settings


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainingSettings):
    """Every setting of a training run (the one place of their defaults; the CLI passes only
    what it is given). The settings a recipe states too (length, batch, optimizer, lr,
    schedule, EMA, noise, augmentation, precision) are ``settings.TrainingSettings``, with their
    defaults and checks; a run adds:

    Attributes:
        warmup_steps: linear warm-up length in optimizer steps (the original counted images).
        min_lr: the cosine schedule's final lr.
        augment: random shift ≤ ``max_shift`` px with edge padding (+ flip if ``flip``).
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: how many step directories to keep (the newest; ``best/`` is kept
            apart and never rotated away).
        log_every: log training metrics every this many steps.
        eval_every: validation bits/dim (and a sample grid) every this many steps and at the
            end; None: only at the end. The held-out (test) split is scored at the end only.
        validation_fraction: the validation split carved out of the training images (seeded
            by ``seed``), as a fraction of them in [0, 1) (at least one image when > 0; 0: no
            split). It picks the ``best`` checkpoint; the held-out split never does.
        validation_images: the split as a number of images ≥ 0 instead (0: no split); None:
            ``validation_fraction`` decides.
        eval_batch_size: batch size of the held-out evaluation (part of its noise stream).
        eval_seed: seed of the held-out evaluation's dequantisation noise.
        seed: seed of shuffling, augmentation and dequantisation noise.
        max_nonfinite: stop with ``TrainingError`` after this many consecutive non-finite steps.
        compile: ``torch.compile`` the training step (``attnflow_zoo.compilation``; the same
            model to float tolerance, so a resume may switch it freely).
        max_seconds: a time budget: the run ends after the step during which this many seconds
            of wall time have passed since this segment's first step (a resumed run gets the
            budget afresh), exactly like a run that reached its steps: final evaluation,
            checkpoint and ``run.json`` (status finished, ``stop_reason`` "max_seconds").
            None: no budget.

    An older run's ``amp`` (CUDA autocast) is read as ``precision``, and its ``validation`` (a
    fraction below 1, a count from 1 up) as these two fields (``from_dict``,
    ``settings.validation_split``).
    """

    warmup_steps: int = 200
    min_lr: float = 0.0
    augment: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int | None = None
    validation_fraction: float = 0.02
    validation_images: int | None = None
    eval_batch_size: int = 256
    eval_seed: int = 0
    seed: int = 0
    max_nonfinite: int = 10
    compile: bool = False
    max_seconds: float | None = None

    def check_settings(self) -> None:
        """The shared checks, then the run's own."""
        super().check_settings()
        for name in ("checkpoint_every", "log_every", "eval_every", "eval_batch_size",
                     "max_nonfinite", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("warmup_steps", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        self._check_validation()
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds)
                                                 and self.max_seconds > 0):
            raise ConfigError(f"max_seconds must be a positive number of seconds (or None), got "
                              f"{self.max_seconds}")

    def _check_validation(self) -> None:
        fraction, images = self.validation_fraction, self.validation_images
        if not (isinstance(fraction, int | float) and not isinstance(fraction, bool)
                and 0 <= fraction < 1):
            raise ConfigError(f"validation_fraction must be a fraction in [0, 1), got "
                              f"{fraction!r}; give a number of images as validation_images")
        if images is not None and not (isinstance(images, int) and not isinstance(images, bool)
                                       and images >= 0):
            raise ConfigError(f"validation_images must be a whole number ≥ 0 (or None), got "
                              f"{images!r}")

    def total_steps(self, num_train: int) -> int:
        """The run's length in optimizer steps on ``num_train`` training images: ``steps``, or
        ``epochs`` passes of num_train // batch_size steps."""
        if self.steps is not None:
            return self.steps
        return self.epochs * (num_train // self.batch_size)  # type: ignore[operator]

    def validation_count(self, num_images: int) -> int:
        """How many of ``num_images`` training images the validation split takes."""
        if self.validation_images is not None:
            return self.validation_images
        if self.validation_fraction == 0:
            return 0
        return max(1, round(self.validation_fraction * num_images))

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


def check_device(config: TrainConfig, device: torch.device) -> None:
    """``ConfigError`` for settings the device cannot honour (never silently ignored)."""
    check_precision(config.precision, device)


# --- what may change when a run is resumed ---------------------------------------------------
#: Settings that change no weight of the run (logging and bookkeeping): free on resume.
RESUME_FREE = frozenset({"steps", "epochs", "total_steps", "checkpoint_every",
                         "keep_checkpoints", "log_every", "eval_every", "max_nonfinite",
                         "eval_limit", "max_seconds", "compile"})
_CARVED = ("the validation images were carved out of the training images, so another split "
           "would train on them")
#: Settings a resumed run can never change, and why.
RESUME_LOCKED = {
    "batch_size": "step s trains on images s·B … (s+1)·B of its epoch's shuffle, so another "
                  "batch size would re-show some images and skip others",
    "seed": "the seed draws the validation split out of the training images, so another seed "
            "would train on validation images",
    "validation_fraction": _CARVED,
    "validation_images": _CARVED,
}


def check_resume(saved: dict[str, Any], current: dict[str, Any], allow: Iterable[str] = ()
                 ) -> list[str]:
    """Compare a run's recorded settings with the new ones (``TrainConfig.to_dict()`` plus the
    data: ``dataset``, ``limit``, ``eval_limit``); return the changed keys allowed by ``allow``.

    Free keys (``RESUME_FREE``) may change, except the run's length where the learning-rate
    schedule depends on it (a cosine schedule, or a warm-up cut short by the length); locked keys
    (``RESUME_LOCKED``) never; any other change (the recipe: lr, schedule, EMA, augmentation,
    precision, the data, …) is a ``ConfigError`` unless its key is in ``allow`` (the
    ``allow_changes`` of ``train_preset`` / ``fit``). An older run's ``amp`` is compared as
    ``precision``.
    """
    saved, current = legacy_settings(saved), legacy_settings(current)
    allow = set(allow)
    known = set(saved) | set(current)
    unknown = sorted(allow - known)
    if unknown:
        raise ConfigError(f"`allow_changes` {unknown[0]}: no such setting; choose from "
                          f"{', '.join(sorted(known - RESUME_FREE - set(RESUME_LOCKED)))}")
    changed = sorted(k for k in known if k in saved and saved.get(k) != current.get(k))
    refused, allowed = [], []
    for key in changed:
        if key == "total_steps":  # the length in steps: judged through steps / epochs
            continue
        if key in RESUME_LOCKED:
            raise ConfigError(f"cannot resume with {key}={current.get(key)!r}: the run used "
                              f"{saved.get(key)!r}, and {RESUME_LOCKED[key]}; keep "
                              f"{saved.get(key)!r} or start a new `out_dir`")
        if key in RESUME_FREE and not (key in ("steps", "epochs")
                                       and _length_moves_lr(saved, current)):
            continue
        (allowed if key in allow else refused).append(key)
    if refused:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in refused)
        if {"steps", "epochs"} & set(refused):
            detail += " (the learning-rate schedule is fitted to the run's length: its cosine or "\
                      "its warm-up, cut to the length, would change)"
        allowing = " ".join(f"`allow_changes` {k}" for k in refused)
        raise ConfigError(f"`resume` would change the run's {detail}; keep the run's settings, "
                          f"or pass {allowing} to change them from the resumed step on")
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
