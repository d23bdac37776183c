"""Latent tools of the multi-scale models: every split latent, its whitened form, spherical
interpolation and reconstruction.

A multi-scale model (``AttnFlow`` / MaR-Flow, ``ResFlow``) maps x to one latent per level,
``model.encode_latents(x, y=None)`` -> [z_1, …, z_L], z_l of shape B×``model.latent_shapes[l]``
(the halves factored out after each level but the last, then the last level's output; their
flattened concatenation is ``model(x)[0]``), and back with ``model.decode_latents(latents)``.

Whitened latents (Glow's interpolation space, Kingma & Dhariwal 2018 §5.3): ε_l = (z_l − μ_l)/σ_l,
where (μ_l, σ_l) are level l's prior parameters (``model.latent_priors``). What they depend on:

- AttnFlow, Gaussian prior: the kept half z1_l that continues to the coarser levels (rebuilt
  from the coarser latents by the inverse flow) and e_y for a class-conditional model;
- AttnFlow, mAR prior: the same, and z_l's earlier channels: ε_{l,c} = (z_{l,c} − μ_c(z_{l,<c},
  cond_l))/σ_c(·), teacher forced. Decoding ε re-runs the prior's recurrence channel by channel
  and level by level, deepest first (``model.unwhiten_latents``);
- ResFlow: the learned diagonal Gaussian (the same μ, σ for every image and level).

So under the model, ε ~ N(0, I) on every level, and ``unwhiten(whiten(z)) == z`` to float
rounding (the conditioning is recomputed through the inverse flow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core import resolve_device
from ..data import quantize as q8
from ..data.images import read_image
from ..errors import ConfigError
from .sampling import check_output, save_samples

#: What a model must offer for these tools.
LATENT_METHODS = ("encode_latents", "decode_latents", "latent_priors", "unwhiten_latents")


def check_supported(model: Any) -> None:
    """``ConfigError`` unless ``model`` has per-level latents (AttnFlow, MaR-Flow, ResFlow)."""
    if not all(callable(getattr(model, m, None)) for m in LATENT_METHODS):
        raise ConfigError(f"{type(model).__name__} has no per-level latents; use an AttnFlow, "
                          "MaR-Flow or ResFlow checkpoint")


def centred(model: Any, x_u8: Tensor) -> Tensor:
    """x = (x_u8 + ½)/256 − ½: uint8 images at their bins' centres in the model's input space
    (``q8.to_model_space`` without the noise), on its device and in its dtype. Deterministic,
    and any x within ½/256 of it quantises back to x_u8."""
    model.check_images(x_u8)
    return q8.bin_centres(x_u8.to(model.device), model.dtype)


def whiten(model: Any, latents: list[Tensor], y: Tensor | int | None = None) -> list[Tensor]:
    """ε_l = (z_l − μ_l)/σ_l for every level, shapes as ``latents`` (see the module docstring
    for what μ_l, σ_l depend on)."""
    check_supported(model)
    return [(z - mean) * torch.exp(-log_std) for z, (mean, log_std) in
            zip(latents, model.latent_priors(latents, y), strict=True)]


def unwhiten(model: Any, eps: list[Tensor], y: Tensor | int | None = None) -> list[Tensor]:
    """The inverse of ``whiten``: whitened latents -> latents (the priors' recurrence)."""
    check_supported(model)
    return model.unwhiten_latents(eps, y)


def flatten(latents: list[Tensor]) -> Tensor:
    """Per-level latents -> one B×D vector per image (level order, each level C-major)."""
    return torch.cat([z.flatten(1) for z in latents], 1)


def unflatten(model: Any, z: Tensor) -> list[Tensor]:
    """The inverse of ``flatten`` for ``model.latent_shapes``."""
    sizes = [math.prod(s) for s in model.latent_shapes]
    return [p.reshape(-1, *s) for p, s in
            zip(torch.split(z, sizes, 1), model.latent_shapes, strict=True)]


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation per row of B×D vectors a, b:
    slerp(t) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, cos Ω = â·b̂.

    The arc runs between the directions, and the norm moves from |a| to |b| as on the great
    circle (Glow / White 2016). Where a and b are (anti-)parallel within float rounding the
    angle is ill-defined and the line (1 − t)·a + t·b is used.
    """
    dot = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    omega = torch.arccos(dot.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = sin.abs() < 1e-6
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(linear, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    return wa * a + wb * b


@dataclass(frozen=True)
class Interpolation:
    """What ``interpolate`` gives.

    Attributes:
        images: uint8 ``steps``×C×H×W (on the CPU), image i at t = i/(steps − 1); non-finite and
            out-of-range images marked (``data.quantize.checked_images``).
        num_nonfinite: images whose decoding overflowed (non-finite values): a flow's inverse
            can blow up away from the data it was trained on (e.g. the unbounded sigmoid
            coupling divides by σ(·), which tends to 0 there); the ends never do.
        num_out_of_range: finite images past the data range (``data.quantize.unrepresentable``).
    """

    images: Tensor
    num_nonfinite: int
    num_out_of_range: int


@torch.no_grad()
def interpolate(model: Any, x_a_u8: Tensor, x_b_u8: Tensor, steps: int,
                y: Tensor | int | None = None) -> Interpolation:
    """Images along the spherical path between two images' whitened latents: image i decodes
    slerp(ε_a, ε_b, i/(steps − 1)) (ε: all levels' whitened latents as one vector). The ends
    reproduce the inputs.

    Args:
        model: a multi-scale zoo model (``check_supported``).
        x_a_u8, x_b_u8: one uint8 image each, C×H×W or 1×C×H×W.
        steps: images on the path, ≥ 2 (the two ends included).
        y: the class of both images (a class-conditional model only).
    """
    check_steps(steps)
    check_supported(model)
    ends = torch.cat([x.reshape(1, *x.shape[-3:]) for x in (x_a_u8, x_b_u8)])
    labels = None if y is None else torch.as_tensor(y).reshape(-1).expand(2)
    eps = flatten(whiten(model, model.encode_latents(centred(model, ends), labels), labels))
    path = torch.cat([slerp(eps[:1], eps[1:], i / (steps - 1)) for i in range(steps)])
    path_labels = None if labels is None else labels[:1].expand(steps)
    latents = unwhiten(model, unflatten(model, path), path_labels)
    checked = _checked(model.decode_latents(latents, path_labels))
    return Interpolation(checked.images, checked.num_nonfinite, checked.num_out_of_range)


def check_steps(steps: int) -> None:
    """``ConfigError`` unless ``steps`` is an integer ≥ 2."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"the number of steps must be an integer ≥ 2 (the two ends included), "
                          f"got {steps!r}")


@dataclass(frozen=True)
class Reconstruction:
    """What ``reconstruct`` gives.

    Attributes:
        images: the reconstructions, uint8 B×C×H×W (on the CPU).
        max_error: max |f⁻¹(f(x)) − x| over every pixel, in the model's input space (units of
            the [0, 1] intensity; 1/256 is one grey level).
        num_changed: how many uint8 values differ from the input after quantising.
        num_nonfinite, num_out_of_range: reconstructions that were non-finite or out of range
            before the uint8 conversion (``data.quantize.checked_images``; drawn marked).
    """

    images: Tensor
    max_error: float
    num_changed: int
    num_nonfinite: int = 0
    num_out_of_range: int = 0


@torch.no_grad()
def reconstruct(model: Any, x_u8: Tensor, y: Tensor | int | None = None) -> Reconstruction:
    """images -> ``encode_latents`` -> ``decode_latents`` -> images, at the bins' centres."""
    check_supported(model)
    x = centred(model, x_u8)
    x_rec = model.decode_latents(model.encode_latents(x, y), y)
    checked = _checked(x_rec)
    return Reconstruction(checked.images, float((x_rec - x).abs().max()),
                          int((checked.images != x_u8.cpu()).sum()), checked.num_nonfinite,
                          checked.num_out_of_range)


def _checked(x: Tensor) -> q8.CheckedImages:
    """Model-space x -> counted and marked uint8 images on the CPU."""
    checked = q8.checked_images(x)
    return q8.CheckedImages(checked.images.cpu(), checked.num_nonfinite,
                            checked.num_out_of_range)


# --- files -------------------------------------------------------------------------------------

def reconstruct_files(model: Any, paths: list[str | Path], output: str | Path,
                      device: str | torch.device = "auto") -> dict[str, Any]:
    """``reconstruct`` image files (fitted to the model by ``images.read_image``) and write a PNG
    with the inputs in the first row and their reconstructions in the second. Returns
    {"path", "num_images", "max_error", "num_changed", "num_nonfinite", "num_out_of_range"}."""
    check_supported(model)
    if not paths:
        raise ConfigError("give at least one image (--image PATH)")
    check_output(output)
    images = torch.stack([read_image(p, model.input_shape) for p in paths])
    model = model.to(resolve_device(device)).eval()
    result = reconstruct(model, images)
    path = save_samples(torch.cat([images, result.images]), output, nrow=len(paths))
    return {"path": str(path), "num_images": len(paths), "max_error": result.max_error,
            "num_changed": result.num_changed, "num_nonfinite": result.num_nonfinite,
            "num_out_of_range": result.num_out_of_range}


def interpolate_files(model: Any, path_a: str | Path, path_b: str | Path, steps: int,
                      output: str | Path, device: str | torch.device = "auto") -> dict[str, Any]:
    """``interpolate`` between two image files and write the path as a one-row PNG strip.
    Returns {"path", "steps", "num_nonfinite", "num_out_of_range"}."""
    check_supported(model)
    check_output(output)
    check_steps(steps)
    a, b = (read_image(p, model.input_shape) for p in (path_a, path_b))
    model = model.to(resolve_device(device)).eval()
    result = interpolate(model, a, b, steps)
    path = save_samples(result.images, output, nrow=steps)
    return {"path": str(path), "steps": steps, "num_nonfinite": result.num_nonfinite,
            "num_out_of_range": result.num_out_of_range}
