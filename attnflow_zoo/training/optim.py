"""The optimiser side of a run, built from its ``TrainConfig``: the parameter groups, the
optimizer, the learning-rate schedule and the EMA of the weights (both timm's)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import TrainConfig

_OPTIMIZERS = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam,
               "adamw": torch.optim.AdamW}


def make_optimizer(params: Iterable[nn.Parameter] | list[dict], config: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """``config.optimizer`` at ``config.lr`` with its ``betas`` (None: torch's default) and
    ``weight_decay``. capturable on CUDA: the step count stays on the GPU (no host read in
    the step)."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay,
              "capturable": device.type == "cuda"}
    if config.betas is not None:
        kwargs["betas"] = tuple(config.betas)
    return _OPTIMIZERS[config.optimizer](params, **kwargs)


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: one, or with ``config.class_lr_scale`` ≠ 1 and a
    class-conditional model that names its class parameters (``model.class_parameters()``)
    two, the class parameters at lr × ``class_lr_scale`` (SPEC §7: an embedding that moves).
    The schedule scales each group's lr by the same factor."""
    params = list(model.parameters())
    named = getattr(model, "class_parameters", None)
    chosen = list(named()) if config.class_lr_scale != 1 and named is not None else []
    if not chosen:
        return [{"params": params}]
    ids = {id(p) for p in chosen}
    return [{"params": [p for p in params if id(p) not in ids]},
            {"params": chosen, "lr": config.lr * config.class_lr_scale}]


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
