"""Evaluation metrics. ``bits_per_dim`` is the only place the bits/dim rule lives (SPEC §4)."""

from __future__ import annotations

import math

from torch import Tensor

LOG_256 = math.log(256.0)


def bits_per_dim(log_prob: Tensor, num_dims: int) -> Tensor:
    """Bits per dimension of 8-bit data: bpd = (−log p(x̃) + D·ln 256) / (D·ln 2).

    Args:
        log_prob: log-density in nats of the dequantised data x̃ ∈ [0, 1)^D, any shape (e.g. (B,)).
        num_dims: D, the number of dimensions of one data point (C·H·W).

    A density that is uniform on the unit cube (log p = 0) scores exactly 8.
    """
    return (-log_prob + num_dims * LOG_256) / (num_dims * math.log(2.0))
