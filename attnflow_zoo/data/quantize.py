"""8-bit images <-> continuous: the one place of the uniform-dequantisation rule.

``dequantize`` is the rule that ``metrics.bits_per_dim`` assumes: x̃ = (x_u8 + u) / 256 with
u ~ U(0, 1)^D, so x̃ ∈ [0, 1)^D; the zoo's model space is x = x̃ − 0.5. Generated images go back
to uint8 through ``checked_images``, which counts and marks the non-finite and out-of-range ones
(``unrepresentable``) that the clamp of ``quantize`` would hide.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --- generated images that the uint8 conversion would hide ---------------------------------------

#: How far past the data range [−½, ½) a model-space value may lie and the image still count as in
#: range: half the range, so |x| ≤ 1. Samples routinely put background pixels a little past the
#: edge, which the clamp of ``quantize`` rightly removes; beyond this margin the clamp would hide
#: an image that is not one.
OUT_OF_RANGE_MARGIN = 0.5

#: Side of the squares of the checkerboard that stands in for a non-finite image.
_CHECK = 4


def unrepresentable(x: Tensor, margin: float = OUT_OF_RANGE_MARGIN) -> tuple[Tensor, Tensor]:
    """The one rule for generated images the uint8 conversion would hide: (non-finite, out of
    range), two (B,) bool masks of model-space images x (B×…). Non-finite: some value is NaN or
    ±inf. Out of range: finite, with some value outside [−½ − margin, ½ + margin]."""
    flat = x.detach().flatten(1)
    finite = torch.isfinite(flat).all(1)
    return ~finite, finite & (flat.abs() > 0.5 + margin).any(1)


@dataclass(frozen=True)
class CheckedImages:
    """uint8 images of model-space x and how many of them ``unrepresentable`` flagged.

    Attributes:
        images: uint8 B×C×H×W, ``from_model_space(x)`` except that no flagged image passes for
            a sample: a non-finite image is drawn as a black-and-white checkerboard of 4×4-pixel
            squares (never as the black tile its NaNs would quantise to), and an out-of-range one
            (clamped) inside a dotted black-and-white frame one pixel wide.
        num_nonfinite: images with a non-finite value.
        num_out_of_range: finite images past ``OUT_OF_RANGE_MARGIN``.
    """

    images: Tensor
    num_nonfinite: int
    num_out_of_range: int

    def counts(self) -> dict[str, int]:
        """{"num_images", "num_nonfinite", "num_out_of_range"}, for JSON."""
        return {"num_images": len(self.images), "num_nonfinite": self.num_nonfinite,
                "num_out_of_range": self.num_out_of_range}

    def summary(self) -> str:
        """``describe_unrepresentable`` of these counts."""
        return describe_unrepresentable(**self.counts())

    @staticmethod
    def concat(parts: list[CheckedImages]) -> CheckedImages:
        """Batches of checked images as one."""
        return CheckedImages(torch.cat([p.images for p in parts]),
                             sum(p.num_nonfinite for p in parts),
                             sum(p.num_out_of_range for p in parts))


def describe_unrepresentable(num_images: int, num_nonfinite: int, num_out_of_range: int) -> str:
    """One sentence with both counts of ``CheckedImages`` and how the flagged images are drawn
    (what the commands print)."""
    return (f"{num_nonfinite} of {num_images} images non-finite (drawn as a checkerboard), "
            f"{num_out_of_range} out of range (|x| > {0.5 + OUT_OF_RANGE_MARGIN:g} in model "
            "space: clamped, drawn in a dotted frame) before the uint8 conversion")


def checked_images(x: Tensor, margin: float = OUT_OF_RANGE_MARGIN) -> CheckedImages:
    """``from_model_space`` of model-space images x (B×C×H×W), with the images that
    ``unrepresentable`` flags counted and marked (``CheckedImages``); on x's device."""
    non_finite, out_of_range = unrepresentable(x, margin)
    images = from_model_space(torch.nan_to_num(x.detach(), nan=0.0))
    h, w = images.shape[-2:]
    i = torch.arange(h, device=x.device).view(-1, 1)
    j = torch.arange(w, device=x.device).view(1, -1)
    checker = ((i // _CHECK + j // _CHECK) % 2 * 255).to(torch.uint8)
    dots = ((i + j) % 2 * 255).to(torch.uint8)
    border = (i == 0) | (i == h - 1) | (j == 0) | (j == w - 1)
    images = torch.where(non_finite.view(-1, 1, 1, 1), checker, images)
    images = torch.where(out_of_range.view(-1, 1, 1, 1) & border, dots, images)
    return CheckedImages(images, int(non_finite.sum()), int(out_of_range.sum()))
