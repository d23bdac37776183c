"""8-bit images <-> continuous: the one place of the uniform-dequantisation rule.

``dequantize`` is the rule that ``metrics.bits_per_dim`` assumes: x̃ = (x_u8 + u) / 256 with
u ~ U(0, 1)^D, so x̃ ∈ [0, 1)^D; the zoo's model space is x = x̃ − 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError


def dequantize(x_u8: Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """x̃ = (x_u8 + u) / 256, u ~ U(0, 1) per element; uint8 B×C×H×W -> float in [0, 1).

    ``ShapeError`` unless x_u8 is uint8: a float image (e.g. ``x / 255``) would be scored on the
    wrong scale without any error otherwise.
    """
    if x_u8.dtype != torch.uint8:
        raise ShapeError(f"expected uint8 images (0..255), got {x_u8.dtype}; pass the raw 8-bit "
                         "images (e.g. `(x * 255).round().to(torch.uint8)` for floats in [0, 1])")
    x = x_u8.to(dtype)
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device) \
        if generator is None or generator.device == x.device \
        else torch.rand(x.shape, generator=generator, dtype=dtype).to(x.device)
    return (x + u) / 256.0


def to_model_space(x_u8: Tensor, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The zoo's model input x = x̃ − 0.5 ∈ [−0.5, 0.5) of uint8 images (x̃ = ``dequantize``).

    The one place of this rule: the shift has a unit Jacobian, so the density of x is the
    density of x̃ and ``metrics.bits_per_dim`` applies unchanged.
    """
    return dequantize(x_u8, generator, dtype) - 0.5


def bin_centres(x_u8: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``to_model_space`` without the noise: x = (x_u8 + ½)/256 − ½, the centres of the 8-bit
    bins (deterministic; any x within ½/256 of it maps back to x_u8 by ``from_model_space``)."""
    if x_u8.dtype != torch.uint8:
        raise ShapeError(f"expected uint8 images (0..255), got {x_u8.dtype}")
    return (x_u8.to(dtype) + 0.5) / 256.0 - 0.5


def from_model_space(x: Tensor) -> Tensor:
    """uint8 images of model-space x (the inverse of ``to_model_space`` up to the noise):
    ``quantize(x + ½)``."""
    return quantize(x + 0.5)


def quantize(x: Tensor) -> Tensor:
    """Inverse of ``dequantize`` up to the noise: x̃ ∈ [0, 1) -> uint8 floor(256·x̃), clamped."""
    return torch.floor(x * 256.0).clamp_(0, 255).to(torch.uint8)
