"""Every inverse maps a finite input to a finite output, with an amplification bounded by the
layer's parameters: the soft-clipped coupling scales, iMap gates and Gaussian-prior σ by their
bound c (at most e^c per entry), the other layers by construction. Random (far from zero)
parameters and inputs up to |z| = 1e3, where the unbounded published layers overflow."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import attnflow_zoo as az
from attnflow_zoo.layers import ActNorm, AffineCoupling, IMap, InvConv1x1, ITrans, Squeeze
from attnflow_zoo.layers.mixlogcdf import MixLogCDFCoupling
from attnflow_zoo.priors import GaussianPrior, MARPrior
from attnflow_zoo.testing import perturb_parameters

C, H, W = 4, 8, 8
BOUND = 4.0

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "coupling": lambda: AffineCoupling(C, 16, log_scale_bound=BOUND),
    "imap_sigmoid": lambda: IMap(C, H, W, 0, "spatial", init_logit=4.0, log_gate_bound=BOUND),
    "imap_normalized": lambda: IMap(C, H, W, 1, "channel", init_logit=0.0, gate="normalized",
                                    log_gate_bound=BOUND),
    "itrans_convex": lambda: ITrans(C, H, W, 0, patch_size=2),
    "itrans_paper": lambda: ITrans(C, H, W, 1, patch_size=1, form="paper"),
    "mixlogcdf": lambda: MixLogCDFCoupling(C, 8, 3, 1, 2, 0.0),
    "actnorm": lambda: ActNorm(C),
    "invconv": lambda: InvConv1x1(C, generator=torch.Generator().manual_seed(1)),
    "squeeze": lambda: Squeeze(2),
}


def _random_layer(make: Callable[[], nn.Module], seed: int = 0, scale: float = 1.0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = make()
    return perturb_parameters(layer, scale, torch.Generator().manual_seed(seed + 1)).eval()


def _large(shape: tuple[int, ...], seed: int = 0, size: float = 1e3) -> Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return size * z / z.abs().amax()  # entries up to ±size


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_of_a_large_finite_input_is_finite(name: str, seed: int) -> None:
    layer = _random_layer(LAYERS[name], seed)
    with torch.no_grad():
        x = layer.inverse(_large((3, C, H, W), seed))
    assert torch.isfinite(x).all()


def _unmasked(layer: nn.Module) -> Tensor:
    """Where a change of z leaves the layer's parameters alone: z_b of a coupling, z_U of iMap."""
    if isinstance(layer, AffineCoupling):
        return (torch.arange(C) >= layer.num_a).view(1, C, 1, 1).expand(1, C, H, W)
    return (1 - layer.mask).bool().unsqueeze(0)


def _amplification(layer: nn.Module, seed: int) -> float:
    """max |Δx|/|Δz| of the inverse for a change Δz of the entries the parameters do not see."""
    z = _large((3, C, H, W), seed)
    dz = torch.where(_unmasked(layer), 1.0, 0.0).expand_as(z)
    with torch.no_grad():
        dx = layer.inverse(z.double() + dz) - layer.inverse(z.double())
    return float(dx.abs().max())


@pytest.mark.parametrize("name", ["coupling", "imap_sigmoid", "imap_normalized"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounded_layers_amplify_by_at_most_e_to_the_bound(name: str, seed: int) -> None:
    layer = _random_layer(LAYERS[name], seed).double()
    # (1 + 1e-6): float64 rounding of (z − shift)·e^c with shifts of ~1e8 at these inputs.
    assert _amplification(layer, seed) <= math.exp(BOUND) * (1 + 1e-6)


def test_the_unbounded_published_layers_do_not() -> None:
    """The same weights without the bound: the check above fails (or overflows)."""
    found = []
    for make in (lambda: AffineCoupling(C, 16),
                 lambda: IMap(C, H, W, 0, "spatial", init_logit=4.0)):
        amps = [_amplification(_random_layer(make, seed).double(), seed) for seed in range(3)]
        found.append(max(amps))
    assert all(not a <= math.exp(BOUND) for a in found), found


def test_gaussian_prior_sampling_is_bounded_for_any_condition() -> None:
    """z = μ + T·σ·ε with σ < e^c however large the kept half z1 is."""
    prior = perturb_parameters(GaussianPrior(C, 6, log_std_bound=BOUND), 1.0,
                               torch.Generator().manual_seed(0))
    unbounded = GaussianPrior(C, 6)
    unbounded.load_state_dict(prior.state_dict())
    prior.double()
    cond = _large((3, 6, H, W), 1).double()
    eps = torch.randn((3, C, H, W), generator=torch.Generator().manual_seed(2), dtype=cond.dtype)
    with torch.no_grad():
        z = prior.sample_from_noise(3, H, W, cond, 1.0, eps)
        mean, _ = prior.mean_and_log_std(z, cond)
        assert torch.isfinite(z).all()
        assert ((z - mean).abs() <= math.exp(BOUND) * eps.abs() * (1 + 1e-6)).all()
        assert not torch.isfinite(unbounded.sample_from_noise(3, H, W, cond.float(), 1.0,
                                                              eps.float())).all()


def test_mar_prior_sampling_is_finite_for_any_condition() -> None:
    """The mAR prior's log σ is a conv of the conv-LSTM's h ∈ (−1, 1): bounded by its weights."""
    prior = perturb_parameters(MARPrior(C, 6, 8, 2, 3, 1, 8, 2), 1.0,
                               torch.Generator().manual_seed(0))
    noise = _large((C, 3, 1, H, W), 2, 10.0)
    with torch.no_grad():
        z = prior.sample_from_noise(3, H, W, _large((3, 6, H, W), 1), 1.0, noise)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("name", ["attnflow_imap_tiny", "attnflow_imap_channel_tiny",
                                  "attnflow_itrans_tiny", "attnflow_imap_mixlog_tiny",
                                  "attnflow_itrans_cond_couplings_tiny"])
def test_tiny_presets_decode_large_latents_to_finite_images(name: str) -> None:
    """A whole model with random weights, every latent up to ±1e3: a finite image (the
    default bounds); also at T = 1 from its own priors."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = az.create_model(name, prior="gaussian").eval()
    perturb_parameters(model, 0.3, torch.Generator().manual_seed(1))
    y = 0 if model.config.num_classes else None
    latents = [_large((2, *shape), i) for i, shape in enumerate(model.latent_shapes)]
    with torch.no_grad():
        x = model.decode_latents(latents, y)
        samples = model.generate(4, 1.0, torch.Generator().manual_seed(2), y=y)
    assert torch.isfinite(x).all() and torch.isfinite(samples).all()
