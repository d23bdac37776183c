"""ResidualAttention (Zha et al.): inverse, contractivity, log-det estimators, spectral norm."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnflow_zoo import logdet_estimators
from attnflow_zoo.layers.residual import InverseNotConvergedWarning
from attnflow_zoo.layers.residual_attention import KINDS, ResidualAttention
from attnflow_zoo.layers.spectral import SNConv1x1, SNConv2d
from attnflow_zoo.testing import (
    check_batch_independence,
    check_gradients,
    check_invertible,
    check_logdet,
    perturb_parameters,
)


def _layer(kind: str, lipschitz: str, channels: int = 8, seed: int = 0, scale: float = 0.1,
           **kwargs: object) -> ResidualAttention:
    torch.manual_seed(seed)  # PyTorch's default conv init draws from the global RNG
    layer = ResidualAttention(channels, kind, lipschitz=lipschitz, **kwargs)
    perturb_parameters(layer, scale, torch.Generator().manual_seed(seed + 1))
    if layer.gate == "gamma":
        with torch.no_grad():
            layer.gamma.fill_(0.7)  # tanh(γ) ≈ 0.6: a branch that is far from zero
    return layer.eval()


def _exact_jacobian_norm(layer: ResidualAttention, x: torch.Tensor) -> float:
    """max_i ‖J_g(x_i)‖₂ from the full Jacobian (small inputs)."""
    norms = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda v, s=xi.shape: layer.branch(v.reshape(s)).reshape(-1), xi.reshape(-1),
            vectorize=True)
        norms.append(torch.linalg.matrix_norm(jac, ord=2).item())
    return max(norms)


def _contractive_faithful(kind: str, x: torch.Tensor) -> tuple[ResidualAttention, torch.Tensor]:
    """The faithful layer on inputs/weights where it IS contractive (measured), see SPEC §2.2."""
    layer = _layer(kind, "faithful", channels=x.shape[1])
    with torch.no_grad():
        for _ in range(6):
            if layer.jacobian_norm(x, 15).max() < 0.5:
                return layer, x
            # Shrink inputs (exp energies) and the output gate (ELU energies) until it contracts.
            x = x * 0.5
            if layer.gate == "conv":
                layer.gamma_conv.weight.mul_(0.1)
    raise AssertionError(f"could not make faithful {kind} contractive")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lipschitz", ["faithful", "certified"])
def test_inverse_float32_where_contractive(kind: str, lipschitz: str, gen: torch.Generator
                                           ) -> None:
    x = torch.rand(3, 12, 6, 6, generator=gen) - 0.5
    if lipschitz == "certified":
        layer = _layer(kind, lipschitz, channels=12)
        x = x * 10  # certified holds everywhere, not just on the data range
    else:
        layer, x = _contractive_faithful(kind, x)
    assert layer.jacobian_norm(x, 15).max() < 1
    y = layer.residual(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InverseNotConvergedWarning)
        x_rec, info = layer.inverse_with_info(y)
    assert info is not None and info.converged
    assert info.iterations < layer.inverse_max_iter  # stopped as soon as converged
    assert info.residual <= layer.inverse_tol
    assert (x_rec - x).abs().max().item() <= 1e-5


def test_inverse_returns_its_record_and_leaves_the_layer_as_it_was(gen: torch.Generator
                                                                   ) -> None:
    layer = _layer("dot", "certified", channels=12)
    x = torch.rand(2, 12, 6, 6, generator=gen) - 0.5
    y = layer.residual(x)
    before = dict(vars(layer))
    x_rec, info = layer.inverse_with_info(y)
    assert vars(layer) == before  # no record of the call is left on the layer
    assert torch.equal(layer.inverse(y), x_rec)
    assert info.converged and info.residual_per_sample.shape == (2,)
    assert info.residual == float(info.residual_per_sample.max())


@pytest.mark.parametrize("kind", ["dot", "concat"])
def test_faithful_non_contractive_inverse_warns(kind: str, gen: torch.Generator) -> None:
    # At random init the faithful dot/concat branches are not contractive (SPEC §2.2).
    torch.manual_seed(0)
    layer = ResidualAttention(12, kind).eval()
    x = torch.rand(2, 12, 6, 6, generator=gen) - 0.5
    assert layer.jacobian_norm(x, 30).max() > 1
    with pytest.warns(InverseNotConvergedWarning, match="did not converge"):
        _, info = layer.inverse_with_info(layer.residual(x), max_iter=20)
    assert info is not None and not info.converged and info.iterations == 20


@pytest.mark.parametrize("kind", KINDS)
def test_certified_is_contractive_for_random_weights_and_large_inputs(kind: str) -> None:
    for seed in range(2):
        layer = _layer(kind, "certified", channels=8, seed=seed, scale=1.0)
        x = 10 * torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(seed))
        bound = min(layer.lipschitz_bound().item(), layer.certified_coeff)
        exact = _exact_jacobian_norm(layer, x)
        assert exact < 1
        assert exact <= bound * (1 + 1e-5)
        # The power-iteration estimate agrees with the exact norm (it is a lower estimate).
        est = layer.jacobian_norm(x, 50).max().item()
        assert est <= exact * (1 + 1e-4) and est >= 0.95 * exact


@pytest.mark.parametrize("kind", KINDS)
def test_exact_mode_round_trip_and_brute_force_logdet(kind: str) -> None:
    layer = _layer(kind, "certified", channels=4, logdet="exact", scale=0.3).double()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    check_invertible(layer, x, atol=1e-10)
    check_logdet(layer, x)
    check_batch_independence(layer, x)


@pytest.mark.parametrize("kind", ["embedded", "gaussian"])
def test_exact_mode_faithful_logdet(kind: str) -> None:
    layer = _layer(kind, "faithful", channels=4, logdet="exact").double()
    x = 0.3 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4),
                          dtype=torch.float64)
    check_invertible(layer, x, atol=1e-10)
    check_logdet(layer, x)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    layer = _layer(kind, "certified", channels=8)
    if layer.gate == "gamma":
        with torch.no_grad():
            # Below the certified cap: once c/L̂ < 1 the output no longer depends on |tanh γ|.
            layer.gamma.fill_(0.05)
    check_gradients(layer, torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(5)))


def test_concat_matches_the_materialised_concatenation() -> None:
    # w·[q_i; k_j] computed as a·q_i + b·k_j must equal the original's N×N×2C/4 construction.
    layer = _layer("concat", "faithful", channels=8)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(6))
    b, c, h, w = x.shape
    n = h * w
    q = layer.query(x.flatten(2))
    k = layer.key(x.flatten(2))
    feats = torch.cat([q.unsqueeze(3).expand(-1, -1, -1, n), k.unsqueeze(2).expand(-1, -1, n, -1)],
                      dim=1)  # B×2C/4×N×N
    energy = F.elu(torch.einsum("oc,bcij->bij", layer.concat.effective_weight(), feats))
    attn = energy / (1.5 * energy.sum(1, keepdim=True))
    out = layer.gamma_conv(layer.value(x.flatten(2)) @ attn).reshape(x.shape)
    torch.testing.assert_close(layer.branch(x), out)


def _basis_probes(x: torch.Tensor) -> torch.Tensor:
    """√D · e_d for every d: Hutchinson with these probes gives the trace exactly."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype) * math.sqrt(d)
    return eye.reshape(d, 1, *x.shape[1:]).expand(d, *x.shape).contiguous()


def test_power_series_converges_to_brute_force() -> None:
    layer = _layer("embedded", "certified", channels=4).double()
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = logdet_estimators.exact_logdet(lambda v: v + layer.branch(v), x)
    lip = layer.jacobian_norm(x, 50).item()
    assert 0.01 < lip < 0.9
    xg = x.clone().requires_grad_(True)
    gx = layer.branch(xg)
    errors = []
    for n in (1, 2, 4, 8, 16):
        est = logdet_estimators.power_series_logdet(gx, xg, n, probes=_basis_probes(x),
                                                    create_graph=False)
        errors.append((est - exact).abs().item())
        # Truncation error ≤ Σ_{k>n} D·L^k/k ≤ D·L^{n+1}/((n+1)(1 − L)).
        assert errors[-1] <= x.numel() * lip ** (n + 1) / ((n + 1) * (1 - lip)) + 1e-12
    assert errors[-1] < 1e-8 and errors[-1] < errors[0]


def test_russian_roulette_is_unbiased() -> None:
    layer = _layer("gaussian", "certified", channels=4).double()
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = logdet_estimators.exact_logdet(lambda v: v + layer.branch(v), x)
    xg = x.clone().requires_grad_(True)
    gx = layer.branch(xg)
    gen = torch.Generator().manual_seed(9)
    draws = torch.stack([
        logdet_estimators.russian_roulette_logdet(gx, xg, num_exact_terms=1, generator=gen,
                                                  create_graph=False)
        for _ in range(300)])  # 300 × (Hutchinson probe, random number of terms)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (se > 0).all()
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)


def test_layer_series_and_roulette_modes_estimate_the_logdet() -> None:
    layer = _layer("dot", "certified", channels=4).double()
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    layer.logdet = "exact"
    _, exact = layer(x)
    for mode in ("series", "roulette"):
        layer.logdet = mode
        layer.num_probes = 200
        with torch.no_grad():
            y, est = layer(x, generator=torch.Generator().manual_seed(11))
        assert not y.requires_grad and not est.requires_grad
        torch.testing.assert_close(y, layer.residual(x))
        assert (est - exact).abs().max() < 0.02  # Hutchinson noise with 200 probes, seeded


def test_soft_spectral_norm() -> None:
    torch.manual_seed(0)
    conv = SNConv1x1(6, 5, coeff=0.5)
    with torch.no_grad():
        conv.weight.mul_(10)  # σ ≫ c: the weight must be rescaled to ≈ c
    u0 = conv.u.clone()
    conv.eval()
    conv(torch.randn(1, 6, 3, 3))
    assert torch.equal(conv.u, u0)  # eval mode: power-iteration vectors untouched
    conv.train()
    for _ in range(10):
        conv(torch.randn(1, 6, 3, 3))
    assert not torch.equal(conv.u, u0)
    assert conv.exact_norm().item() == pytest.approx(0.5, rel=1e-3)
    with torch.no_grad():
        conv.weight.mul_(1e-3)  # σ < c: left alone (soft normalisation)
    torch.testing.assert_close(conv.effective_weight(), conv.weight)

    op = SNConv2d(3, 4, 3, (6, 6), coeff=0.9)
    with torch.no_grad():
        op.weight.mul_(10)
    for _ in range(20):
        op(torch.randn(1, 3, 6, 6))
    # Operator norm of the normalised conv on 3×6×6 inputs, from its full matrix.
    jac = torch.autograd.functional.jacobian(
        lambda v: F.conv2d(v.reshape(1, 3, 6, 6), op.effective_weight().detach(),
                           padding=1).reshape(-1), torch.zeros(3 * 36))
    # Power iteration on a conv operator converges slowly: σ̂ is a slight under-estimate.
    assert torch.linalg.matrix_norm(jac, ord=2).item() == pytest.approx(0.9, rel=1e-2)
