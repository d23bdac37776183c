"""Training-time augmentation of uint8 image batches (mAR-SCF's shift + flip)."""

from __future__ import annotations

import torch
from torch import Tensor


def augment(x: Tensor, generator: torch.Generator | None = None, *, max_shift: int = 3,
            flip: bool = True) -> Tensor:
    """Random translation with edge padding and horizontal flip, per image, on x's device.

    y[b, c, i, j] = x[b, c, clamp(i − dy_b), clamp(j' − dx_b)] with dy_b, dx_b ~ U{−s..s}
    (s = ``max_shift``) and j' = W−1−j with probability ½ when ``flip`` (mAR-SCF's CIFAR-10
    recipe: shift ≤ 3 px + flip; use ``flip=False`` for digits). Works for any dtype (uint8
    included), B×C×H×W; never writes into ``x``.
    """
    b, _, h, w = x.shape
    gen_device = generator.device if generator is not None else x.device
    shifts = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator,
                           device=gen_device).to(x.device)
    rows = (torch.arange(h, device=x.device)[None] - shifts[0][:, None]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None] - shifts[1][:, None]).clamp(0, w - 1)
    if flip:
        flips = (torch.rand(b, generator=generator, device=gen_device) < 0.5).to(x.device)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    idx = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (B, H, W, C) -> back to B×C×H×W.
    return x.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2) \
        .contiguous()
