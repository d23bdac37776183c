"""Bits per dimension: the one place of the rule (SPEC §4), and the scores of a model's density
on a set of images: its mean bits/dim and, for a class-conditional model, its Bayes-rule
accuracy (SPEC §7)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, check_positive_int
from .progress import progress

LOG_256 = math.log(256.0)


def bits_per_dim(log_prob: Tensor, num_dims: int) -> Tensor:
    """Bits per dimension of 8-bit data: bpd = (−log p(x̃) + D·ln 256) / (D·ln 2).

    Args:
        log_prob: log-density in nats of the dequantised data x̃ ∈ [0, 1)^D, any shape (e.g. (B,)).
        num_dims: D, the number of dimensions of one data point (C·H·W).

    A density that is uniform on the unit cube (log p = 0) scores exactly 8.
    """
    return (-log_prob + num_dims * LOG_256) / (num_dims * math.log(2.0))


def evaluate_bpd(model: nn.Module, images_u8: Tensor, batch_size: int = 256,
                 generator: torch.Generator | None = None, show_progress: bool | None = None,
                 labels: Tensor | None = None) -> float:
    """Mean per-image bits/dim of ``images_u8`` (N×C×H×W uint8), single-sample dequantisation.

    bpd = (1/N) Σ_i model.bits_per_dim(x_i) (SPEC §4). The noise is drawn batch after batch from
    ``generator`` (on the model's device if given on CPU it is used there and moved), so the same
    seed and batch size give the same number — ``fit`` logs with ``eval_seed`` /
    ``eval_batch_size`` and ``attnflow evaluate`` uses the same defaults. ``labels``: the
    images' classes, (N,), for a class-conditional model (bits/dim of x given its class).
    """
    check_positive_int("batch_size", batch_size)
    return mean_bpd(model, images_u8, batch_size, generator, show_progress, labels)


@torch.no_grad()
def mean_bpd(model: nn.Module, images_u8: Tensor, batch_size: int,
             generator: torch.Generator | None = None, show_progress: bool | None = None,
             labels: Tensor | None = None) -> float:
    """``evaluate_bpd`` for a caller that checked ``batch_size`` (a positive int) once, at its
    own entry point (``TrainConfig``'s ``eval_batch_size``, ``scores.evaluate_checkpoint``)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with progress("evaluate", total=len(images_u8), show=show_progress) as advance:
            for start in range(0, len(images_u8), batch_size):
                batch = images_u8[start:start + batch_size]
                y = None if labels is None else labels[start:start + batch_size]
                bpd = model.bits_per_dim(batch, y, generator=generator)
                total += bpd.double().sum().cpu()
                advance(len(batch), bpd=f"{total.item() / (start + len(batch)):.4f}")
    finally:
        model.train(was_training)
    return float(total / len(images_u8))


def bayes_accuracy(model: nn.Module, images_u8: Tensor, labels: Tensor, batch_size: int = 256,
                   generator: torch.Generator | None = None,
                   show_progress: bool | None = None) -> dict[str, Any]:
    """Bayes-rule classification by a class-conditional model: ŷ = argmax_y log p(x | y) over
    its K classes (a uniform p(y)), every y scored on the same dequantised x (one noise draw
    per image from ``generator``); SPEC §7.

    Returns ``accuracy`` (the share of ŷ = ``labels``), ``predicted_counts`` (how often each
    class was predicted, K ints: a model that ignores its class predicts one or two) and
    ``num_images``. Images N×C×H×W uint8, labels (N,) int64.
    """
    k = model.num_classes
    if k < 2:
        raise ConfigError("Bayes-rule accuracy needs a class-conditional model (num_classes ≥ "
                          f"2), this one has {k} classes")
    check_positive_int("batch_size", batch_size)
    return classify(model, images_u8, labels, batch_size, generator, show_progress)


@torch.no_grad()
def classify(model: nn.Module, images_u8: Tensor, labels: Tensor, batch_size: int,
              generator: torch.Generator | None, show_progress: bool | None) -> dict[str, Any]:
    """``bayes_accuracy`` for a caller that checked its settings once, at its own entry point
    (``scores.evaluate_checkpoint``): a class-conditional model, a positive ``batch_size``."""
    k = model.num_classes
    was_training = model.training
    model.eval()
    predicted = []
    try:
        with progress("classify", total=len(images_u8), show=show_progress) as advance:
            for start in range(0, len(images_u8), batch_size):
                x = model.to_model_space(images_u8[start:start + batch_size], generator)
                scores = (model.class_log_likelihoods(x)
                          if hasattr(model, "class_log_likelihoods")
                          else torch.stack([model.log_density(x, y) for y in range(k)], 1))
                predicted.append(scores.argmax(1).cpu())
                advance(len(x))
    finally:
        model.train(was_training)
    pred = torch.cat(predicted)
    return {"accuracy": float((pred == labels.cpu()).double().mean()),
            "predicted_counts": torch.bincount(pred, minlength=k).tolist(),
            "num_images": len(pred)}
