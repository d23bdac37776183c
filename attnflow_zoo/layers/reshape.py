"""Shape-changing, volume-preserving layers: squeeze and the channel split."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..core import InvertibleModule, zero_logdet
from ..errors import ShapeError


class Squeeze(InvertibleModule):
    """Space-to-depth: (C, H, W) -> (C·f², H/f, W/f), Glow's ordering; logdet = 0.

    Output channel c·f² + i·f + j holds input channel c at offset (i, j) of each f×f block,
    which is exactly ``F.pixel_unshuffle`` (and its inverse ``F.pixel_shuffle``).
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ShapeError(f"Squeeze({f}) needs H and W divisible by {f}, got "
                             f"{x.shape[2]}×{x.shape[3]}")
        return F.pixel_unshuffle(x, f), zero_logdet(x)

    def inverse(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z, self.factor)


def split_channels(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split B×C×H×W into the first C − C//2 channels and the last C//2 channels.

    x1 continues through the flow, x2 is factored out (Glow / mAR-SCF multi-scale split).
    """
    c = x.shape[1]
    return x[:, : c - c // 2], x[:, c - c // 2 :]


def merge_channels(x1: Tensor, x2: Tensor) -> Tensor:
    """Inverse of ``split_channels``."""
    return torch.cat([x1, x2], dim=1)


def patchify(x: Tensor, p: int) -> Tensor:
    """B×C×H×W -> B×N_t×(C·P²): one row per non-overlapping P×P patch (token), tokens in
    row-major order, entries in (c, i, j) order (``F.pixel_unshuffle`` then transpose)."""
    return F.pixel_unshuffle(x, p).flatten(2).transpose(1, 2)


def unpatchify(tokens: Tensor, shape: tuple[int, int, int], p: int) -> Tensor:
    """Inverse of ``patchify`` for images of ``shape`` = (C, H, W)."""
    c, h, w = shape
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], c * p * p, h // p, w // p)
    return F.pixel_shuffle(grid, p)
