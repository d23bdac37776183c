"""Scoring models: held-out bits/dim of a model or a checkpoint, and FID."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from . import data
from .core import resolve_device
from .factory import load_model
from .metrics import dataset_statistics, fid_from_model, load_inception
from .progress import progress


@torch.no_grad()
def evaluate_bpd(model: nn.Module, images_u8: Tensor, batch_size: int = 256,
                 generator: torch.Generator | None = None, show_progress: bool | None = None
                 ) -> float:
    """Mean per-image bits/dim of ``images_u8`` (N×C×H×W uint8), single-sample dequantisation.

    bpd = (1/N) Σ_i model.bits_per_dim(x_i) (SPEC §4). The noise is drawn batch after batch from
    ``generator`` (on the model's device if given on CPU it is used there and moved), so the same
    seed and batch size give the same number — ``fit`` logs with ``eval_seed`` /
    ``eval_batch_size`` and ``attnflow evaluate`` uses the same defaults.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with progress("evaluate", total=len(images_u8), show=show_progress) as advance:
            for start in range(0, len(images_u8), batch_size):
                batch = images_u8[start:start + batch_size]
                bpd = model.bits_per_dim(batch, generator=generator)
                total += bpd.double().sum().cpu()
                advance(len(batch), bpd=f"{total.item() / (start + len(batch)):.4f}")
    finally:
        model.train(was_training)
    return float(total / len(images_u8))


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], dataset: str | os.PathLike[str],
                        split: str = "test", *, batch_size: int = 256, seed: int = 0,
                        limit: int | None = None, device: str = "auto", fid: bool = False,
                        num_samples: int = 50_000, temperature: float = 1.0,
                        inception_weights: str | os.PathLike[str] | None = None,
                        show_progress: bool | None = None) -> dict[str, Any]:
    """Held-out bits/dim (``evaluate_bpd`` with a generator seeded ``seed`` — the numbers ``fit``
    logs with the same seed and batch size) and, with ``fid``, the FID of ``num_samples``
    samples against the dataset's train split."""
    dev = resolve_device(device)
    model = load_model(checkpoint).to(dev)
    images = data.load_for_shape(dataset, split, model.input_shape, limit=limit)
    g = torch.Generator(device=dev).manual_seed(seed)
    result: dict[str, Any] = {"bits_per_dim": evaluate_bpd(model, images, batch_size, g,
                                                           show_progress=show_progress),
                              "split": split, "num_images": len(images), "dataset": str(dataset),
                              "estimate": "single-sample dequantisation"}
    if fid:
        extractor = load_inception(inception_weights, device=dev)
        reference = dataset_statistics(dataset, "train", extractor,
                                       image_size=model.input_shape[1])  # type: ignore
        sample_gen = torch.Generator(device=dev).manual_seed(seed)
        res = fid_from_model(model, reference, num_samples=num_samples, temperature=temperature,
                             generator=sample_gen, extractor=extractor,
                             reference=f"{dataset} train")
        result.update(res.as_metrics())
    return result
