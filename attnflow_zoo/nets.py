"""Non-invertible conditioner networks used inside invertible layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers.normalization import ActNorm


class ActNormNoLogdet(ActNorm):
    """ActNorm used as a plain normalisation inside a conditioner (its logdet is irrelevant)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class ZeroConv2d(nn.Module):
    """Conv2d initialised to zero, output scaled by exp(3·logs) (Glow's ``Conv2dZeros``).

    Zero initialisation makes the layer that uses it start at (or next to) the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class CouplingNet(nn.Sequential):
    """NN(x_a) of mAR-SCF's affine coupling (SPEC §3):
    Conv3×3 → ActNorm → ReLU → Conv1×1 → ActNorm → ReLU → ZeroConv3×3.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            ActNormNoLogdet(hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False),
            ActNormNoLogdet(hidden_channels),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels),
        )
        for m in (self[0], self[3]):
            nn.init.normal_(m.weight, std=0.05)
