"""FID: Fréchet distance of torch-fidelity's Inception features (DESIGN.md §FID)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path
from ..errors import ConfigError, DataError
from ..progress import progress

# --- FID -------------------------------------------------------------------------------------
# Fréchet Inception Distance (Heusel et al., 2017, arXiv 1706.08500) between Gaussians fitted to
# the 2048-d pool features of the 2015-12-05 TensorFlow Inception v3, computed by torch-fidelity's
# ``FeatureExtractorInceptionV3`` (its TF1-exact bilinear resize to 299×299 and (x − 128)/128
# input, as in the TF graph of the reference FID code) with torch-fidelity's weight file. That
# file is byte-identical to pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (same
# SHA-256, below): one network, one set of weights, whichever name it is kept under.

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the same bytes
# Names the features (torch-fidelity's extractor with the 2015-12-05 weights), not only the
# file: statistics made by the earlier hand-ported Inception ("pt_inception-…", another resize)
# are never reused for these.
INCEPTION_WEIGHTS_ID = "torch-fidelity-inception-2015-12-05-6726825d"
RANDOM_WEIGHTS_TAG = "(NOT a real FID)"
INCEPTION_ENV_VAR = "ATTNFLOW_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


class InceptionFeatures(nn.Module):
    """uint8 images B×C×H×W (C = 1 or 3, any H×W) → 2048-d pool features B×2048 (float32).

    f(u) = avgpool(Inception((resize_TF1(u) − 128) / 128)), torch-fidelity's
    ``FeatureExtractorInceptionV3`` (``self.net``) doing all of it on uint8 B×3×H×W; grey images
    are first repeated to three channels (what torch-fidelity's ``convert("RGB")`` does to them).
    """

    def __init__(self, net: nn.Module, weights_id: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.weights_id = weights_id

    @torch.no_grad()
    def forward(self, images_u8: Tensor) -> Tensor:
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] not in (
                1, 3):
            raise ConfigError(f"FID features need uint8 B×(1|3)×H×W images, got "
                              f"{images_u8.dtype} {tuple(images_u8.shape)}")
        x = images_u8.to(next(self.net.parameters()).device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        (features,) = self.net(x)
        return features


def inception_weights_cache() -> Path:
    """Where torch-fidelity keeps the weight file: torch hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "ATTNFLOW_OFFLINE"))


def _verified(path: Path) -> Path:
    sha = _sha256(path)
    if sha != INCEPTION_WEIGHTS_SHA256:
        raise ConfigError(f"{path} is not the 2015-12-05 FID Inception weight file (sha256 "
                          f"{sha[:16]}…, expected {INCEPTION_WEIGHTS_SHA256[:16]}…); delete it "
                          f"and download {INCEPTION_WEIGHTS_URL} again")
    return path


def resolve_inception_weights(path: str | os.PathLike[str] | None = None, *,
                              download: bool = True) -> Path:
    """The FID Inception weight file, SHA-256-verified, from the first of: ``path``,
    ``$ATTNFLOW_INCEPTION_WEIGHTS``, torch hub's checkpoint cache (torch-fidelity's file name,
    else pytorch-fid's: the same bytes), a download into that cache (unless ``download`` is
    False or ``HF_HUB_OFFLINE``/``ATTNFLOW_OFFLINE`` is set).

    Raises:
        ConfigError: the file is missing, fails its SHA-256 check, or cannot be had offline (the
            message says where to download it and where to put it).
    """
    cached = inception_weights_cache()
    how = (f"download {INCEPTION_WEIGHTS_URL} (sha256 {INCEPTION_WEIGHTS_SHA256[:8]}…; "
           f"pytorch-fid's {PYTORCH_FID_WEIGHTS_FILE} is the same file) and pass it with "
           f"`inception_weights` or ${INCEPTION_ENV_VAR}, or put it at {cached}")
    for value, source in ((path, "`inception_weights`"),
                          (os.environ.get(INCEPTION_ENV_VAR), f"${INCEPTION_ENV_VAR}")):
        if value:
            p = Path(value).expanduser()
            if not p.is_file():
                raise ConfigError(f"FID Inception weights {p} not found (from {source}); {how}")
            return _verified(p)
    for candidate in (cached, cached.with_name(PYTORCH_FID_WEIGHTS_FILE)):
        if candidate.is_file():
            return _verified(candidate)
    if not download or _offline():
        raise ConfigError(f"the FID Inception weights are not available offline; {how}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch hub writes a temporary file and moves it into place only if the hash matches
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached),
                                       hash_prefix=INCEPTION_WEIGHTS_SHA256, progress=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"could not download the FID Inception weights ({reason}); {how}"
                          ) from err
    return _verified(cached)


def random_inception_state(generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Random Inception weights in torch-fidelity's state-dict format (for tests and timing).

    The keys and shapes of its weight converter (``utils/util_convert_inception_weights.py``):
    conv/fc weights ~ N(0, 2/fan_in) (He, so activations stay finite through ~90 layers),
    batch norms at the identity (γ = 1, β = 0, mean 0, variance 1), fc bias 0. Torchvision's
    ``Inception3`` skeleton, built on the meta device (no RNG use), has the same names and
    shapes; torch-fidelity then loads the file strictly.
    """
    from torchvision.models.inception import Inception3

    with torch.device("meta"):
        skeleton = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    gen = generator or torch.Generator().manual_seed(0)
    state = {}
    for key, meta in skeleton.items():
        if key.endswith("num_batches_tracked"):
            continue  # not in torch-fidelity's file
        if meta.dim() > 1:
            fan_in = meta[0].numel()
            state[key] = torch.randn(meta.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("weight", "running_var")):
            state[key] = torch.ones(meta.shape)
        else:
            state[key] = torch.zeros(meta.shape)
    return state


def write_random_inception_weights(path: str | os.PathLike[str],
                                   generator: torch.Generator | None = None) -> Path:
    """``random_inception_state`` saved with ``torch.save`` at ``path`` (torch-fidelity's
    format: a plain dict of tensors), for ``load_inception(path, random_init=True)``."""
    with atomic_path(path) as tmp:
        torch.save(random_inception_state(generator), tmp)
    return Path(path)


def random_weights_id(state: dict[str, Tensor]) -> str:
    """``random-init-<hash> (NOT a real FID)``: the hash of the tensors keeps statistics of
    different random networks apart; the word "random" makes model cards refuse the number."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return f"random-init-{digest.hexdigest()[:8]} {RANDOM_WEIGHTS_TAG}"


def _torch_fidelity_inception(path: Path) -> nn.Module:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ConfigError("FID features need torch-fidelity; install it with "
                          "pip install 'torch-fidelity>=0.3'") from err

    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=str(path))
    except RuntimeError as err:  # strict load_state_dict: other keys or shapes
        raise ConfigError(f"{path} is not an Inception weight file in torch-fidelity's format "
                          f"({str(err).splitlines()[0]}); pass the 2015-12-05 weight file"
                          ) from err


def load_inception(weights: str | os.PathLike[str] | None = None, *, random_init: bool = False,
                   generator: torch.Generator | None = None, download: bool = True,
                   device: torch.device | str = "cpu") -> InceptionFeatures:
    """The FID feature extractor: torch-fidelity's Inception with the 2015-12-05 weights
    (``resolve_inception_weights``), ``weights_id`` = ``INCEPTION_WEIGHTS_ID``.

    With ``random_init=True`` (tests and timing only) the weights are random: those of the file
    ``weights`` (e.g. from ``write_random_inception_weights``; never checked against the
    standard hash) or, without one, ``random_inception_state(generator)`` written to a temporary
    file; either way loaded by torch-fidelity from that file, and ``weights_id`` is
    ``random_weights_id(...)``, which says it is not a FID (model cards refuse it).
    """
    if not random_init:
        path = resolve_inception_weights(weights, download=download)
        return InceptionFeatures(_torch_fidelity_inception(path), INCEPTION_WEIGHTS_ID).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = (Path(weights).expanduser() if weights else
                write_random_inception_weights(Path(tmp) / "random-inception.pth", generator))
        try:  # torch-fidelity unpickles the file in full; only tensors are let through to it
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"{path} is not a weight file of tensors ({err}); write one with "
                              "write_random_inception_weights") from err
        net = _torch_fidelity_inception(path)
    return InceptionFeatures(net, random_weights_id(state)).to(device)


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
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # np.savez adds no suffix to a file
            np.savez(fh, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                     weights_id=np.str_(self.weights_id))
        return Path(path)

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


def _feature_batches(images_u8: Tensor | Iterable[Tensor], extractor: Any, batch_size: int,
                     total: int | None) -> Iterator[np.ndarray]:
    """float64 features of uint8 images (a tensor N×C×H×W, or an iterable of batches), batch
    by batch, with progress."""
    if isinstance(images_u8, Tensor):
        total, images_u8 = images_u8.shape[0], images_u8.split(batch_size)
    with progress("FID features", total=total) as advance:
        for batch in images_u8:
            yield extractor(batch).double().cpu().numpy()
            advance(batch.shape[0])


def image_features(images_u8: Tensor | Iterable[Tensor], extractor: Any,
                   batch_size: int = 200, total: int | None = None) -> np.ndarray:
    """N×2048 features of uint8 images (a tensor N×C×H×W, or an iterable of batches)."""
    return np.concatenate(list(_feature_batches(images_u8, extractor, batch_size, total)))


class _Moments:
    """Running mean and scatter matrix of N×D feature batches (Chan, Golub & LeVeque's pairwise
    update): ``feature_statistics`` of all of them in O(D²) memory, to float64 rounding."""

    def __init__(self) -> None:
        self.n, self.mean, self.scatter = 0, np.float64(0.0), np.float64(0.0)

    def add(self, f: np.ndarray) -> None:
        """Merge a batch: mean += δ·n_b/n, S += S_b + δδᵀ·n_a·n_b/n, δ = mean_b − mean."""
        n_b, mean_b = f.shape[0], f.mean(0)
        n, delta = self.n + n_b, mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.scatter = self.scatter + (f - mean_b).T @ (f - mean_b) \
            + np.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def statistics(self, weights_id: str) -> FIDStats:
        if self.n < 2:
            raise DataError(f"FID statistics need at least 2 feature vectors, got {self.n}")
        return FIDStats(self.mean, self.scatter / (self.n - 1), self.n, weights_id)


def streaming_statistics(images_u8: Tensor | Iterable[Tensor], extractor: Any,
                         batch_size: int = 200, total: int | None = None) -> FIDStats:
    """``feature_statistics(image_features(...))`` in constant memory: each batch's features
    are folded into running statistics (``_Moments``) and dropped."""
    moments = _Moments()
    for features in _feature_batches(images_u8, extractor, batch_size, total):
        moments.add(features)
    return moments.statistics(extractor.weights_id)


def image_statistics(images_u8: Tensor | Iterable[Tensor], extractor: Any,
                     batch_size: int = 200, cache: str | Path | None = None) -> FIDStats:
    """FID statistics of an image set (e.g. a dataset split), cached as ``cache`` (.npz).

    A cache written with other Inception weights is recomputed, never reused.
    """
    if cache is not None and Path(cache).is_file():
        stats = FIDStats.load(cache)
        if stats.weights_id == extractor.weights_id:
            return stats
    stats = streaming_statistics(images_u8, extractor, batch_size)
    if cache is not None:
        stats.save(cache)
    return stats


def stats_cache_path(dataset: str, split: str, weights_id: str,
                     root: str | Path | None = None) -> Path:
    """``<root>/<dataset>_<split>_<weights>.npz``; root defaults to
    ``$ATTNFLOW_CACHE`` or ``~/.cache/attnflow_zoo``, under ``fid_stats/``."""
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
    from ..data.datasets import load_images

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
    stats = streaming_statistics(images_u8, extractor, batch_size)
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
        extractor: an ``InceptionFeatures`` (default: ``load_inception()``, the standard
            weights, on the model's device).
        reference: a label for the card, e.g. "cifar10 train".
    """
    if extractor is None:
        extractor = load_inception(device=getattr(model, "device", "cpu"))

    def batches() -> Iterator[Tensor]:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            yield model.sample(n, temperature=temperature, generator=generator)

    if reference_stats.weights_id not in ("unknown", extractor.weights_id):
        raise DataError(f"reference statistics were computed with {reference_stats.weights_id}, "
                        f"the extractor uses {extractor.weights_id}; recompute them")
    stats = streaming_statistics(batches(), extractor, batch_size, total=num_samples)
    fid = frechet_distance(stats.mu, stats.sigma, reference_stats.mu, reference_stats.sigma)
    return FIDResult(fid, num_samples, temperature, extractor.weights_id, reference)
