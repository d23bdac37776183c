"""FID: the Fréchet maths against SciPy, and the Inception pipeline on real digits.

The pipeline tests use randomly initialised Inception weights: they check shapes, determinism,
caching and plumbing, never a FID value (the standard weights cannot be downloaded offline).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from attnflow_zoo import inception, metrics
from attnflow_zoo.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).parent))


def one_blas_thread():
    """2048-d eigendecompositions are ~4× faster on one BLAS thread on a shared machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with the test dependencies
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference formula (pytorch-fid / TTUR) with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n, d, shift", [(200, 8, 0.0), (300, 16, 0.5), (500, 32, 2.0),
                                         (120, 24, 0.1)])
def test_frechet_matches_scipy(n: int, d: int, shift: float) -> None:
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) + shift
    s1, s2 = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    ref = scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours == pytest.approx(metrics.frechet_distance(s2.mu, s2.sigma, s1.mu, s1.sigma),
                                 rel=1e-9)  # symmetric


def test_frechet_zero_for_identical_and_stable_when_singular() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 64))  # fewer samples than dimensions: rank-deficient covariance
    s = metrics.feature_statistics(f)
    assert abs(metrics.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8 * np.trace(s.sigma)
    g = metrics.feature_statistics(rng.normal(size=(40, 64)) + 0.3)
    d = metrics.frechet_distance(s.mu, s.sigma, g.mu, g.sigma)
    assert np.isfinite(d) and d > 0
    # Exactly singular (a repeated feature column) still gives a finite, non-negative value.
    f2 = np.concatenate([f, f[:, :1]], axis=1)
    s2 = metrics.feature_statistics(f2)
    assert np.isfinite(metrics.frechet_distance(s2.mu, s2.sigma, s2.mu, s2.sigma))
    with pytest.raises(DataError, match="do not match"):
        metrics.frechet_distance(s.mu, s.sigma, s2.mu, s2.sigma)


@pytest.fixture(scope="module")
def extractor() -> inception.InceptionFeatures:
    return inception.load_inception(random_init=True, generator=torch.Generator().manual_seed(0))


def _digits(root: Path, n: int) -> torch.Tensor:
    files = sorted((root / "test").rglob("*.png"))[:n]
    arr = np.stack([np.asarray(Image.open(f)) for f in files])
    return torch.from_numpy(arr).unsqueeze(1)  # n×1×28×28 uint8


def test_pipeline_on_real_digits_random_weights(mnist_folder: Path, extractor,
                                                tmp_path: Path) -> None:
    images = _digits(mnist_folder, 4)
    assert extractor.weights_id == inception.RANDOM_WEIGHTS_ID
    feats = metrics.image_features(images, extractor, batch_size=3)  # batches of 3 and 1
    assert feats.shape == (4, inception.FEATURE_DIM) and np.isfinite(feats).all()
    assert feats.std(0).max() > 0  # different digits give different features
    # Batching does not change the features (eval-mode network, per-image maths).
    np.testing.assert_allclose(metrics.image_features(images[:1], extractor), feats[:1],
                               rtol=1e-4, atol=1e-5)
    # Statistics are cached per split, tied to the weights that made them.
    cache = metrics.stats_cache_path("mnist", "test", extractor.weights_id, root=tmp_path)
    stats = metrics.image_statistics(images, extractor, cache=cache)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-4, atol=1e-6)
    loaded = metrics.FIDStats.load(cache)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 4 and loaded.weights_id == extractor.weights_id
    # A cache hit reads no images at all.
    hit = metrics.image_statistics(iter(()), extractor, cache=cache)
    np.testing.assert_array_equal(hit.mu, stats.mu)
    with one_blas_thread():
        same = metrics.fid_from_images(images, loaded, extractor, reference="mnist test")
    # Same images → same features → a zero distance, up to 2048-d round-off.
    assert abs(same.fid) < 1e-5 * np.trace(stats.sigma)
    assert same.as_metrics()["fid_weights"] == inception.RANDOM_WEIGHTS_ID


def test_fid_from_model(extractor) -> None:
    from _toy_flow import ToyFlow, ToyFlowConfig

    model = ToyFlow(ToyFlowConfig()).eval()
    ref = metrics.feature_statistics(np.random.default_rng(0).normal(size=(10, 2048)),
                                     extractor.weights_id)
    with one_blas_thread():
        result = metrics.fid_from_model(model, ref, num_samples=3, batch_size=2,
                                        temperature=0.7, generator=torch.Generator().manual_seed(1),
                                        extractor=extractor)
    assert np.isfinite(result.fid) and result.fid > 0
    assert (result.num_samples, result.temperature) == (3, 0.7)
    assert result.as_metrics()["fid_weights"] == inception.RANDOM_WEIGHTS_ID
    other = metrics.FIDStats(ref.mu, ref.sigma, 10, "pt_inception-2015-12-05-6726825d")
    with pytest.raises(DataError, match="recompute"):
        metrics.fid_from_model(model, other, num_samples=2, extractor=extractor)


def test_weights_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extractor) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match="not available offline.*pt_inception-2015-12-05"):
        inception.load_inception()
    monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="not found"):
        inception.load_inception()
    # A weight file of the right architecture loads strictly; it is labelled as custom weights.
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in extractor.net.state_dict().items()}, str(path))
    loaded = inception.load_inception(path)
    assert loaded.weights_id.startswith("custom-")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="not the FID Inception weight file"):
        inception.load_inception(bad)
    # A corrupt file in the cache fails its SHA-256 check.
    monkeypatch.delenv(inception.ENV_VAR)
    cached = inception.default_weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.raises(ConfigError, match="SHA-256"):
        inception.load_inception()


def test_dataset_statistics_cached_per_split(mnist_folder: Path, extractor, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "data_cache"))
    stats = metrics.dataset_statistics(mnist_folder, "test", extractor, limit=3,
                                       cache_root=tmp_path)
    assert stats.num_images == 3 and stats.mu.shape == (inception.FEATURE_DIM,)
    files = list((tmp_path / "fid_stats").glob("*.npz"))
    assert len(files) == 1 and "test" in files[0].name and "3" in files[0].name

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached split must not be loaded again")

    monkeypatch.setattr("attnflow_zoo.data.load_images", no_loading)
    again = metrics.dataset_statistics(mnist_folder, "test", extractor, limit=3,
                                       cache_root=tmp_path)
    np.testing.assert_array_equal(again.sigma, stats.sigma)


def test_statistics_file_is_written_where_asked_and_truncation_is_a_clear_error(tmp_path):
    from attnflow_zoo.errors import DataError
    from attnflow_zoo.metrics import FIDStats

    rng = np.random.default_rng(0)
    stats = FIDStats(rng.normal(size=4), np.eye(4), 10, "random-init")
    path = stats.save(tmp_path / "cifar10-train")  # no .npz suffix: must not grow one
    assert path == tmp_path / "cifar10-train" and path.is_file()
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "cifar10-train.npz").exists()
    back = FIDStats.load(path)
    assert np.array_equal(back.mu, stats.mu) and back.num_images == 10
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="not a FID statistics file"):
        FIDStats.load(path)
