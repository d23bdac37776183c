"""The data of a run: the validation split carved from train, and how ``run.json`` and a
resume describe the data (name or folder, limit)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core import randn_like_on
from ..data import datasets, quantize
from ..errors import DataError
from .config import TrainConfig


def model_input(x_u8: Tensor, generator: torch.Generator | None, noise_std: float = 0.0
                ) -> Tensor:
    """The model-space batch a step trains on: the uniformly dequantised images
    (``quantize.to_model_space``) for σ = 0, else the bins' centres plus N(0, σ²) noise
    (``quantize.bin_centres`` + σ·ε; TarFlow's noise augmentation, SPEC §6)."""
    if noise_std == 0:
        return quantize.to_model_space(x_u8, generator)
    x = quantize.bin_centres(x_u8)
    return x + noise_std * randn_like_on(tuple(x.shape), x, generator)


def carve_validation(images: Tensor, config: TrainConfig) -> tuple[Tensor, Tensor | None]:
    """(train, validation): ``config.validation_count`` images drawn out of ``images`` with a
    generator seeded by ``config.seed`` (both keep the dataset's order). The carving depends on
    the number of rows only, so the images' labels are carved alike by a second call."""
    num_val = config.validation_count(len(images))
    if num_val == 0:
        return images, None
    if len(images) - num_val < config.batch_size:
        raise DataError(f"{len(images)} training images leave fewer than one batch of "
                        f"{config.batch_size} after the {num_val} validation images; lower "
                        "--batch-size or --validation, or use more images")
    g = torch.Generator().manual_seed(config.seed * 15_485_863 + 104_729)
    perm = torch.randperm(len(images), generator=g)
    return images[perm[num_val:].sort().values], images[perm[:num_val].sort().values]


def data_record(dataset: str | os.PathLike[str], limit: int | None, heldout: str | None,
                eval_limit: int | None) -> dict[str, Any]:
    """The ``dataset`` entry of ``run.json`` for a named dataset or a local folder."""
    named = datasets.dataset_spec(dataset) is not None
    return {"name": str(dataset).lower() if named else None,
            "path": None if named else str(Path(dataset).expanduser().resolve()),
            "train_split": "train", "heldout_split": heldout, "limit": limit,
            "eval_limit": eval_limit, "limit_rule": datasets.LIMIT_RULE}


def run_settings(config: TrainConfig, info: dict[str, Any]) -> dict[str, Any]:
    """What a resume compares: the TrainConfig and the data it trains on."""
    ds = info.get("dataset") or {}
    return {**config.to_dict(), "dataset": ds.get("name") or ds.get("path"),
            "limit": ds.get("limit"), "eval_limit": ds.get("eval_limit")}

