"""Image files -> uint8 arrays: mode conversion, fitting to a square size (centre crop + resize,
or zero padding) and a sentence saying what was done to them (``data`` calls it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..progress import progress


def _to_array(img: Image.Image) -> np.ndarray:
    """A PIL image as H×W (grey) or H×W×3 (colour) uint8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
    if img.mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))


def _fit(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w >= size and h >= size and (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != size:
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return img


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[:2]
    if h > size or w > size:
        raise DataError(f"an image of {h}×{w} is neither larger nor smaller than {size}×{size} "
                        "on both sides; pick an image_size the images can be cropped or padded to")
    top, left = (size - h) // 2, (size - w) // 2
    pad = [(top, size - h - top), (left, size - w - left)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)


def decode(ds, column: str, image_size: int | None, description: str
            ) -> tuple[Tensor, set[tuple[int, int]]]:
    """(uint8 N×C×H×W, the set of the source images' (H, W))."""
    arrays: list[np.ndarray] = []
    sizes: set[tuple[int, int]] = set()
    try:
        with progress(description, total=len(ds)) as advance:
            for batch in ds.iter(batch_size=256):
                for img in batch[column]:
                    sizes.add((img.size[1], img.size[0]))
                    if image_size is not None:
                        a = _to_array(_fit(img, image_size))
                        if a.shape[:2] != (image_size, image_size):
                            a = _pad(a, image_size)
                    else:
                        a = _to_array(img)
                    arrays.append(a)
                advance(len(batch[column]))
    except (OSError, SyntaxError) as err:  # PIL's errors for unreadable files
        raise DataError(f"cannot decode an image: {err}; remove or fix the file") from err
    if not arrays:
        raise DataError("the split holds no images; check the folder or split name")
    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) > 1:
        sizes = ", ".join(f"{h}×{w}" for h, w in sorted(shapes)[:4])
        raise DataError(f"images of different sizes ({sizes}…); pass image_size to crop/resize "
                        "them to one size")
    color = any(a.ndim == 3 for a in arrays)
    out = np.empty((len(arrays), 3 if color else 1, *arrays[0].shape[:2]), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    return torch.from_numpy(out), sizes


def resize_note(sizes: set[tuple[int, int]], image_size: int | None) -> str:
    """What ``image_size`` did to images of ``sizes`` (empty when nothing was changed)."""
    if image_size is None or sizes == {(image_size, image_size)}:
        return ""
    s = image_size
    done = []
    for h, w in sorted(sizes)[:3]:
        if h >= s and w >= s:
            crop = f"centre-cropped to {min(h, w)}×{min(h, w)}, " if h != w else ""
            done.append(f"{h}×{w} {crop}resized (bilinear) to {s}×{s}")
        else:
            done.append(f"{h}×{w} zero-padded to {s}×{s}")
    more = f" (and {len(sizes) - 3} more sizes)" if len(sizes) > 3 else ""
    return (f"images of {'; '.join(done)}{more} to fit the model; pass `image_size` to train "
            "at another size")


def read_image(path: str | Path, shape: tuple[int, int, int]) -> Tensor:
    """One image file -> uint8 C×H×W at a model's (C, H, W) (square H = W): centre-cropped and
    resized or zero-padded to H as the datasets are; grey to C = 3 by repeating the channel,
    colour to C = 1 by PIL's luma ("L")."""
    c, h, w = shape
    if h != w or c not in (1, 3):
        raise DataError(f"cannot fit an image file to {c}×{h}×{w}; models take square grey or "
                        "RGB images")
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            a = _to_array(_fit(img.convert("L") if c == 1 and img.mode not in
                               ("I;16", "I;16B", "I;16L", "I", "1", "L", "LA") else img, h))
    except FileNotFoundError as err:
        raise DataError(f"no image file {path}; check the path") from err
    except (OSError, SyntaxError) as err:  # PIL's errors for unreadable files
        raise DataError(f"cannot read {path} as an image ({err}); give a PNG or JPEG") from err
    if a.shape[:2] != (h, w):
        a = _pad(a, h)
    x = torch.from_numpy(np.array(a.transpose(2, 0, 1) if a.ndim == 3 else a[None]))
    return x.expand(c, h, w).clone() if x.shape[0] != c else x
