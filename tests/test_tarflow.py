"""TarFlow as a whole model (the zoo-wide checks of its tiny presets are in test_zoo.py): the
density integrates to one, sampling is seeded and goes through the cached inverse, guidance,
the one-level latents, and what the configuration refuses."""

from __future__ import annotations

import math

import pytest
import torch

import attnflow_zoo as az
from attnflow_zoo.errors import ConfigError, ShapeError
from attnflow_zoo.testing import perturb_parameters

TINY = [n for n in az.list_models("tarflow*_tiny")]


def _model(name: str = "tarflow_tiny", dtype: torch.dtype = torch.float64, seed: int = 0,
           scale: float = 0.05, **overrides: object) -> az.TarFlow:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = az.create_model(name, **overrides)
    perturb_parameters(model, scale, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def _x(model: az.TarFlow, b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, *model.input_shape, generator=g, dtype=torch.float64) - 0.5).to(
        model.dtype)


def _labels(model: az.TarFlow, b: int) -> torch.Tensor | None:
    return torch.arange(b) % model.num_classes if model.num_classes else None


@pytest.mark.parametrize("overrides", [{}, {"prior": "learned"}, {"affine": False,
                                                                   "prior": "learned"}])
@pytest.mark.parametrize("name", TINY)
def test_density_integrates_to_one(name: str, overrides: dict) -> None:
    """∫ p(x | y) dx = 1 over a 1×2×2 image (P = 1: 4 tokens of 1 number, D = 4) by the midpoint
    rule on a 10⁴ grid over a box holding the model's samples with margin (as the AttnFlow
    check in test_conditional.py). A missing D·ln s, a prior's log σ or a logdet term is off by
    far more than the tolerance. The weights move 0.02 off their init (not 0.05): further out
    the transformer gives the density tails a 10⁴ grid cannot integrate to 2e-3."""
    model = _model(name, scale=0.02, image_size=2, in_channels=1, patch_size=1, **overrides)
    if model.prior_log_std is not None:
        with torch.no_grad():
            model.prior_log_std.copy_(torch.tensor([[0.3], [-0.2], [0.1], [0.0]]))
    n = 10
    mids = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    classes = range(model.num_classes) if model.num_classes else [None]
    with torch.no_grad():
        for y in classes:
            xs = model.generate(500, generator=torch.Generator().manual_seed(1), y=y).flatten(1)
            lo, hi = xs.min(0).values, xs.max(0).values
            centre, half = (lo + hi) / 2, (hi - lo) / 2 * 1.6
            grid = torch.cartesian_prod(*[mids] * 4) * half + centre
            volume = float(torch.prod(2 * half / n))
            log_p = model.log_density(grid.view(-1, 1, 2, 2), y)
            total = float(torch.logsumexp(log_p, 0).exp()) * volume
            assert math.isclose(total, 1.0, abs_tol=2e-3), (y, total)


@pytest.mark.parametrize("name", TINY)
def test_inverse_is_the_cached_inverse_and_equals_the_cache_free_one(name: str) -> None:
    model = _model(name)
    x = _x(model, 3)
    y = _labels(model, 3)
    z, _ = model(x, y)
    x_rec = model.inverse(z, y)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-10)
    tokens = z.view(3, model.config.num_tokens, -1)
    contexts = model.contexts(y, 3)
    for block, context in zip(reversed(model.blocks), reversed(contexts), strict=True):
        tokens = block.inverse_uncached(tokens, context)
    torch.testing.assert_close(model.from_tokens(tokens), x_rec, rtol=0, atol=1e-12)


def test_sampling_is_seeded_and_any_batch_size_works() -> None:
    model = _model(dtype=torch.float32)

    def draw(n: int, seed: int) -> torch.Tensor:
        return model.sample(n, temperature=0.8, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(3, 1), draw(3, 1), draw(3, 2)
    assert a.shape == (3, *model.input_shape) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert draw(1, 1).shape[0] == 1
    assert torch.equal(model.sample(2, temperature=0), model.sample(2, temperature=0))


def test_attention_temperature_guidance() -> None:
    model = _model()
    g = torch.Generator().manual_seed(0)
    plain = model.generate(2, generator=torch.Generator().manual_seed(0))
    guided = model.generate(2, generator=torch.Generator().manual_seed(0), guidance=1.5,
                            attention_temperature=1.3)
    assert guided.shape == plain.shape and (guided - plain).abs().max() > 1e-6
    with pytest.raises(ConfigError, match="attention_temperature"):
        model.generate(2, generator=g, guidance=1.5)


def test_latents_round_trip_and_whiten() -> None:
    from attnflow_zoo.evaluation import latents as latent_tools

    model = _model(prior="learned")
    x = _x(model, 2)
    zs = model.encode_latents(x)
    assert [tuple(z.shape) for z in zs] == [(2, *model.input_shape)]
    torch.testing.assert_close(model.decode_latents(zs), x, rtol=0, atol=1e-10)
    eps = latent_tools.whiten(model, zs)
    torch.testing.assert_close(latent_tools.unwhiten(model, eps)[0], zs[0], rtol=0, atol=1e-12)


def test_config_refuses_what_cannot_be_built() -> None:
    with pytest.raises(ConfigError):
        az.TarFlowConfig(image_size=8, patch_size=3)
    with pytest.raises(ConfigError):
        az.TarFlowConfig(width=100, head_dim=64)
    with pytest.raises(ConfigError):
        az.TarFlowConfig(prior="vp")
    with pytest.raises(ShapeError):
        _model()(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


def test_paper_configuration_has_their_parameter_count() -> None:
    """The ImageNet-64 preset is the paper's P = 2, width 768, 8 blocks × 8 layers (about 460M
    parameters)."""
    cfg = az.registry.preset_config("tarflow_imagenet64")
    assert (cfg.patch_size, cfg.width, cfg.num_blocks, cfg.layers_per_block) == (2, 768, 8, 8)
    with torch.device("meta"):
        model = az.TarFlow(cfg)
    assert 455e6 < sum(p.numel() for p in model.parameters()) < 465e6


def test_denoise_is_one_score_step() -> None:
    """At init every block is the identity, so p(x) = N(s·x; 0, I)·s^D and the step
    x + σ²∇ log p(x) = (1 − s²σ²)·x exactly (s = 2, the data scale)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = az.create_model("tarflow_tiny", noise_std=0.1).double().eval()
    x = _x(model, 2)
    torch.testing.assert_close(model.denoise(x), (1 - 4 * 0.01) * x, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="noise_std"):
        _model().denoise(x)


@pytest.mark.parametrize(("name", "overrides"), [("marflow_tiny", {"prior": "gaussian"}),
                                                 ("tarflow_tiny", {}),
                                                 ("resflow_dot_tiny", {})])
def test_denoise_and_sample_options_in_every_family(name: str, overrides: dict) -> None:
    """denoise(x) − x = σ²·∇ log p(x), checked against central finite differences of the
    log-density (float64) in a few coordinates; ``sample(denoise=True)`` runs for every family;
    a family without guidance refuses it in one sentence."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = az.create_model(name, **overrides).double().eval()
    perturb_parameters(model, 0.02, torch.Generator().manual_seed(1))
    model.record_noise_std(0.05)
    assert model.config.noise_std == 0.05
    x = (torch.rand(1, *model.input_shape, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64) - 0.5)
    g = torch.Generator().manual_seed(3)
    step = model.denoise(x, generator=torch.Generator().manual_seed(3)) - x
    h = 1e-5
    for index in [(0, 0, 0, 0), (0, 1, 2, 3), (0, 2, 5, 1)]:
        e = torch.zeros_like(x)
        e[index] = h
        with torch.no_grad():
            fd = (model.log_density(x + e, generator=g.manual_seed(3))
                  - model.log_density(x - e, generator=g.manual_seed(3))) / (2 * h)
        assert float(step[index]) == pytest.approx(0.05 ** 2 * float(fd), rel=1e-5, abs=1e-12)
    images = model.float().sample(2, temperature=0.5, generator=g, denoise=True)
    assert images.shape == (2, *model.input_shape) and images.dtype == torch.uint8
    if name != "tarflow_tiny":
        with pytest.raises(ConfigError, match="guidance"):
            model.sample(2, generator=g, guidance=1.0)


def test_class_conditional_guidance_and_label_dropout() -> None:
    """A class-conditional TarFlow: the class changes the density; guidance mixes in the "no
    class" row K's pass (and needs one); fit's label dropout sends ~10 % of labels to K."""
    from attnflow_zoo.models.conditioning import training_labels

    model = _model("tarflow_cond_tiny")
    assert model.null_class == 3
    x = _x(model, 4)
    assert (model.log_density(x, 0) - model.log_density(x, 1)).abs().min() > 1e-9
    plain = model.generate(2, generator=torch.Generator().manual_seed(0), y=1)
    guided = model.generate(2, generator=torch.Generator().manual_seed(0), y=1, guidance=2.0)
    assert (guided - plain).abs().max() > 1e-6
    unguided = model.generate(2, generator=torch.Generator().manual_seed(0), y=1,
                              guidance=0.0)
    assert torch.equal(unguided, plain)
    y = torch.zeros(4000, dtype=torch.long)
    dropped = training_labels(model, y, torch.Generator().manual_seed(0))
    assert set(dropped.tolist()) == {0, 3} and 0.08 < float((dropped == 3).float().mean()) < 0.12
    no_null = _model("tarflow_cond_tiny", class_dropout=0.0)
    with pytest.raises(ConfigError, match="label dropout"):
        no_null.generate(2, y=1, guidance=2.0)


def test_checkpoint_without_the_bound_key_loads_unbounded_bit_for_bit(tmp_path) -> None:
    """A config.json from before ``log_scale_bound`` and ``head_bias_init`` (and any converted
    ml-tarflow weights) meant ml-tarflow's unbounded log-scales: it loads as None, and density
    and samples are the saved model's bit for bit. The same weights under the preset's bound
    compute something else (so the comparison can fail)."""
    import json
    import warnings

    assert az.TarFlowConfig().log_scale_bound is None
    old = _model(dtype=torch.float32, scale=0.05, log_scale_bound=None)
    old.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    payload = json.loads(cfg_path.read_text())
    for key in ("log_scale_bound", "head_bias_init"):
        del payload["config"][key]
    cfg_path.write_text(json.dumps(payload))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = az.load_model(tmp_path).eval()
    assert loaded.config.log_scale_bound is None and loaded.config.head_bias_init == "zero"
    bounded = az.create_model("tarflow_tiny").eval()
    assert bounded.config.log_scale_bound == 4.0
    bounded.load_state_dict(old.state_dict())
    x = _x(old, 3).float()
    g = torch.Generator()
    with torch.no_grad():
        assert torch.equal(loaded.log_density(x), old.log_density(x))
        samples = old.generate(3, generator=g.manual_seed(0))
        assert torch.isfinite(samples).all()
        assert torch.equal(loaded.generate(3, generator=g.manual_seed(0)), samples)
        assert not torch.equal(bounded.log_density(x), old.log_density(x))
