"""Sampling to files: seeded draws at a temperature, saved as a PNG grid or a uint8 NPZ."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_path, check_writable
from ..compilation import compile_sampling
from ..core import resolve_device
from ..data import quantize
from ..errors import ConfigError, check_positive_int
from ..models.base import check_sampling
from ..precision import autocast_for, upcast
from ..progress import progress
from ..resources import check_memory

#: File types ``save_samples`` writes.
SUFFIXES = (".png", ".jpg", ".jpeg", ".npz")
#: The largest grid ``save_samples`` draws, in pixels: PIL's decompression-bomb limit
#: (``PIL.Image.MAX_IMAGE_PIXELS``), past which the picture it writes cannot be opened again
#: without lifting PIL's guard.
MAX_GRID_PIXELS = 89_478_485


def draw_samples(model: Any, num_samples: int, **options: Any) -> Tensor:
    """uint8 samples, num_samples×C×H×W, on the CPU: ``draw_checked_samples(...).images``
    (the same keyword options)."""
    return draw_checked_samples(model, num_samples, **options).images


@torch.no_grad()
def draw_checked_samples(model: Any, num_samples: int, *, temperature: float = 1.0,
                         seed: int = 0, batch_size: int = 256,
                         device: torch.device | str = "cpu", precision: str = "fp32",
                         compile: bool = False, labels: Tensor | None = None,
                         guidance: float = 0.0, denoise: bool = False,
                         options: dict[str, Any] | None = None) -> quantize.CheckedImages:
    """num_samples uint8 samples (C×H×W, on the CPU) and how many were non-finite or out of
    range before the uint8 conversion (``data.quantize.checked_images``: such images are
    counted and drawn marked, never as plain tiles).

    The draws come from one ``torch.Generator`` seeded with ``seed`` on the model's device, so a
    (seed, batch_size, device) triple always gives the same images. ``temperature`` scales the
    prior's standard deviation (Glow's T; T < 1 trades diversity for quality). ``precision``
    ("fp32", "bf16", "fp16" on CUDA) is ``attnflow_zoo.precision``'s autocast; ``compile``
    compiles the deterministic decoder (``compilation.compile_sampling``: the same noise, the
    same images to float tolerance; a last partial batch compiles once more). ``labels``: the
    class of each sample, (num_samples,), for a class-conditional model (None: every class in
    turn, ``FlowModel.sample``'s default; see ``class_labels``). ``guidance``, ``denoise`` and
    the family's ``options`` are ``FlowModel.sample``'s (guidance w; one score-based denoising
    step of a noise-trained checkpoint; e.g. TarFlow's ``attention_temperature``, ``annealed``).
    """
    check_request(num_samples, temperature, batch_size)
    if labels is not None and tuple(labels.shape) != (num_samples,):
        raise ConfigError(f"expected {num_samples} labels, got {tuple(labels.shape)}")
    device = resolve_device(device)
    autocast_for(device, precision)  # refuses an unknown precision before any work
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    extra = model.guidance_arguments(guidance, dict(options or {}))
    if denoise:
        model.denoising_std()  # refuses a likelihood checkpoint before any work
    if extra and compile:
        raise ConfigError("`compile` samples without guidance; drop `compile` or `guidance`")
    generate = _generator(model, compile)
    out = []
    with progress("sample", total=num_samples) as advance:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            y = model.default_labels(n, device) if labels is None else \
                labels[start:start + n].to(device)
            with autocast_for(device, precision):
                x = generate(n, temperature, gen, y=y, **extra) if y is not None else \
                    generate(n, temperature, gen, **extra)
                if denoise:
                    x = model.denoise(upcast(x), y)
            checked = quantize.checked_images(upcast(x))
            out.append(quantize.CheckedImages(checked.images.cpu(), checked.num_nonfinite,
                                              checked.num_out_of_range))
            advance(n)
    return quantize.CheckedImages.concat(out)


def _generator(model: Any, compile: bool) -> Any:
    """``generate(n, temperature, generator)`` of ``model``, compiled if asked and possible."""
    if not compile:
        return model.generate
    if not hasattr(model, "generate_from_noise"):
        raise ConfigError(f"`compile`: {type(model).__name__} has no separable sampler "
                          "(generate_from_noise); sample without `compile`")
    return compile_sampling(model)


def class_labels(model: Any, which: str | int | None, num_samples: int
                 ) -> tuple[Tensor | None, int | None]:
    """(labels, images per grid row) of ``attnflow sample --class``: None draws what the model
    draws by default; an int k draws ``num_samples`` images of class k; ``"all"`` draws every
    class, ⌈num_samples / K⌉ images each, class after class, so that a grid of that many images
    per row has one row per class. ``ConfigError`` (saying what to do) for a class the model
    does not have or a class given to an unconditional model."""
    k = model.num_classes
    if which is None:
        return None, None
    if k == 0:
        raise ConfigError("this model is unconditional (num_classes = 0): drop `which`, or "
                          "sample a class-conditional checkpoint")
    if str(which).strip().lower() == "all":
        per = max(1, math.ceil(num_samples / k))
        return torch.arange(k).repeat_interleave(per), per
    try:
        label = int(str(which))
    except ValueError:
        raise ConfigError(f"`which` takes a class number 0..{k - 1} or 'all', got "
                          f"{which!r}") from None
    if not 0 <= label < k:
        raise ConfigError(f"class {label} is not one of the model's {k} classes; pass "
                          f"`which` 0..{k - 1} or `which` all")
    return torch.full((num_samples,), label, dtype=torch.int64), None


def check_request(num_samples: int, temperature: float, batch_size: int) -> None:
    """``ConfigError`` for a draw ``draw_samples`` refuses (checked before a model is loaded)."""
    check_sampling(num_samples, temperature)
    if temperature == 0:
        raise ConfigError("the temperature must be positive for sampling to files (0 gives the "
                          "mode chain: use model.sample(n, temperature=0) for that)")
    check_positive_int("the batch size", batch_size)


def check_output(path: str | Path) -> Path:
    """``ConfigError`` unless ``path`` has a suffix ``save_samples`` writes, ``OutputError``
    unless it can be written (both checked before any sample is drawn)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"cannot save samples as {path.suffix or 'a file without suffix'}; use "
                          ".png for a grid or .npz for the raw uint8 array")
    return check_writable(path)


def save_samples(images: Tensor, path: str | Path, nrow: int | None = None,
                 padding: int = 2) -> Path:
    """Write uint8 images B×C×H×W to ``path`` atomically: ``.png`` (a grid, ``nrow`` per row,
    default ⌈√B⌉) or ``.npz`` (array ``images`` of shape B×H×W×C, uint8, lossless)."""
    import numpy as np
    from torchvision.utils import save_image

    path = check_output(path)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(f"expected uint8 B×C×H×W images, got {images.dtype} "
                          f"{tuple(images.shape)}")
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as fh:  # a file object: np.savez adds no ".npz" suffix
                np.savez_compressed(fh, images=images.permute(0, 2, 3, 1).contiguous().numpy())
        else:
            nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
            save_image(images.float() / 255.0, tmp, nrow=nrow, padding=padding,
                       format=suffix.lstrip(".").replace("jpg", "jpeg").upper())
    return path


def grid_shape(num_images: int, image_shape: tuple[int, ...], nrow: int | None = None,
               padding: int = 2) -> tuple[int, int]:
    """(height, width) in pixels of the grid ``save_samples`` draws (``make_grid``'s layout)."""
    _, h, w = image_shape
    per_row = min(nrow or math.ceil(math.sqrt(num_images)), num_images)
    rows = math.ceil(num_images / per_row)
    return rows * (h + padding) + padding, per_row * (w + padding) + padding


def check_size(num_images: int, image_shape: tuple[int, ...], output: str | Path,
               nrow: int | None = None) -> None:
    """``ConfigError`` before any image is drawn when ``num_images`` images of ``image_shape``
    cannot be kept and written to ``output``: a grid past ``MAX_GRID_PIXELS``, or more memory
    than is available now (the images are held twice while they are gathered; an .npz copies
    them once more, a grid is drawn as float pictures of the images and of the grid)."""
    image_bytes = num_images * math.prod(image_shape)
    if Path(output).suffix.lower() == ".npz":
        check_memory(3 * image_bytes, f"an array of {num_images:,} images",
                     "ask for fewer images")
        return
    height, width = grid_shape(num_images, image_shape, nrow)
    if height * width > MAX_GRID_PIXELS:
        raise ConfigError(f"a grid of {num_images:,} images of "
                          f"{'×'.join(map(str, image_shape))} is {width:,}×{height:,} pixels, "
                          f"more than the {MAX_GRID_PIXELS:,} an image viewer opens (PIL's "
                          "limit); ask for fewer images, or write an .npz array")
    check_memory(6 * image_bytes + 9 * image_shape[0] * height * width,
                 f"a grid of {num_images:,} images", "ask for fewer images")
