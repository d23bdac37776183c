"""FID: the Fréchet maths against SciPy, torch-fidelity's Inception pipeline on real digits, and
how the weight file is found and checked.

The pipeline tests use random Inception weights written in torch-fidelity's own state-dict
format: they check shapes, the input convention, determinism, caching and plumbing, never a FID
value, and the weights id they carry makes a model card refuse the number.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from attnflow_zoo.errors import ConfigError, DataError
from attnflow_zoo.evaluation import fid
from attnflow_zoo.evaluation.results import publishable, refuse_pipeline_fid

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
    s1, s2 = fid.feature_statistics(a), fid.feature_statistics(b)
    ours = fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    ref = scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours == pytest.approx(fid.frechet_distance(s2.mu, s2.sigma, s1.mu, s1.sigma),
                                 rel=1e-9)  # symmetric


def test_frechet_zero_for_identical_and_stable_when_singular() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 64))  # fewer samples than dimensions: rank-deficient covariance
    s = fid.feature_statistics(f)
    assert abs(fid.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8 * np.trace(s.sigma)
    g = fid.feature_statistics(rng.normal(size=(40, 64)) + 0.3)
    d = fid.frechet_distance(s.mu, s.sigma, g.mu, g.sigma)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(scipy_frechet(s.mu, s.sigma, g.mu, g.sigma), rel=1e-5)
    # Exactly singular (a repeated feature column) still gives a finite, non-negative value.
    f2 = np.concatenate([f, f[:, :1]], axis=1)
    s2 = fid.feature_statistics(f2)
    assert np.isfinite(fid.frechet_distance(s2.mu, s2.sigma, s2.mu, s2.sigma))
    with pytest.raises(DataError, match="do not match"):
        fid.frechet_distance(s.mu, s.sigma, s2.mu, s2.sigma)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Inception weights in torch-fidelity's format, in a temporary file."""
    return fid.write_random_inception_weights(
        tmp_path_factory.mktemp("inception") / "random-inception.pth",
        torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def extractor(random_weights: Path) -> fid.InceptionFeatures:
    return fid.load_inception(random_weights, random_init=True)


def test_random_weights_are_torch_fidelitys_format_and_never_a_fid(random_weights: Path,
                                                                  extractor) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(random_weights, map_location="cpu", weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    # The keys of torch-fidelity's converter: every parameter and running statistic of its
    # network, no num_batches_tracked; torch-fidelity loaded them strictly, values unchanged.
    assert isinstance(extractor.net, FeatureExtractorInceptionV3)
    net_state = extractor.net.state_dict()
    assert set(state) == {k for k in net_state if not k.endswith("num_batches_tracked")}
    assert len(state) == 472 and state["fc.weight"].shape == (1008, 2048)
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight"):
        assert torch.equal(net_state[key], state[key])
    # Labelled random, with the hash of these weights; a card refuses the number.
    assert extractor.weights_id == fid.random_weights_id(state)
    assert "random" in extractor.weights_id and fid.RANDOM_WEIGHTS_TAG in extractor.weights_id
    assert extractor.weights_id != fid.INCEPTION_WEIGHTS_ID
    result = fid.FIDResult(12.3, 50_000, 1.0, extractor.weights_id, "mnist train")
    with pytest.raises(ConfigError, match="random Inception weights"):
        refuse_pipeline_fid(result.as_metrics())
    shown, notes = publishable({**result.as_metrics(), "dataset": "mnist"})
    assert "fid" not in shown and "not a FID" in notes[0]
    # Other random weights get another id (their statistics are kept apart).
    other = fid.random_inception_state(torch.Generator().manual_seed(1))
    assert fid.random_weights_id(other) != extractor.weights_id
    # The same file without random_init is checked against the standard hash and refused.
    with pytest.raises(ConfigError, match="not the 2015-12-05 FID Inception weight file") as err:
        fid.load_inception(random_weights)
    assert "\n" not in str(err.value) and fid.INCEPTION_WEIGHTS_URL in str(err.value)


@pytest.mark.parametrize("content, message", [
    ({"fc.weight": torch.zeros(1008, 2048)}, "not an Inception weight file in torch-fidelity"),
    ({"fc.weight": Path("not a tensor")}, "not a weight file of tensors"),
])
def test_random_weights_file_of_another_kind_is_refused(tmp_path: Path, content, message):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(ConfigError, match=message):
        fid.load_inception(path, random_init=True)


def _digits(root: Path, n: int) -> torch.Tensor:
    files = sorted((root / "test").rglob("*.png"))[:n]
    arr = np.stack([np.asarray(Image.open(f)) for f in files])
    return torch.from_numpy(arr).unsqueeze(1)  # n×1×28×28 uint8


def test_pipeline_on_real_digits_random_weights(mnist_folder: Path, extractor,
                                                tmp_path: Path) -> None:
    images = _digits(mnist_folder, 4)
    feats = fid.image_features(images, extractor, batch_size=3)  # batches of 3 and 1
    assert feats.shape == (4, fid.FEATURE_DIM) and np.isfinite(feats).all()
    assert feats.std(0).max() > 0  # different digits give different features
    # torch-fidelity's input convention: uint8 N×3×H×W, a grey image repeated to RGB.
    rgb = images.repeat(1, 3, 1, 1)
    (direct,) = extractor.net(rgb)
    np.testing.assert_array_equal(extractor(rgb).numpy(), direct.numpy())
    np.testing.assert_allclose(feats, direct.double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="uint8"):
        extractor(images.float())
    # Batching does not change the features (eval-mode network, per-image maths).
    np.testing.assert_allclose(fid.image_features(images[:1], extractor), feats[:1],
                               rtol=1e-4, atol=1e-5)
    # Statistics are cached per split, tied to the weights that made them.
    cache = fid.stats_cache_path("mnist", "test", extractor.weights_id, root=tmp_path)
    stats = fid.image_statistics(images, extractor, cache=cache)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-4, atol=1e-6)
    loaded = fid.FIDStats.load(cache)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 4 and loaded.weights_id == extractor.weights_id
    # A cache hit reads no images at all.
    hit = fid.image_statistics(iter(()), extractor, cache=cache)
    np.testing.assert_array_equal(hit.mu, stats.mu)
    # A cache written with other weights is recomputed, never reused.
    fid.FIDStats(stats.mu + 1, stats.sigma, 4, fid.INCEPTION_WEIGHTS_ID).save(cache)
    again = fid.image_statistics(images, extractor, cache=cache)
    np.testing.assert_allclose(again.mu, stats.mu, rtol=1e-5, atol=1e-6)
    assert fid.FIDStats.load(cache).weights_id == extractor.weights_id
    with one_blas_thread():
        same = fid.fid_from_images(images, loaded, extractor, reference="mnist test")
    # Same images → same features → a zero distance, up to 2048-d round-off.
    assert abs(same.fid) < 1e-5 * np.trace(stats.sigma)
    assert same.as_metrics()["fid_weights"] == extractor.weights_id


def test_fid_from_model(extractor) -> None:
    from _toy_flow import ToyFlow, ToyFlowConfig

    model = ToyFlow(ToyFlowConfig()).eval()
    ref = fid.feature_statistics(np.random.default_rng(0).normal(size=(10, 2048)),
                                     extractor.weights_id)
    with one_blas_thread():
        result = fid.fid_from_model(model, ref, num_samples=3, batch_size=2,
                                        temperature=0.7, generator=torch.Generator().manual_seed(1),
                                        extractor=extractor, reference="toy train")
    assert np.isfinite(result.fid) and result.fid > 0
    assert (result.num_samples, result.temperature) == (3, 0.7)
    assert result.as_metrics() == {"fid": result.fid, "fid_num_samples": 3,
                                   "fid_weights": extractor.weights_id,
                                   "fid_reference": "toy train", "fid_temperature": 0.7}
    other = fid.FIDStats(ref.mu, ref.sigma, 10, fid.INCEPTION_WEIGHTS_ID)
    with pytest.raises(DataError, match="recompute"):
        fid.fid_from_model(model, other, num_samples=2, extractor=extractor)


@pytest.fixture()
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub folder, no weights in the environment, offline."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(fid.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_missing_weights_say_how_to_get_them(hub_dir: Path, monkeypatch) -> None:
    assert fid.inception_weights_cache() == (
        hub_dir / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(ConfigError, match="not available offline") as err:
        fid.load_inception()
    msg = str(err.value)
    assert "\n" not in msg
    for part in (fid.INCEPTION_WEIGHTS_URL, "`inception_weights`",
                 fid.INCEPTION_ENV_VAR, str(fid.inception_weights_cache())):
        assert part in msg
    with pytest.raises(ConfigError, match="not available offline"):  # download=False: same
        monkeypatch.delenv("HF_HUB_OFFLINE")
        fid.resolve_inception_weights(download=False)
    monkeypatch.setenv(fid.INCEPTION_ENV_VAR, str(hub_dir / "missing.pth"))
    with pytest.raises(ConfigError, match=r"missing.pth not found \(from \$ATTNFLOW_INCEPTION"):
        fid.load_inception()
    with pytest.raises(ConfigError, match=r"not found \(from `inception_weights`\)"):
        fid.load_inception(hub_dir / "also-missing.pth")


def test_the_commands_say_the_weights_flag(hub_dir: Path, tmp_path: Path) -> None:
    """The library names its argument (`inception_weights`); a command says its flag, before
    it opens the checkpoint."""
    from _cli import run_cli

    evaluate = ["evaluate", "--checkpoint", tmp_path / "no-run", "--dataset", "mnist", "--fid",
                "--device", "cpu"]
    code, _, err = run_cli(evaluate)
    assert code == 1 and "not available offline" in err and "--inception-weights" in err, err
    code, _, err = run_cli([*evaluate, "--inception-weights", hub_dir / "also-missing.pth"])
    assert code == 1 and "not found (from --inception-weights)" in err, err


def _file_with_sha(path: Path, data: bytes) -> tuple[Path, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("where", ["argument", "env", "torch-fidelity cache", "pytorch-fid cache"])
def test_sha256_mismatch_is_a_one_line_error(hub_dir: Path, monkeypatch, where: str) -> None:
    cache = fid.inception_weights_cache()
    bad = {"argument": hub_dir / "w.pth", "env": hub_dir / "w.pth", "torch-fidelity cache": cache,
           "pytorch-fid cache": cache.with_name(fid.PYTORCH_FID_WEIGHTS_FILE)}[where]
    _file_with_sha(bad, b"not the weights")
    if where == "env":
        monkeypatch.setenv(fid.INCEPTION_ENV_VAR, str(bad))
    with pytest.raises(ConfigError, match="sha256 .*expected 6726825d0af5f729") as err:
        fid.load_inception(bad if where == "argument" else None)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_weights_resolution_order_and_verified_download(hub_dir: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    # The release file cannot be had offline: a stand-in file plays it, its hash patched in.
    # Downloads go through torch hub from a file:// URL (urllib), so the real code path runs.
    release, sha = _file_with_sha(tmp_path / "served" / fid.INCEPTION_WEIGHTS_FILE,
                                  b"stand-in weights")
    monkeypatch.setattr(fid, "INCEPTION_WEIGHTS_SHA256", sha)
    monkeypatch.setattr(fid, "INCEPTION_WEIGHTS_URL", release.as_uri())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cache = fid.inception_weights_cache()
    assert not cache.exists()
    assert fid.resolve_inception_weights() == cache  # downloaded, verified, cached
    assert cache.read_bytes() == release.read_bytes()
    # Order: argument → environment variable → cache.
    env_copy, _ = _file_with_sha(tmp_path / "env" / "w.pth", b"stand-in weights")
    arg_copy, _ = _file_with_sha(tmp_path / "arg" / "w.pth", b"stand-in weights")
    monkeypatch.setenv(fid.INCEPTION_ENV_VAR, str(env_copy))
    assert fid.resolve_inception_weights() == env_copy
    assert fid.resolve_inception_weights(arg_copy) == arg_copy
    monkeypatch.delenv(fid.INCEPTION_ENV_VAR)
    # pytorch-fid's name in the same cache is the same file and is found too.
    cache.rename(cache.with_name(fid.PYTORCH_FID_WEIGHTS_FILE))
    assert fid.resolve_inception_weights() == cache.with_name(fid.PYTORCH_FID_WEIGHTS_FILE)
    cache.with_name(fid.PYTORCH_FID_WEIGHTS_FILE).unlink()
    # A download whose bytes fail the hash is a one-line error and leaves no file behind.
    release.write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="could not download") as err:
        fid.resolve_inception_weights()
    assert "\n" not in str(err.value) and not list(cache.parent.iterdir())
    # So is a download that cannot reach the server.
    monkeypatch.setattr(fid, "INCEPTION_WEIGHTS_URL", (tmp_path / "nowhere.pth").as_uri())
    with pytest.raises(ConfigError, match="could not download"):
        fid.resolve_inception_weights()


def test_dataset_statistics_cached_per_split(mnist_folder: Path, extractor, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "data_cache"))
    stats = fid.dataset_statistics(mnist_folder, "test", extractor, limit=3,
                                       cache_root=tmp_path)
    assert stats.num_images == 3 and stats.mu.shape == (fid.FEATURE_DIM,)
    files = list((tmp_path / "fid_stats").glob("*.npz"))
    assert len(files) == 1 and "test" in files[0].name and "3" in files[0].name
    # The weights id is part of the key (here the hash of the random weights).
    assert extractor.weights_id.split()[0] in files[0].name

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached split must not be loaded again")

    monkeypatch.setattr("attnflow_zoo.data.datasets.load_images", no_loading)
    again = fid.dataset_statistics(mnist_folder, "test", extractor, limit=3,
                                       cache_root=tmp_path)
    np.testing.assert_array_equal(again.sigma, stats.sigma)


def test_statistics_file_is_written_where_asked_and_truncation_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    stats = fid.FIDStats(rng.normal(size=4), np.eye(4), 10, "random-init")
    path = stats.save(tmp_path / "cifar10-train")  # no .npz suffix: must not grow one
    assert path == tmp_path / "cifar10-train" and path.is_file()
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "cifar10-train.npz").exists()
    back = fid.FIDStats.load(path)
    assert np.array_equal(back.mu, stats.mu) and back.num_images == 10
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="not a FID statistics file"):
        fid.FIDStats.load(path)
