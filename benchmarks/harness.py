"""The training step and the sampler as the benchmarks run them.

``TrainStep`` is the training loop's own sync-free step (``attnflow_zoo.training.step``: no
``.item()`` / ``bool(tensor)`` / ``.cpu()``; the non-finite guard on the device, a skipped step
changes no weight) with the benchmarks' signature: ``TrainStep(model, optimizer, precision,
log_density)``, called on a batch already in model space. ``autocast_cache = False`` while a
CUDA graph captures the step (autocast's weight-cast cache must not outlive the capture).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnflow_zoo.precision import autocast_for
from attnflow_zoo.training.step import TrainStep as _LoopStep


class TrainStep(_LoopStep):
    """``attnflow_zoo.training.step.TrainStep`` of ``model`` (bits/dim, forward + backward +
    Adamax); ``log_density`` defaults to ``model.log_density`` (pass
    ``compile_log_density(model)`` to compile it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: str = "fp32", log_density: Callable[[Tensor], Tensor] | None = None,
                 grad_clip: float | None = None) -> None:
        fn = log_density or model.log_density
        super().__init__(lambda x, _y, generator=None: fn(x), list(model.parameters()),
                         optimizer, precision, math.prod(model.input_shape), grad_clip)
        self.model = model

def make_sampler(model: nn.Module, precision: str = "fp32",
                 generate: Callable[..., Tensor] | None = None) -> Callable[..., Tensor]:
    """``sample(num_samples, temperature, generator)`` in model space under ``precision``;
    ``generate`` defaults to ``model.generate`` (pass ``compile_sampling(model)``)."""
    gen = generate or model.generate
    device = next(model.parameters()).device

    def sample(num_samples: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad(), autocast_for(device, precision):
            return gen(num_samples, temperature, generator)

    return sample
