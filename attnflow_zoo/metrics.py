"""Bits per dimension: the one place of the rule (SPEC §4), and the mean bits/dim of a model
on a set of images."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import check_positive_int
from .progress import progress

LOG_256 = math.log(256.0)


def bits_per_dim(log_prob: Tensor, num_dims: int) -> Tensor:
    """Bits per dimension of 8-bit data: bpd = (−log p(x̃) + D·ln 256) / (D·ln 2).

    Args:
        log_prob: log-density in nats of the dequantised data x̃ ∈ [0, 1)^D, any shape (e.g. (B,)).
        num_dims: D, the number of dimensions of one data point (C·H·W).

    A density that is uniform on the unit cube (log p = 0) scores exactly 8.
    """
    return (-log_prob + num_dims * LOG_256) / (num_dims * math.log(2.0))


@torch.no_grad()
def evaluate_bpd(model: nn.Module, images_u8: Tensor, batch_size: int = 256,
                 generator: torch.Generator | None = None, show_progress: bool | None = None,
                 labels: Tensor | None = None) -> float:
    """Mean per-image bits/dim of ``images_u8`` (N×C×H×W uint8), single-sample dequantisation.

    bpd = (1/N) Σ_i model.bits_per_dim(x_i) (SPEC §4). The noise is drawn batch after batch from
    ``generator`` (on the model's device if given on CPU it is used there and moved), so the same
    seed and batch size give the same number — ``fit`` logs with ``eval_seed`` /
    ``eval_batch_size`` and ``attnflow evaluate`` uses the same defaults. ``labels``: the
    images' classes, (N,), for a class-conditional model (bits/dim of x given its class).
    """
    check_positive_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with progress("evaluate", total=len(images_u8), show=show_progress) as advance:
            for start in range(0, len(images_u8), batch_size):
                batch = images_u8[start:start + batch_size]
                y = None if labels is None else labels[start:start + batch_size]
                bpd = model.bits_per_dim(batch, y, generator=generator)
                total += bpd.double().sum().cpu()
                advance(len(batch), bpd=f"{total.item() / (start + len(batch)):.4f}")
    finally:
        model.train(was_training)
    return float(total / len(images_u8))
