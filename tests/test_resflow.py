"""ResFlow (i-ResNet + residual attention): every tiny preset as a density model."""

from __future__ import annotations

import pytest
import torch

import attnflow_zoo as az
from attnflow_zoo.models.resflow import ResFlow
from attnflow_zoo.testing import (
    brute_force_logdet,
    check_batch_independence,
    check_gradients,
    check_invertible,
)

TINY = az.list_models("resflow*_tiny")


def _ready(name: str, dtype: torch.dtype = torch.float64) -> tuple[ResFlow, torch.Tensor]:
    torch.manual_seed(0)  # default conv init uses the global RNG
    model = az.create_model(name)
    x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(1)) - 0.5
    model.train()
    with torch.no_grad():
        model(x)  # ActNorm's data-dependent init
    return model.to(dtype).eval(), x.to(dtype)


def test_tiny_presets_exist() -> None:
    assert set(TINY) == {"resflow_concat_tiny", "resflow_dot_tiny"}


@pytest.mark.parametrize("name", TINY)
def test_round_trip_and_brute_force_logdet(name: str) -> None:
    model, x = _ready(name)
    check_invertible(model, x, atol=1e-10)
    with torch.no_grad():
        _, logdet = model(x)
    ref = brute_force_logdet(model.latent, x)
    torch.testing.assert_close(logdet.detach(), ref, rtol=1e-8, atol=1e-8)
    check_batch_independence(model, x)


@pytest.mark.parametrize("name", TINY)
def test_gradients_with_the_training_estimator(name: str) -> None:
    model, x = _ready(name, torch.float32)
    for layer in model.modules():
        if hasattr(layer, "num_series_terms"):
            layer.logdet = "series"  # what training uses: backprop through the power series
    check_gradients(model, x, nll=lambda m, v: -m.log_density(v).mean())


@pytest.mark.parametrize("name", TINY)
def test_save_load_identical_outputs(name: str, tmp_path) -> None:
    model, x = _ready(name, torch.float32)
    model.save_pretrained(tmp_path)
    loaded = ResFlow.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(2)
    x_u8 = torch.randint(0, 256, (2, *model.input_shape), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        z, logdet = model(x)
        z2, logdet2 = loaded(x)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        assert torch.equal(model.bits_per_dim(x_u8, g1), loaded.bits_per_dim(x_u8, g2))


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
