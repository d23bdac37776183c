"""One training step that reads nothing back to the host: the non-finite guard on the device.

Nothing in ``TrainStep.__call__`` reads a device value back — no ``.item()``, ``bool(tensor)``,
``float(tensor)``, ``.tolist()`` or ``.cpu()`` — so on CUDA the host queues the next step while
the device runs this one (tests/test_step_sync.py: no such call on CPU, and
``torch.cuda.set_sync_debug_mode("error")`` on CUDA). The two exceptions are not the step's:
fp16's ``GradScaler.step`` reads its inf flag (use bf16, which needs no scaler), and under
DDP the caller exchanges the stop request of every rank each step.

The guard: ``finite = isfinite(loss) & isfinite(grad_norm)`` stays a device tensor (the loss
averaged over ranks, so every rank agrees). Gradients are zeroed where the step is not
finite (no NaN reaches the optimizer state), the optimizer steps, and the weights are put back
from a copy taken before the step with ``_foreach_lerp_(params, backup, skip)`` (weight 0
keeps the update, 1 restores the copy; both exact). A skipped step therefore changes no weight;
Adamax's moments decay as for a zero gradient and its step count advances (the one difference
from a skip that reads the flag on the host). Counters of skipped and consecutive skipped steps
and the loss sum of the logging window are device tensors that ``read`` fetches in one
transfer at logging and checkpoint steps.

Memory: the copy is taken after the backward pass and dropped at the end of the step, and the
gradients are set to None once the optimizer has used them. Neither lives through the forward
and backward passes, whose activations set the peak; the copy reuses the activations' freed
memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import metrics
from ..errors import ConfigError
from ..precision import autocast_for


class LogDensity(nn.Module):
    """A FlowModel's training objective as a module's ``forward`` (what DDP and
    ``torch.compile`` wrap): ``(x, y, generator=g) -> model.log_density(x, y, generator=g)``.

    With ``class_loss_weight`` w > 0 and a class-conditional model (which then needs a class
    head), the objective is log p(x | y) − w·D·CE(logits, y) in nats, so that its bits/dim is
    bits/dim + w·CE in bits per image (Glow's ``weight_y``); rows whose label is the null class
    (label dropout) have no cross-entropy. An unconditional model has no class: the weight
    does nothing (a recipe's weight is for its conditional variants).
    """

    def __init__(self, model: nn.Module, class_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        conditional = bool(model.num_classes)
        self.class_loss_weight = class_loss_weight if conditional else 0.0
        if self.class_loss_weight and getattr(model, "class_head", None) is None:
            raise ConfigError("class_loss_weight > 0 needs a class-conditional model with a "
                              "class head (class_head=True); set the weight to 0")

    def forward(self, x: Tensor, y: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        if not self.class_loss_weight:
            return self.model.log_density(x, y, generator=generator)
        log_p, logits = self.model.log_density_and_logits(x, y, generator=generator)
        ce = F.cross_entropy(logits.float(), y, reduction="none",
                             ignore_index=self.model.num_classes)
        return log_p - self.class_loss_weight * x[0].numel() * ce


class TrainStep:
    """forward + backward + clip + guarded optimizer step on one batch, sync-free.

    Args:
        log_density: ``(x, y, generator=g) -> log p(x | y)`` (B,) — ``FlowModel.log_density``
            (y None for an unconditional model), the loop's DDP-wrapped objective, or a
            compiled version of either.
        params: the trained parameters.
        optimizer: their optimizer.
        precision: "fp32", "bf16" or "fp16" (``attnflow_zoo.precision.autocast_for``).
        num_dims: C·H·W, for bits/dim.
        grad_clip: max global gradient norm, None for none (the norm is computed either way).
        scaler: fp16's ``GradScaler`` (None otherwise).
        reduce: averages a device tensor over ranks (identity off DDP).
    """

    def __init__(self, log_density: Callable[..., Tensor], params: list[Tensor],
                 optimizer: torch.optim.Optimizer, precision: str, num_dims: int,
                 grad_clip: float | None = None, scaler: Any = None,
                 reduce: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        self.log_density = log_density
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.precision = precision
        self.num_dims = num_dims
        self.max_norm = grad_clip if grad_clip else float("inf")
        self.scaler = scaler
        self.reduce = reduce
        self.autocast_cache = True  # False while a CUDA graph captures the step
        dev = self.params[0].device
        self.device = dev
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        self.skipped, self.consecutive, self.worst, self.good = (zero.clone() for _ in range(4))
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.last = torch.zeros(2, dtype=torch.float64, device=dev)  # loss, grad norm

    def __call__(self, x: Tensor, generator: torch.Generator | None = None,
                 y: Tensor | None = None) -> Tensor:
        """One step on ``x`` (model space) with labels ``y`` (class-conditional models only);
        returns the loss (bits/dim, averaged over ranks, detached: a device tensor, read it
        only when logging)."""
        with autocast_for(self.device, self.precision, cache_enabled=self.autocast_cache):
            log_p = self.log_density(x, y, generator=generator)
        loss = metrics.bits_per_dim(log_p.float(), self.num_dims).mean()
        self.optimizer.zero_grad(set_to_none=True)  # none held unless a step was cut short
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.max_norm)
        loss = self.reduce(loss.detach().double())
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        skip = ~finite
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.grad.masked_fill_(skip, 0.0)
            backup = [p.detach().clone() for p in self.params]
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            torch._foreach_lerp_(self.params, backup, skip.to(self.params[0].dtype))
            del backup
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += skip
            self.consecutive.add_(1).mul_(skip)
            torch.maximum(self.worst, self.consecutive, out=self.worst)
            self.good += finite
            self.loss_sum += torch.where(finite, loss, 0.0)
            self.last.copy_(torch.stack([loss, grad_norm.double()]))
        return loss

    def first(self, x: Tensor, generator: torch.Generator | None = None,
              y: Tensor | None = None) -> Tensor:
        """The first step of a compiled run: a compiler failure becomes one line
        (``ConfigError``) that says to train without ``--compile``."""
        try:
            return self(x, generator, y)
        except torch._dynamo.exc.TorchDynamoException as err:
            raise ConfigError(f"`compile` could not compile this model's training step "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                              "train without `compile`") from err

    def read(self) -> dict[str, float]:
        """The window's counters in one transfer, then a new window: ``loss_sum`` (bits/dim
        summed over its good steps), ``good``, ``skipped``, ``consecutive`` (non-finite steps
        in a row at the end), ``worst`` (the longest such run in the window, carried over from
        the last window), ``last_loss``, ``grad_norm`` (the last step's)."""
        values = torch.cat([torch.stack([self.loss_sum, self.good.double(),
                                         self.skipped.double(), self.consecutive.double(),
                                         self.worst.double()]), self.last]).tolist()
        loss_sum, good, skipped, consecutive, worst, last_loss, norm = values
        self.loss_sum.zero_()
        self.good.zero_()
        self.skipped.zero_()
        self.worst.copy_(self.consecutive)
        return {"loss_sum": loss_sum, "good": int(good),
                "skipped": int(skipped), "consecutive": int(consecutive), "worst": int(worst),
                "last_loss": last_loss, "grad_norm": norm}
