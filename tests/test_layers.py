"""Every foundation layer: round trip, brute-force logdet, batch independence, gradients."""

from __future__ import annotations

import pytest
import torch

from attnflow_zoo import FlowSequential
from attnflow_zoo.core import initialize_from_data
from attnflow_zoo.errors import ShapeError
from attnflow_zoo.layers import ActNorm, AffineCoupling, InvConv1x1, Squeeze
from attnflow_zoo.testing import (
    check_batch_independence,
    check_gradients,
    check_invertible,
    check_logdet,
    perturb_parameters,
)

LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "invconv": lambda c: InvConv1x1(c, generator=torch.Generator().manual_seed(1)),
    "coupling": lambda c: AffineCoupling(c, hidden_channels=8),
    "coupling_odd": lambda c: AffineCoupling(c + 1, hidden_channels=8),
    "coupling_bounded": lambda c: AffineCoupling(c, hidden_channels=8, log_scale_bound=0.5),
    "squeeze": lambda c: Squeeze(2),
    "step": lambda c: FlowSequential(
        ActNorm(c), InvConv1x1(c, generator=torch.Generator().manual_seed(1)), AffineCoupling(c, 8)
    ),
}


def _ready(name: str, c: int, x: torch.Tensor, dtype: torch.dtype,
           scale: float = 0.05) -> torch.nn.Module:
    """Build a layer, run its data-dependent init on x, move parameters away from init.

    Construction runs under a fixed seed so no test depends on which tests ran before it in the
    worker. 0.05 keeps σ(raw + 2) ≥ 0.2 over 40 seeds; 0.1 reached 8e-7, a coupling that divides
    by 1e-6, which no trained model is and which costs a float64 round trip its 1e-10.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = LAYERS[name](c)
    if name == "coupling_odd":
        x = torch.cat([x, x[:, :1]], 1)
    layer.train()
    with torch.no_grad():
        layer(x.float())
    perturb_parameters(layer, scale, torch.Generator().manual_seed(2))
    return layer.to(dtype).eval()


def _input(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if name == "coupling_odd":
        x = torch.cat([x, x[:, :1] * 0.5], 1)
    return x


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("batch", [1, 3])
def test_logdet_matches_brute_force(name: str, batch: int) -> None:
    x = _input(name, (batch, 4, 4, 4), torch.float64)
    layer = _ready(name, 4, x[:, :4], torch.float64)
    check_logdet(layer, x, rtol=1e-8)


@pytest.mark.parametrize("name", LAYERS)
def test_round_trip_float64(name: str) -> None:
    x = _input(name, (5, 4, 8, 8), torch.float64)
    layer = _ready(name, 4, x[:, :4], torch.float64)
    check_invertible(layer, x, atol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", [(16, 12, 16, 16), (16, 24, 8, 8), (16, 48, 4, 4)])
def test_round_trip_float32_realistic(name: str, shape: tuple[int, ...]) -> None:
    x = _input(name, shape, torch.float32)
    # A milder perturbation: 0.1 on a 12-channel conditioner drives σ(raw + 2) to ~1e-9,
    # a layer no float32 inverse can undo; 0.02 keeps it trained-like (σ ≳ 1e-2).
    layer = _ready(name, shape[1], x[:, : shape[1]], torch.float32, scale=0.02)
    check_invertible(layer, x, atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_batch_independence(name: str) -> None:
    x = _input(name, (4, 4, 4, 4), torch.float64)
    layer = _ready(name, 4, x[:, :4], torch.float64)
    check_batch_independence(layer, x)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "squeeze"])
def test_gradients_reach_every_parameter(name: str) -> None:
    x = _input(name, (3, 4, 4, 4), torch.float64)
    layer = _ready(name, 4, x[:, :4], torch.float64)
    check_gradients(layer, x)


def test_actnorm_initialises_once_and_survives_reload() -> None:
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(64, 3, 8, 8, generator=g)
    layer = ActNorm(3).train()
    layer(x)  # forward alone never initialises: the init is an explicit pass
    assert torch.equal(layer.bias, torch.zeros(3)) and not bool(layer.initialized)
    assert initialize_from_data(layer, lambda: layer(x)) == 1
    z, _ = layer(x)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    before = layer.state_dict()
    layer(x * 10)  # a second batch must not re-initialise
    assert initialize_from_data(layer, lambda: layer(x * 10)) == 0
    assert torch.equal(layer.bias, before["bias"])
    fresh = ActNorm(3)
    fresh.load_state_dict(before)
    fresh.train()
    assert initialize_from_data(fresh, lambda: fresh(x * 10)) == 0
    assert torch.equal(fresh.bias, before["bias"]), "a reloaded ActNorm re-initialised"


def test_identity_at_init() -> None:
    """The coupling starts near the identity: z_a = x_a exactly, z_b = σ(2)·x_b."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    layer = AffineCoupling(4, 8).train()
    z, _ = layer(x)
    assert torch.equal(z[:, :2], x[:, :2])
    assert torch.allclose(z[:, 2:], torch.sigmoid(torch.tensor(2.0)) * x[:, 2:], atol=1e-6)


def test_squeeze_rejects_odd_sizes() -> None:
    with pytest.raises(ShapeError, match="divisible"):
        Squeeze(2)(torch.zeros(1, 3, 5, 4))


def test_invconv_inverse_stays_on_device_dtype() -> None:
    layer = InvConv1x1(6).double()
    z = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    assert layer.inverse(z).dtype == torch.float64
