"""A training step with no host synchronisation, and the sampler, as the benchmarks run them.

This is the recipe the training loop (``attnflow_zoo/training/loop.py``) should adopt
(issue 14): nothing in ``TrainStep.__call__`` reads a device value back to the host — no
``.item()``, ``bool(tensor)``, ``float(tensor)`` or ``.cpu()`` — so on CUDA the host can queue
the next step while the device runs this one, and the whole step can be captured by a CUDA
graph. tests/test_speed_harness.py checks it calls no ``Tensor.item`` / ``__bool__`` on CPU;
``benchmarks/gpu.sh`` runs it under ``torch.cuda.set_sync_debug_mode("error")``.

The non-finite guard without a sync: ``finite = isfinite(loss) & isfinite(grad_norm)`` stays
a device tensor. Gradients are zeroed where the step is not finite (so no NaN reaches the
optimizer state), the optimizer steps, and the weights are put back from a copy taken before
the step with ``_foreach_lerp_(params, backup, ~finite)`` (weight 0 keeps the update, 1
restores the copy; both exact). A skipped step therefore changes no weight; Adamax's moments
decay as for a zero gradient. Counters of skipped and consecutive skipped steps, and the loss
sum over the logging window, are device tensors read only at logging steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnflow_zoo import metrics
from attnflow_zoo.precision import autocast_for


class TrainStep:
    """One maximum-likelihood step (bits/dim, forward + backward + Adamax) on uint8-derived
    inputs already in model space, sync-free.

    Args:
        model: a FlowModel, ActNorm already initialised.
        optimizer: its optimizer (Adamax in the recipe).
        precision: "fp32" or "bf16" (``attnflow_zoo.precision.autocast_for``).
        log_density: the function to differentiate (default ``model.log_density``; pass
            ``attnflow_zoo.compilation.compile_log_density(model)`` to compile it).
        grad_clip: max global gradient norm, None for none (the norm is computed either way).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: str = "fp32", log_density: Callable[[Tensor], Tensor] | None = None,
                 grad_clip: float | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.log_density = log_density or model.log_density
        self.grad_clip = grad_clip
        self.autocast_cache = True  # False while a CUDA graph captures the step
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.backup = [torch.empty_like(p) for p in self.params]
        dev = self.params[0].device
        self.device = dev
        self.num_dims = math.prod(model.input_shape)
        self.skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=dev)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)

    def __call__(self, x: Tensor) -> Tensor:
        """One step on the batch ``x`` (model space); returns the detached loss (a device
        tensor: read it only when logging)."""
        with autocast_for(self.device, self.precision, cache_enabled=self.autocast_cache):
            log_p = self.log_density(x)
        loss = metrics.bits_per_dim(log_p.float(), self.num_dims).mean()
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(
            self.params, self.grad_clip if self.grad_clip else float("inf"), foreach=True)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        skip = ~finite
        for p in self.params:
            if p.grad is not None:
                p.grad.masked_fill_(skip, 0.0)
        torch._foreach_copy_(self.backup, self.params)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.params, self.backup, skip.to(self.params[0].dtype))
        self.skipped += skip
        self.consecutive.add_(1).mul_(skip)
        self.loss_sum += torch.where(finite, loss.detach().double(), 0.0)
        return loss.detach()


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
