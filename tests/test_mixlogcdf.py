"""MixLogCDF coupling (Flow++ / mAR-SCF, SPEC §3.1): round trip, brute-force logdet, the tails
against an independent high-precision reference, the bisection's residual and warning, init."""

from __future__ import annotations

import dataclasses
import math
import warnings
from decimal import Decimal, localcontext

import pytest
import torch

from attnflow_zoo.errors import ConfigError, ShapeError
from attnflow_zoo.layers.mixlogcdf import (
    BisectionInfo,
    BisectionNotConvergedWarning,
    MixLogCDFCoupling,
    init_mixture,
)
from attnflow_zoo.testing import (
    check_batch_independence,
    check_gradients,
    check_invertible,
    check_logdet,
    perturb_parameters,
)

#: A conditioner small enough for brute-force Jacobians; K = 4 keeps the tails' reference cheap.
SMALL = dict(hidden_channels=8, num_components=4, num_blocks=2, num_heads=2)


def _layer(num_channels: int, dtype: torch.dtype = torch.float64, scale: float = 0.2,
           **kwargs: object) -> MixLogCDFCoupling:
    """A coupling built under a fixed seed, moved away from init (scale 0.2 makes the mixture
    non-trivial: weights, means and scales vary with x_b), in eval mode."""
    options = {**SMALL, **kwargs}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = MixLogCDFCoupling(num_channels, **options)  # type: ignore[arg-type]
    perturb_parameters(layer, scale, torch.Generator().manual_seed(1))
    return layer.to(dtype).eval()


def _x(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_nontrivial(layer: MixLogCDFCoupling, x: torch.Tensor) -> None:
    with torch.no_grad():
        a, b, log_w, mu, log_s = layer.mixture_params(x[:, layer.num_a :])
    w = log_w.exp()
    assert a.abs().max() > 0.1 and b.abs().max() > 0.1
    assert (w.amax(1) - w.amin(1)).min() > 0.02, "mixture weights are still uniform"
    assert mu.std() > 0.1 and log_s.std() > 0.1


@pytest.mark.parametrize("head_init", ["fixed", "port"])
@pytest.mark.parametrize("batch", [1, 3])
def test_logdet_matches_brute_force_float64(head_init: str, batch: int) -> None:
    x = _x((batch, 4, 4, 4))
    layer = _layer(4, head_init=head_init)
    _assert_nontrivial(layer, x)
    check_logdet(layer, x, rtol=1e-10, atol=0.0)


def test_round_trip_float64() -> None:
    x = _x((5, 4, 4, 4))
    layer = _layer(4)
    _assert_nontrivial(layer, x)
    check_invertible(layer, x, atol=1e-8)
    _, info = layer.inverse_with_info(layer(x)[0])
    assert info.residual is not None
    assert float(info.residual) < 1e-8
    assert info.iterations is not None and info.iterations <= 100


def test_round_trip_float32_level_size() -> None:
    # A 3×32×32 image squeezed once; default K = 32, a narrow and shallow conditioner.
    x = _x((4, 12, 16, 16), torch.float32)
    layer = _layer(12, torch.float32, scale=0.05, hidden_channels=16, num_components=32)
    check_invertible(layer, x, atol=1e-5)


@pytest.mark.parametrize("num_channels", [3, 5])
def test_odd_channels(num_channels: int) -> None:
    x = _x((2, num_channels, 4, 4))
    layer = _layer(num_channels)
    assert (layer.num_a, layer.num_b) == (num_channels // 2, num_channels - num_channels // 2)
    check_invertible(layer, x, atol=1e-8)
    check_logdet(layer, x, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("swap", [True, False])
def test_output_layout(swap: bool) -> None:
    x = _x((2, 4, 4, 4))
    layer = _layer(4, swap=swap)
    z, _ = layer(x)
    kept = z[:, :2] if swap else z[:, 2:]
    assert torch.equal(kept, x[:, 2:])
    check_invertible(layer, x, atol=1e-8)


def test_batch_independence_eval() -> None:
    check_batch_independence(_layer(4), _x((3, 4, 4, 4)), atol=1e-12)


def test_gradients_reach_every_parameter() -> None:
    layer = MixLogCDFCoupling(4, **SMALL).double()  # type: ignore[arg-type]
    check_gradients(layer, _x((2, 4, 4, 4)))


def test_dropout_only_in_training() -> None:
    layer = _layer(4, dropout=0.5)
    x = _x((2, 4, 4, 4))
    with torch.no_grad():
        assert torch.equal(layer(x)[0], layer(x)[0])
        layer.train()
        torch.manual_seed(0)
        z1 = layer(x)[0]
        z2 = layer(x)[0]
    assert not torch.allclose(z1, z2)


# --- init -------------------------------------------------------------------------------------

def _logistic_mixture_reference(x: torch.Tensor, means: torch.Tensor,
                                scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit F, log F') of an equal-weight mixture, straight from the definition (float64,
    moderate x only)."""
    sig = torch.sigmoid((x.unsqueeze(-1) - means) / scales)
    cdf = sig.mean(-1)
    pdf = (sig * (1 - sig) / scales).mean(-1)
    return torch.log(cdf / (1 - cdf)), torch.log(pdf / (cdf * (1 - cdf)))


def test_init_is_a_fixed_elementwise_map() -> None:
    """At init the layer is z = (x_b, logit F_0(x_a)) with F_0 = init_mixture(K, 0.3): close
    to, but not exactly, the identity; x_b does not influence y_a."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = MixLogCDFCoupling(4, **SMALL).double().eval()  # type: ignore[arg-type]
    x = _x((3, 4, 4, 4))
    z, logdet = layer(x)
    # The layer was built in float32, so its head bias holds the float32-rounded mixture.
    means, log_scales = (t.float().double() for t in init_mixture(4, 0.3))
    u_ref, log_du_ref = _logistic_mixture_reference(x[:, :2], means, log_scales.exp())
    assert torch.equal(z[:, :2], x[:, 2:])
    torch.testing.assert_close(z[:, 2:], u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, log_du_ref.flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    deviation = (z[:, 2:] - x[:, :2]).abs().max().item()
    assert 1e-3 < deviation < 0.05, deviation
    # x_b does not enter y_a at init.
    x_other = torch.cat([x[:, :2], _x((3, 2, 4, 4), seed=5)], 1)
    torch.testing.assert_close(layer(x_other)[0][:, 2:], z[:, 2:], rtol=0, atol=0)


def test_zero_spread_init_is_the_identity() -> None:
    layer = MixLogCDFCoupling(4, init_spread=0.0, **SMALL).double().eval()  # type: ignore[arg-type]
    x = _x((2, 4, 4, 4))
    z, logdet = layer(x)
    torch.testing.assert_close(z, torch.cat([x[:, 2:], x[:, :2]], 1), rtol=0, atol=1e-13)
    torch.testing.assert_close(logdet, torch.zeros(2, dtype=x.dtype), rtol=0, atol=1e-12)


# --- the tails ----------------------------------------------------------------------------------

def _decimal_logit_cdf(x: float, log_w: list[float], mu: list[float], log_s: list[float],
                       prec: int = 400) -> float:
    """logit F(x) at `prec` significant digits, with 1 − F formed by subtraction (the naive
    formula, made exact by the precision): an independent reference for the layer's log-space
    evaluation."""
    with localcontext() as ctx:
        ctx.prec = prec
        weights = [Decimal(v).exp() for v in log_w]
        total = sum(weights)
        cdf = sum((w / total) / (1 + (-(Decimal(x) - Decimal(m)) / Decimal(s).exp()).exp())
                  for w, m, s in zip(weights, mu, log_s, strict=True))
        return float((cdf / (1 - cdf)).ln())


def _port_logit_cdf(log_cdf: torch.Tensor) -> torch.Tensor:
    """The ports' logit(exp(logsumexp(·))): −log(clamp(1/F − 1, 1e−22)) (log_dist.py)."""
    cdf = log_cdf.exp()
    return -torch.log((cdf.reciprocal() - 1.0).clamp(min=1e-22))


def _tail_case(value: float, dtype: torch.dtype) -> tuple[MixLogCDFCoupling, torch.Tensor]:
    layer = _layer(4, dtype)
    x = torch.cat([torch.full((1, 2, 2, 2), value, dtype=dtype), _x((1, 2, 2, 2), dtype)], 1)
    return layer, x


def _layer_u_and_reference(layer: MixLogCDFCoupling,
                           x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u from the layer's output, u from the Decimal reference, log F from the layer's params)."""
    with torch.no_grad():
        z, _ = layer(x)
        a, b, log_w, mu, log_s = layer.mixture_params(x[:, 2:])
        u_layer = z[:, 2:] * torch.exp(-a) - b
        log_cdf = torch.logsumexp(
            log_w + torch.nn.functional.logsigmoid(
                (x[:, :2].unsqueeze(1) - mu) * torch.exp(-log_s)), 1)
    value = float(x[0, 0, 0, 0])
    ref = torch.empty(u_layer.shape, dtype=torch.float64)
    lw, m, ls = (t.double()[0] for t in (log_w, mu, log_s))
    for c in range(lw.shape[1]):
        for i in range(lw.shape[2]):
            for j in range(lw.shape[3]):
                ref[0, c, i, j] = _decimal_logit_cdf(
                    value, lw[:, c, i, j].tolist(), m[:, c, i, j].tolist(),
                    ls[:, c, i, j].tolist())
    return u_layer.double(), ref, log_cdf


@pytest.mark.parametrize("value", [15.0, -15.0, 25.0, -25.0, 40.0, -40.0, 300.0, -300.0])
def test_tails_float64_match_high_precision_reference(value: float) -> None:
    layer, x = _tail_case(value, torch.float64)
    u_layer, ref, log_cdf = _layer_u_and_reference(layer, x)
    assert ref.abs().min() > 9, "not in the tail (F or 1 − F below 1e-4)"
    # (u + b)·e^a then ·e^−a − b costs a few ulp of max(|u|, |b|).
    torch.testing.assert_close(u_layer, ref, rtol=1e-12, atol=0.0)
    check_invertible(layer, x, atol=1e-8 * max(1.0, abs(value)))
    if value == 40.0:
        # Where 1 − F < 2^−53·… the ports' formula breaks even in float64 (F rounds to 1 and the
        # clamp answers 50.66); in the left tail F itself is representable and it is fine.
        far = ref > 40
        assert far.any()
        assert ((_port_logit_cdf(log_cdf) - ref).abs()[far] > 1).all()


def test_bisection_bracket_is_widened_beyond_the_spec_bracket() -> None:
    """At x = 300 the root lies outside [min(μ − 20Σs), max(μ + 20Σs)] for some elements with
    small scales; the inverse still recovers x (the widened bracket is not a clamp)."""
    layer, x = _tail_case(300.0, torch.float64)
    with torch.no_grad():
        _, _, _, mu, log_s = layer.mixture_params(x[:, 2:])
        spec_hi = mu.amax(1) + 20 * log_s.exp().sum(1)
    assert (spec_hi < 300.0).any()
    x_rec = layer.inverse(layer(x)[0])
    torch.testing.assert_close(x_rec, x, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("value", [15.0, -15.0, 25.0, -25.0, 40.0, -40.0])
def test_tails_float32_stable_where_the_ports_formula_fails(value: float) -> None:
    layer, x = _tail_case(value, torch.float32)
    u_layer, ref, log_cdf = _layer_u_and_reference(layer, x)
    torch.testing.assert_close(u_layer, ref, rtol=2e-5, atol=0.0)
    if value >= 25:
        # Where 1 − F is below float32's spacing under 1 (u ≳ 17), F rounds to 1 ± 2^−23 and
        # the ports' formula answers garbage: −log(1e−22) = 50.66 (the clamp; the SPEC's
        # "float32 50.66" at x = 15, whatever the mixture) where F ≥ 1, else ≈ 15.9 or 15.2.
        far = ref > 17
        assert far.any()
        port = _port_logit_cdf(log_cdf).double()
        assert ((port - ref).abs()[far] > 1).all()
        clamped = log_cdf.exp() >= 1
        assert clamped.any()
        torch.testing.assert_close(port[clamped], torch.full_like(port[clamped],
                                                                  -math.log(1e-22)))


# --- the inverse's record ---------------------------------------------------------------------

def test_inverse_records_residual_and_warns_when_not_converged() -> None:
    layer = _layer(4)
    x = _x((2, 4, 4, 4))
    z, _ = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BisectionNotConvergedWarning)
        _, info = layer.inverse_with_info(z)
    converged = float(info.residual)
    assert converged < 1e-8
    with pytest.warns(BisectionNotConvergedWarning, match="bisection stopped after 3"):
        x_rough, info = layer.inverse_with_info(z, max_iter=3)
    assert issubclass(BisectionNotConvergedWarning, RuntimeWarning)
    assert info.iterations == 3
    assert float(info.residual) > 1e-3
    assert (x_rough - x).abs().max() > 1e-3


def test_inverse_returns_its_record_and_leaves_the_layer_as_it_was() -> None:
    layer = _layer(4)
    z, _ = layer(_x((2, 4, 4, 4)))
    before = dict(vars(layer))
    x_rec, info = layer.inverse_with_info(z)
    assert vars(layer) == before  # no record of the call is left on the layer
    assert torch.equal(layer.inverse(z), x_rec)
    assert isinstance(info, BisectionInfo) and 0 < info.iterations <= layer.inverse_max_iter
    assert info.residual.dim() == 0 and float(info.residual) < 1e-8
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.iterations = 0  # type: ignore[misc]


def test_inverse_warns_on_non_finite_latent() -> None:
    layer = _layer(4)
    z = _x((1, 4, 4, 4))
    z[0, 3, 0, 0] = math.nan
    with pytest.warns(BisectionNotConvergedWarning):
        layer.inverse(z)


# --- configuration errors -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(num_channels=1),
    dict(num_channels=4, hidden_channels=6, num_heads=4),
    dict(num_channels=4, dropout=1.0),
    dict(num_channels=4, head_init="zeros"),
    dict(num_channels=4, init_spread=1.0),
    dict(num_channels=4, inverse_max_iter=0),
])
def test_bad_configuration_is_a_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        MixLogCDFCoupling(**{"hidden_channels": 8, **kwargs})


def test_wrong_input_channels_is_a_shape_error() -> None:
    layer = MixLogCDFCoupling(4, **SMALL)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        layer(torch.zeros(1, 6, 4, 4))
