"""ResFlow (i-ResNet + residual attention): every tiny preset as a density model."""

from __future__ import annotations

import pytest
import torch

import attnflow_zoo as az
from attnflow_zoo.core import initialize_from_data
from attnflow_zoo.models.resflow import ResFlow
from attnflow_zoo.testing import (
    check_gradients,
    check_invertible,
)

TINY = az.list_models("resflow*_tiny")


def _ready(name: str, dtype: torch.dtype = torch.float64) -> tuple[ResFlow, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # default conv init uses the global RNG
        model = az.create_model(name)
    x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(1)) - 0.5
    initialize_from_data(model, lambda: model(x))  # ActNorm's data-dependent init
    return model.to(dtype).eval(), x.to(dtype)


def test_tiny_presets_exist() -> None:
    assert set(TINY) == {"resflow_concat_tiny", "resflow_dot_tiny"}


@pytest.mark.parametrize("name", TINY)
def test_gradients_with_the_training_estimator(name: str) -> None:
    model, x = _ready(name, torch.float32)
    for layer in model.modules():
        if hasattr(layer, "num_series_terms"):
            layer.logdet = "series"  # what training uses: backprop through the power series
    check_gradients(model, x, nll=lambda m, v: -m.log_density(v).mean())


@pytest.mark.parametrize("name", TINY)
def test_round_trip_is_exact_to_float64_precision(name: str) -> None:
    model, x = _ready(name)
    check_invertible(model, x, atol=1e-10)


@pytest.mark.parametrize("name", TINY)
def test_sample_and_bits_per_dim(name: str) -> None:
    model, _ = _ready(name, torch.float32)
    samples = model.sample(4, temperature=0.7, generator=torch.Generator().manual_seed(4))
    assert samples.dtype == torch.uint8 and samples.shape == (4, *model.input_shape)
    with torch.no_grad():
        bpd = model.bits_per_dim(samples)
    assert bpd.shape == (4,) and torch.isfinite(bpd).all()


def test_paper_scale_preset_shapes() -> None:
    with torch.device("meta"):
        model = az.create_model("resflow_concat_cifar10")
    assert model.latent_shapes == [(6, 16, 16), (12, 8, 8), (48, 4, 4)]
    assert len(model.scales) == 3 and len(model.scales[0]) == 32  # 16 × (ActNorm, block)
    assert model.attention is not None and model.attention.channels == 12


@pytest.mark.parametrize("name", ["resflow_concat_cifar10", "resflow_dot_cifar10"])
def test_generative_presets_are_invertible_at_initialisation(name: str) -> None:
    """A generative preset's attention is the certified one: the published (faithful) dot and
    concat branches are not contractive at random initialisation, and the preset gave
    log-densities of 7.5e9 nats for uniform noise images. At the preset's attention (12×16×16,
    after the squeeze) and a narrow backbone, the density at initialisation is a density and
    the inverse reconstructs."""
    assert az.registry.get_entry(name).config.attention_lipschitz == "certified"
    torch.manual_seed(0)
    model = az.create_model(name, blocks_per_scale=1, hidden_channels=16).eval()
    x_u8 = torch.randint(0, 256, (2, *model.input_shape), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bpd = model.bits_per_dim(x_u8, generator=torch.Generator().manual_seed(3))
        x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(2)) - 0.5
        back = model.inverse(model(x)[0])
    assert torch.isfinite(bpd).all() and (bpd > 0).all() and (bpd < 16).all(), bpd
    assert (back - x).abs().max() < 1e-4


@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_estimators_draw_from_the_generator_not_the_global_rng(logdet: str) -> None:
    """log_density(x, generator) is a function of the generator alone (fit's exact resume
    relies on it); the global RNG plays no part."""
    model, x = _ready("resflow_dot_tiny", torch.float32)
    for layer in model.modules():
        if hasattr(layer, "num_series_terms"):
            layer.logdet = logdet
    values = []
    for global_seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            values.append(model.log_density(x, generator=torch.Generator().manual_seed(7)).detach())
    assert torch.equal(values[0], values[1])
    other = model.log_density(x, generator=torch.Generator().manual_seed(8)).detach()
    assert not torch.equal(values[0], other)  # the probes do come from the generator
