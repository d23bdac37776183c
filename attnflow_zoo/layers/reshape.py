"""Shape-changing, volume-preserving layers: squeeze and the channel split."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import InvertibleModule, zero_logdet
from ..errors import ShapeError


class Squeeze(InvertibleModule):
    """Space-to-depth: (C, H, W) -> (C·f², H/f, W/f), Glow's ordering; logdet = 0.

    Output channel c·f² + i·f + j holds input channel c at offset (i, j) of each f×f block.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ShapeError(f"Squeeze({f}) needs H and W divisible by {f}, got {h}×{w}")
        z = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, c * f * f, h // f, w // f), zero_logdet(x)

    def inverse(self, z: Tensor) -> Tensor:
        b, c, h, w = z.shape
        f = self.factor
        x = z.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // (f * f), h * f, w * f)


def split_channels(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split B×C×H×W into the first C − C//2 channels and the last C//2 channels.

    x1 continues through the flow, x2 is factored out (Glow / mAR-SCF multi-scale split).
    """
    c = x.shape[1]
    return x[:, : c - c // 2], x[:, c - c // 2 :]


def merge_channels(x1: Tensor, x2: Tensor) -> Tensor:
    """Inverse of ``split_channels``."""
    return torch.cat([x1, x2], dim=1)
