"""Data: 8-bit images <-> the continuous space the flows model.

``dequantize`` is the one place of the uniform-dequantisation rule that ``metrics.bits_per_dim``
assumes: x̃ = (x_u8 + u) / 256 with u ~ U(0, 1)^D, so x̃ ∈ [0, 1)^D.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dequantize(x_u8: Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """x̃ = (x_u8 + u) / 256, u ~ U(0, 1) per element; uint8 B×C×H×W -> float in [0, 1)."""
    x = x_u8.to(dtype)
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device) \
        if generator is None or generator.device == x.device \
        else torch.rand(x.shape, generator=generator, dtype=dtype).to(x.device)
    return (x + u) / 256.0


def quantize(x: Tensor) -> Tensor:
    """Inverse of ``dequantize`` up to the noise: x̃ ∈ [0, 1) -> uint8 floor(256·x̃), clamped."""
    return torch.floor(x * 256.0).clamp_(0, 255).to(torch.uint8)
