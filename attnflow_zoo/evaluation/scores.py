"""Scoring models: held-out bits/dim of a checkpoint, a class-conditional model's Bayes-rule
accuracy, and the standard FID.

Both return the one metrics schema (``evaluation.results``) that ``attnflow evaluate --json``
prints and ``attnflow push --metrics`` / the model card read.

The FID protocol (``standard_fid``), as the flow papers report it: ``num_samples`` = 50,000
model samples at a stated temperature (1.0), 2048-d pool features of the 2015-12-05 Inception
(``metrics.load_inception``), Fréchet distance to the statistics of the TRAINING split (cached
per dataset split), every choice recorded in the returned metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..core import resolve_device
from ..data import datasets
from ..data.labels import labels_for
from ..errors import DataError, check_positive_int
from ..factory import load_checkpoint
from ..hub import open_checkpoint
from ..metrics import classify, mean_bpd
from . import results
from .fid import dataset_statistics, fid_from_model, load_inception, resolve_inception_weights
from .sampling import check_request


def standard_fid(model: Any, dataset: str | os.PathLike[str], *, num_samples: int = 50_000,
                 temperature: float = 1.0, reference_split: str = "train",
                 reference_limit: int | None = None, seed: int = 0,
                 inception_weights: str | os.PathLike[str] | None = None,
                 random_inception: bool = False, batch_size: int = 200,
                 statistics_out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """FID of ``num_samples`` samples of ``model`` against ``dataset``'s ``reference_split``.

    FID = ‖μ_s − μ_r‖² + tr Σ_s + tr Σ_r − 2 tr (Σ_s Σ_r)^{1/2} over Inception pool features of
    the samples (s) and of the reference split's images (r), resized to the model's size first.

    Args:
        model: a zoo density model (``sample``), on the device to use.
        dataset: a data-table name or a local folder.
        num_samples: 50,000 for a FID comparable with the papers.
        temperature: the prior temperature of the samples.
        reference_split: the split the samples are compared with (the papers: train).
        reference_limit: only the first N reference images (a smaller, stated protocol).
        seed: of the samples' generator.
        inception_weights: the weight file (else ``$ATTNFLOW_INCEPTION_WEIGHTS`` / the cache).
        random_inception: random Inception weights, for pipeline tests only: the result's
            ``fid_weights`` says so and model cards refuse it.
        batch_size: samples drawn and embedded per step.
        statistics_out: also keep the reference statistics here (``.npz``).

    Returns:
        The ``fid*`` keys of the metrics schema.
    """

    dev = next(iter(model.parameters())).device
    if random_inception:
        extractor = load_inception(inception_weights, random_init=True, device=dev)
    else:
        extractor = load_inception(inception_weights, device=dev)
    _, h, w = model.input_shape
    reference = dataset_statistics(dataset, reference_split, extractor,
                                   image_size=h if h == w else None, limit=reference_limit)
    gen = torch.Generator(device=dev).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        res = fid_from_model(model, reference, num_samples=num_samples, batch_size=batch_size,
                             temperature=temperature, generator=gen, extractor=extractor,
                             reference=f"{datasets.dataset_label(dataset)} {reference_split}")
    finally:
        model.train(was_training)
    out = {**res.as_metrics(), "fid_seed": seed, "fid_reference_split": reference_split,
           "fid_reference_num_images": int(reference.num_images)}
    out["fid_temperature"] = float(temperature)
    if statistics_out is not None:
        out["fid_reference_statistics"] = str(reference.save(Path(statistics_out).resolve()))
    return out


def evaluate_checkpoint(checkpoint: str | os.PathLike[str] | Checkpoint,
                        dataset: str | os.PathLike[str],
                        split: str | None = None, *, batch_size: int = 256, seed: int = 0,
                        limit: int | None = None, device: str = "auto", fid: bool = False,
                        num_samples: int = 50_000, temperature: float = 1.0,
                        fid_reference_split: str = "train",
                        fid_reference_limit: int | None = None,
                        inception_weights: str | os.PathLike[str] | None = None,
                        random_inception: bool = False,
                        statistics_out: str | os.PathLike[str] | None = None,
                        show_progress: bool | None = None) -> dict[str, Any]:
    """Held-out bits/dim of a checkpoint (``evaluate_bpd``, noise seeded ``seed``: the numbers
    ``fit`` logs with the same seed and batch size), a class-conditional model's
    ``metrics.bayes_accuracy`` (the same noise) and, with ``fid``, ``standard_fid``.

    ``checkpoint``: a local folder, a Hub repo id or an open ``Checkpoint``. ``split`` defaults
    to the dataset's held-out split (``datasets.heldout_split``). Returns the metrics schema of
    ``evaluation.results`` (what ``attnflow push --metrics`` takes). Bad settings, a device
    the machine lacks and missing FID weights are refused before any work; then the names are
    resolved once and ``score_checkpoint`` does the work.
    """
    dev = resolve_device(device)
    for name, value in (("batch_size", batch_size), ("limit", limit)):
        if value is not None:
            check_positive_int(f"`{name}`", value)
    if fid:
        check_request(num_samples, temperature, batch_size)
        if not random_inception:
            inception_weights = resolve_inception_weights(inception_weights)
    split = split or datasets.heldout_split(dataset)
    if split is None:
        raise DataError(f"{dataset} has no held-out split (test, valid or validation); "
                        "pass `split`")
    return score_checkpoint(
        open_checkpoint(checkpoint), dataset, split, device=dev, batch_size=batch_size,
        seed=seed, limit=limit, num_fid=num_samples if fid else 0, temperature=temperature,
        fid_reference_split=fid_reference_split, fid_reference_limit=fid_reference_limit,
        inception_weights=inception_weights, random_inception=random_inception,
        statistics_out=statistics_out, show_progress=show_progress)


def score_checkpoint(ckpt: Checkpoint, dataset: str | os.PathLike[str], split: str, *,
                     device: torch.device, batch_size: int = 256, seed: int = 0,
                     limit: int | None = None, num_fid: int = 0, temperature: float = 1.0,
                     fid_reference_split: str = "train", fid_reference_limit: int | None = None,
                     inception_weights: str | os.PathLike[str] | None = None,
                     random_inception: bool = False,
                     statistics_out: str | os.PathLike[str] | None = None,
                     show_progress: bool | None = None) -> dict[str, Any]:
    """``evaluate_checkpoint``'s scores of an open checkpoint on ``split``, with settings its
    caller checked once (``evaluate_checkpoint``, ``reproduce``): ``device`` resolved,
    ``batch_size`` and ``limit`` positive, ``num_fid`` FID samples (0: no FID) at a positive
    ``temperature``, ``inception_weights`` the verified file (``resolve_inception_weights``)
    unless ``random_inception``. Returns the metrics schema of ``evaluation.results``.
    """
    model = load_checkpoint(ckpt).to(device)
    images, labels = datasets.load_labelled(dataset, split, model.input_shape, limit=limit)
    labels = labels_for(model.num_classes, labels, f"{dataset} ({split})")
    g = torch.Generator(device=device).manual_seed(seed)
    bpd = mean_bpd(model, images, batch_size, g, show_progress=show_progress, labels=labels)
    result: dict[str, Any] = {
        "format": results.FORMAT, "dataset": datasets.dataset_label(dataset), "split": split,
        "step": ckpt.step, "bpd": bpd, "bpd_estimator": "single-sample",
        "bpd_num_images": len(images), "bpd_seed": seed, "bpd_batch_size": batch_size}
    if model.noise_std > 0:
        result["bpd_noise_std"] = model.noise_std
    if labels is not None:
        g = torch.Generator(device=device).manual_seed(seed)
        bayes = classify(model, images, labels, batch_size, g, show_progress)
        result.update(bayes_accuracy=bayes["accuracy"], bayes_num_images=bayes["num_images"])
    if num_fid:
        result.update(standard_fid(
            model, dataset, num_samples=num_fid, temperature=temperature,
            reference_split=fid_reference_split, reference_limit=fid_reference_limit, seed=seed,
            inception_weights=inception_weights, random_inception=random_inception,
            statistics_out=statistics_out))
    return results.check_metrics(result)
