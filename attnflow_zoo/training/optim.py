"""The optimiser side of a run, built from its ``TrainConfig``: the learning-rate schedule and
the EMA of the weights (both timm's)."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """The lr schedule (timm, stepped per optimizer step): linear warm-up from 0 over
    ``config.warmup_steps`` (cut to the run's length), then constant or cosine to ``min_lr``."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    warmup = min(config.warmup_steps, total_steps)
    if config.schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=config.min_lr,
                                 warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=False,
                                 t_in_epochs=False)
    return StepLRScheduler(optimizer, decay_t=float("inf"), decay_rate=1.0, warmup_t=warmup,
                           warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def make_ema(model: nn.Module, config: TrainConfig):
    """The EMA of ``model``'s weights (timm ``ModelEmaV3``) at ``config.ema_decay``."""
    from timm.utils import ModelEmaV3

    # Warm-up of the decay (1 − (1 + t)^−3/4, capped at ema_decay) so short runs are not
    # dominated by the initial weights.
    return ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, warmup_power=3 / 4)
