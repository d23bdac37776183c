"""Correctness checks shared by the tests, the benchmarks and ``attnflow validate``.

Every invertible layer and model in the zoo is checked with these: round trip, the per-sample
log-determinant against a brute-force Jacobian in float64, batch independence, and gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .core import diag_normal_logpdf
from .logdet_estimators import exact_logdet


def _as_tensor(z: object) -> Tensor:
    if isinstance(z, Tensor):
        return z
    raise TypeError(f"forward must return a tensor latent, got {type(z).__name__}")


@torch.no_grad()
def check_invertible(flow: nn.Module, x: Tensor, atol: float | None = None) -> float:
    """Assert inverse(forward(x)) ≈ x and that inverse leaves its input untouched.

    Returns the max absolute round-trip error. ``atol`` defaults to 1e-10 in float64 and
    1e-5 in float32.
    """
    if atol is None:
        atol = 1e-10 if x.dtype == torch.float64 else 1e-5
    z, logdet = flow(x)
    z = _as_tensor(z)
    if logdet.shape != (x.shape[0],):
        raise AssertionError(f"logdet must have shape (B,) = ({x.shape[0]},), got {logdet.shape}")
    z_copy = z.clone()
    x_rec = flow.inverse(z)
    if not torch.equal(z, z_copy):
        raise AssertionError("inverse wrote into its input")
    err = (x_rec - x).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"round-trip error {err:.3e} exceeds {atol:.1e}")
    return err


def brute_force_logdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Per-sample log|det ∂fn(x_i)/∂x_i| from the full Jacobian, shape (B,), no graph.

    ``fn`` maps a batch of one sample to its latent; each sample's Jacobian is computed alone
    (``logdet_estimators.exact_logdet``, which the residual layers' exact mode also uses).
    """
    return exact_logdet(lambda v: _as_tensor(fn(v)), x, create_graph=False)


def check_logdet(flow: nn.Module, x: Tensor, rtol: float = 1e-8, atol: float = 1e-8) -> Tensor:
    """Assert the flow's per-sample logdet equals the brute-force log|det J| (use float64).

    The flow should be in eval mode (its logdet must not depend on the rest of the batch).
    Returns the brute-force values.
    """
    _, logdet = flow(x)
    ref = brute_force_logdet(lambda v: flow(v)[0], x)
    if logdet.shape != ref.shape:
        raise AssertionError(f"logdet shape {tuple(logdet.shape)} != per-sample {tuple(ref.shape)}")
    if not torch.allclose(logdet.detach(), ref, rtol=rtol, atol=atol):
        diff = (logdet.detach() - ref).abs().max().item()
        raise AssertionError(f"logdet differs from brute force by {diff:.3e}:\n"
                             f"  layer: {logdet.detach().tolist()}\n  brute: {ref.tolist()}")
    return ref


@torch.no_grad()
def check_batch_independence(flow: nn.Module, x: Tensor, atol: float = 1e-10) -> None:
    """Assert each sample's (z, logdet) is the same alone as inside the batch (eval mode)."""
    z, logdet = flow(x)
    for i in range(x.shape[0]):
        zi, ldi = flow(x[i : i + 1])
        if not torch.allclose(_as_tensor(zi), z[i : i + 1], atol=atol, rtol=0):
            raise AssertionError(f"sample {i}: z depends on the rest of the batch")
        if not torch.allclose(ldi, logdet[i : i + 1], atol=atol, rtol=0):
            raise AssertionError(f"sample {i}: logdet depends on the rest of the batch")


def perturb_parameters(module: nn.Module, scale: float = 0.05,
                       generator: torch.Generator | None = None) -> nn.Module:
    """Add N(0, scale²) noise to every parameter in place, so no test runs only at the
    (often degenerate, zero-initialised) starting point. Returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.add_(scale * noise.to(p.device))
    return module


def check_gradients(flow: nn.Module, x: Tensor,
                    nll: Callable[[nn.Module, Tensor], Tensor] | None = None) -> None:
    """Assert −log p reaches every parameter with a finite, non-zero gradient.

    By default −log p = −(log N(z; 0, I) + logdet), averaged over the batch. The check runs on
    a deep copy whose parameters are perturbed away from their (possibly zero) initial values.
    """
    flow = perturb_parameters(copy.deepcopy(flow), generator=torch.Generator().manual_seed(0))
    flow.zero_grad(set_to_none=True)
    if nll is None:
        z, logdet = flow(x)
        loss = -(diag_normal_logpdf(_as_tensor(z)) + logdet).mean()
    else:
        loss = nll(flow, x)
    loss.backward()
    for name, p in flow.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            raise AssertionError(f"parameter {name} receives no gradient")
        if not torch.isfinite(p.grad).all():
            raise AssertionError(f"parameter {name} has a non-finite gradient")
        if p.grad.abs().max().item() == 0.0:
            raise AssertionError(f"parameter {name} has an all-zero gradient")


def gaussian_bits_per_dim(x: Tensor) -> float:
    """Closed-form bpd of data x̃ under an identity flow with a N(0, I) prior (for tests)."""
    d = x[0].numel()
    log_p = (-0.5 * x.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    return float(((-log_p + d * math.log(256)) / (d * math.log(2))).mean())
