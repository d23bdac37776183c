"""Evaluation metrics. ``bits_per_dim`` is the only place the bits/dim rule lives (SPEC §4);
FID (Fréchet distance of Inception features) below it."""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
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


# --- FID -------------------------------------------------------------------------------------
# Fréchet Inception Distance (Heusel et al., 2017, arXiv 1706.08500) between Gaussians fitted to
# 2048-d Inception pool features (see ``attnflow_zoo.inception``).


@dataclass(frozen=True)
class FIDStats:
    """Feature statistics of an image set: mean ``mu`` (D,), covariance ``sigma`` (D, D)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    weights_id: str

    def save(self, path: str | Path) -> Path:
        """Write the statistics as ``.npz`` (no pickle) at exactly ``path``, atomically (a
        temporary file renamed into place: a crash never leaves a truncated cache)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:  # a file object: np.savez adds no ".npz" suffix
                np.savez(fh, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                         weights_id=np.str_(self.weights_id))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FIDStats:
        """Read statistics written by ``save`` (or pytorch-fid's ``mu``/``sigma`` npz)."""
        try:
            with np.load(Path(path), allow_pickle=False) as f:
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
                n = int(f["num_images"]) if "num_images" in f else -1
                wid = str(f["weights_id"]) if "weights_id" in f else "unknown"
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{path} is not a FID statistics file (npz with mu and sigma): "
                            f"{err}") from err
        return cls(mu, sigma, n, wid)


def feature_statistics(features: np.ndarray | Tensor, weights_id: str = "unknown") -> FIDStats:
    """Mean and unbiased covariance (float64) of N×D features."""
    f = features.double().cpu().numpy() if isinstance(features, Tensor) else np.asarray(
        features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DataError(f"FID statistics need at least 2 feature vectors, got shape {f.shape}")
    return FIDStats(f.mean(0), np.cov(f, rowvar=False), f.shape[0], weights_id)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^{1/2}.

    With Σ₁ = V W Vᵀ (``eigh``, float64), Σ₁Σ₂ is similar to the symmetric PSD matrix
    M = W^{1/2} (Vᵀ Σ₂ V) W^{1/2}, so tr (Σ₁Σ₂)^{1/2} = Σ_i √λ_i(M). Round-off eigenvalues
    below 0 (near-singular covariances, fewer samples than dimensions) are clipped to 0: no
    complex parts and no ``sqrtm`` options (removed in newer SciPy) are involved.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DataError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                        f"{s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root_w = np.sqrt(np.clip(w, 0.0, None))
    m = (v.T @ s2 @ v) * root_w[:, None] * root_w[None, :]
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def image_features(images_u8: Tensor | Iterable[Tensor], extractor: Any,
                   batch_size: int = 200, total: int | None = None) -> np.ndarray:
    """N×2048 features of uint8 images (a tensor N×C×H×W, or an iterable of batches)."""
    if isinstance(images_u8, Tensor):
        total = images_u8.shape[0]
        batches: Iterable[Tensor] = images_u8.split(batch_size)
    else:
        batches = images_u8
    out = []
    with progress("FID features", total=total) as advance:
        for batch in batches:
            out.append(extractor(batch).double().cpu().numpy())
            advance(batch.shape[0])
    return np.concatenate(out)


def image_statistics(images_u8: Tensor | Iterable[Tensor], extractor: Any,
                     batch_size: int = 200, cache: str | Path | None = None) -> FIDStats:
    """FID statistics of an image set (e.g. a dataset split), cached as ``cache`` (.npz).

    A cache written with other Inception weights is recomputed, never reused.
    """
    if cache is not None and Path(cache).is_file():
        stats = FIDStats.load(cache)
        if stats.weights_id == extractor.weights_id:
            return stats
    stats = feature_statistics(image_features(images_u8, extractor, batch_size),
                               extractor.weights_id)
    if cache is not None:
        stats.save(cache)
    return stats


def stats_cache_path(dataset: str, split: str, weights_id: str,
                     root: str | Path | None = None) -> Path:
    """``<root>/<dataset>_<split>_<weights>.npz``; root defaults to
    ``$ATTNFLOW_CACHE`` or ``~/.cache/attnflow_zoo``, under ``fid_stats/``."""
    import os
    import re

    root = Path(root or os.environ.get("ATTNFLOW_CACHE", "~/.cache/attnflow_zoo")).expanduser()
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{dataset}_{split}_{weights_id}")
    return root / "fid_stats" / f"{safe}.npz"


def dataset_statistics(dataset: str | Path, split: str, extractor: Any, *,
                       image_size: int | None = None, limit: int | None = None,
                       batch_size: int = 200, cache_root: str | Path | None = None) -> FIDStats:
    """FID statistics of a dataset split (``data.load_images``), cached per split as .npz.

    The cache key holds the dataset (a local folder by its absolute path), split, image size,
    limit and Inception weights, so a different protocol never reuses another's statistics.
    """
    import hashlib

    from .data import load_images

    name = str(dataset)
    if Path(name).exists():
        resolved = str(Path(name).resolve())
        name = f"{Path(name).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
    key = f"{name}_{image_size or 'native'}_{limit or 'all'}"
    cache = stats_cache_path(key, split, extractor.weights_id, cache_root)
    if cache.is_file():
        stats = FIDStats.load(cache)
        if stats.weights_id == extractor.weights_id:
            return stats
    images = load_images(dataset, split, image_size=image_size, limit=limit)
    return image_statistics(images, extractor, batch_size, cache=cache)


@dataclass(frozen=True)
class FIDResult:
    """A FID with its protocol (what the model card states)."""

    fid: float
    num_samples: int
    temperature: float | None  # None: real images, not model samples
    weights_id: str
    reference: str

    def as_metrics(self) -> dict[str, Any]:
        """The ``fid*`` keys of the metrics JSON that ``attnflow push --metrics`` takes."""
        metrics = {"fid": self.fid, "fid_num_samples": self.num_samples,
                   "fid_weights": self.weights_id, "fid_reference": self.reference}
        if self.temperature is not None:
            metrics["fid_temperature"] = self.temperature
        return metrics


def fid_from_images(images_u8: Tensor | Iterable[Tensor], reference_stats: FIDStats,
                    extractor: Any, batch_size: int = 200, reference: str = "") -> FIDResult:
    """FID between uint8 images and reference statistics computed with the same weights."""
    if reference_stats.weights_id not in ("unknown", extractor.weights_id):
        raise DataError(f"reference statistics were computed with {reference_stats.weights_id}, "
                        f"the extractor uses {extractor.weights_id}; recompute them")
    stats = feature_statistics(image_features(images_u8, extractor, batch_size),
                               extractor.weights_id)
    fid = frechet_distance(stats.mu, stats.sigma, reference_stats.mu, reference_stats.sigma)
    return FIDResult(fid, stats.num_images, None, extractor.weights_id, reference)


def fid_from_model(model: Any, reference_stats: FIDStats, num_samples: int = 50_000,
                   batch_size: int = 200, temperature: float = 1.0,
                   generator: torch.Generator | None = None, extractor: Any = None,
                   reference: str = "") -> FIDResult:
    """FID of ``num_samples`` model samples (``model.sample``, uint8) against reference stats.

    Args:
        model: a zoo model (``sample(n, temperature, generator) -> uint8 B×C×H×W``).
        reference_stats: ``FIDStats`` of the real data (``image_statistics``), same weights.
        num_samples: 50 000 for paper-comparable numbers (SPEC §5).
        batch_size: images sampled and embedded per step.
        temperature: prior temperature of the samples (1.0 for the standard FID).
        generator: a ``torch.Generator`` on the model's device, for reproducible samples.
        extractor: an ``InceptionFeatures`` (default: ``inception.load_inception()``, the
            standard weights, on the model's device).
        reference: a label for the card, e.g. "cifar10 train".
    """
    if extractor is None:
        from .inception import load_inception

        extractor = load_inception(device=getattr(model, "device", "cpu"))

    def batches() -> Iterator[Tensor]:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            yield model.sample(n, temperature=temperature, generator=generator)

    if reference_stats.weights_id not in ("unknown", extractor.weights_id):
        raise DataError(f"reference statistics were computed with {reference_stats.weights_id}, "
                        f"the extractor uses {extractor.weights_id}; recompute them")
    feats = image_features(batches(), extractor, batch_size, total=num_samples)
    stats = feature_statistics(feats, extractor.weights_id)
    fid = frechet_distance(stats.mu, stats.sigma, reference_stats.mu, reference_stats.sigma)
    return FIDResult(fid, num_samples, temperature, extractor.weights_id, reference)
