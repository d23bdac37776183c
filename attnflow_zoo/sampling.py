"""Sampling to files: seeded draws at a temperature, saved as a PNG grid or a uint8 NPZ."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .core import resolve_device  # noqa: F401 - re-exported for the CLI
from .errors import ConfigError
from .progress import progress


@torch.no_grad()
def draw_samples(model: Any, num_samples: int, *, temperature: float = 1.0, seed: int = 0,
                 batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """uint8 samples, num_samples×C×H×W, on the CPU.

    The draws come from one ``torch.Generator`` seeded with ``seed`` on the model's device, so a
    (seed, batch_size, device) triple always gives the same images. ``temperature`` scales the
    prior's standard deviation (Glow's T; T < 1 trades diversity for quality).
    """
    if num_samples < 1:
        raise ConfigError(f"the number of samples must be positive, got {num_samples}")
    if not temperature > 0:
        raise ConfigError(f"the temperature must be positive, got {temperature}")
    device = torch.device(device)
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    with progress("sample", total=num_samples) as advance:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            out.append(model.sample(n, temperature=temperature, generator=gen).cpu())
            advance(n)
    return torch.cat(out)


def save_samples(images: Tensor, path: str | Path, nrow: int | None = None,
                 padding: int = 2) -> Path:
    """Write uint8 images B×C×H×W to ``path``: ``.png`` (a grid, ``nrow`` per row, default
    ⌈√B⌉) or ``.npz`` (array ``images`` of shape B×H×W×C, uint8, lossless)."""
    import numpy as np
    from torchvision.utils import save_image

    path = Path(path)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(f"expected uint8 B×C×H×W images, got {images.dtype} "
                          f"{tuple(images.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez_compressed(path, images=images.permute(0, 2, 3, 1).contiguous().numpy())
    elif suffix in (".png", ".jpg", ".jpeg"):
        nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
        save_image(images.float() / 255.0, path, nrow=nrow, padding=padding)
    else:
        raise ConfigError(f"cannot save samples as {suffix or 'a file without suffix'}; use "
                          ".png for a grid or .npz for the raw uint8 array")
    return path
