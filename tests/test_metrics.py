"""bits/dim: the one rule, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from attnflow_zoo import FlowModel, FlowSequential, bits_per_dim
from attnflow_zoo.core import diag_normal_logpdf
from attnflow_zoo.data.quantize import dequantize, quantize
from attnflow_zoo.testing import gaussian_bits_per_dim


class _UniformModel(FlowModel):
    """Density 1 on [0, 1)^D: the flow is the identity and log p = 0 everywhere."""

    def __init__(self) -> None:
        super().__init__({"image_size": 4, "in_channels": 3})
        self.flow = FlowSequential()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, 4, 4)

    def forward(self, x):
        return self.flow(x)

    def log_density(self, x, y=None, generator=None):
        inside = ((x >= -0.5) & (x < 0.5)).flatten(1).all(1)
        return torch.where(inside, 0.0, -math.inf).to(x.dtype)


class _GaussianModel(_UniformModel):
    """Identity flow with a N(0, I) density on x̃ = x + 0.5."""

    def log_density(self, x, y=None, generator=None):
        return diag_normal_logpdf(x + 0.5)


def test_uniform_density_scores_exactly_eight(gen: torch.Generator) -> None:
    x_u8 = torch.randint(0, 256, (7, 3, 4, 4), generator=gen, dtype=torch.uint8)
    bpd = _UniformModel().bits_per_dim(x_u8, generator=gen)
    assert bpd.shape == (7,)
    assert torch.equal(bpd, torch.full((7,), 8.0))


def test_standard_normal_closed_form(gen: torch.Generator) -> None:
    x_u8 = torch.randint(0, 256, (5, 3, 4, 4), generator=gen, dtype=torch.uint8)
    g1 = torch.Generator().manual_seed(3)
    bpd = _GaussianModel().bits_per_dim(x_u8, generator=g1).mean().item()
    x_tilde = dequantize(x_u8, generator=torch.Generator().manual_seed(3))
    assert math.isclose(bpd, gaussian_bits_per_dim(x_tilde), rel_tol=1e-6)
    # independently: torch.distributions' N(0, 1) density, nats -> bits, plus 8 bits of 1/256 bins
    d = 48
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(x_tilde).flatten(1).sum(1)
    expected = (8.0 - log_p / (d * math.log(2))).mean().item()
    assert math.isclose(bpd, expected, rel_tol=1e-6)


def test_bits_per_dim_formula() -> None:
    d = 3072
    lp = torch.tensor([0.0, -d * math.log(2.0)])  # uniform, and uniform ÷ 2 per dim
    assert torch.allclose(bits_per_dim(lp, d), torch.tensor([8.0, 9.0]))


def test_dequantize_stays_in_its_bin(gen: torch.Generator) -> None:
    x_u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = dequantize(x_u8, generator=gen)
    assert (x >= 0).all() and (x < 1).all()
    assert torch.equal(quantize(x), x_u8)


@pytest.mark.parametrize("name", ["attnflow_imap_tiny", "resflow_dot_tiny"])
def test_scores_keep_no_autograd_graph_unless_asked(name: str) -> None:
    """log_prob / bits_per_dim of uint8 images are scores: no graph (scoring 512 images kept
    ~2× the memory with one). Training's objective, log_density, stays differentiable."""
    import attnflow_zoo as az

    model = az.create_model(name)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (4, *model.input_shape), generator=g, dtype=torch.uint8)
    assert not model.log_prob(x_u8, generator=g).requires_grad
    assert not model.bits_per_dim(x_u8, generator=g).requires_grad
    asked = model.bits_per_dim(x_u8, generator=g, grad=True)
    assert asked.requires_grad
    asked.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.log_density(model.to_model_space(x_u8, g)).requires_grad
