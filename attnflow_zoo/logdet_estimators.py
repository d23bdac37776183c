"""Estimators of log det(I + J_g) for residual flows y = x + g(x).

- ``power_series_logdet``: the truncated series Σ_{k=1..n} (−1)^{k+1}/k · vᵀ J_g^k v with
  Hutchinson probes v ~ N(0, I) (i-ResNet, Behrmann et al. 2019; biased by the truncation).
- ``russian_roulette_logdet``: the unbiased estimator of Residual Flows (Chen et al. 2019,
  arXiv 1906.02735): a random number of terms N, each term reweighted by 1 / P(N ≥ k).
- ``exact_logdet``: the brute-force value from the full per-sample Jacobian (small inputs only).

All take the branch output ``gx = g(x)`` built with autograd from ``x`` and return a per-sample
(B,) tensor in nats. The series converge when ‖J_g‖₂ < 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .core import randn_like_on


def _series(gx: Tensor, x: Tensor, weights: list[float], num_probes: int,
            generator: torch.Generator | None, create_graph: bool,
            probes: Tensor | None = None) -> Tensor:
    """Σ_k weights[k−1] · vᵀ J^k v, averaged over probes; wᵀ ← wᵀ J by vector-Jacobian products."""
    total = x.new_zeros(x.shape[0])
    if probes is None:
        probes = randn_like_on((num_probes, *x.shape), x, generator)
    num_probes = probes.shape[0]
    for v in probes:
        w = v
        for weight in weights:
            (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph)
            total = total + weight * (w * v).flatten(1).sum(1)
    return total / num_probes


def power_series_logdet(gx: Tensor, x: Tensor, num_terms: int = 5, num_probes: int = 1,
                        generator: torch.Generator | None = None,
                        create_graph: bool | None = None, probes: Tensor | None = None
                        ) -> Tensor:
    """log det(I + J_g) ≈ Σ_{k=1..n} (−1)^{k+1}/k · vᵀ J_g^k v, v ~ N(0, I); shape (B,).

    Args:
        gx: g(x), built from ``x`` with autograd (x.requires_grad).
        x: the input, B×…
        num_terms: n (the original uses 5); num_probes: Hutchinson probes (the original uses 1).
        create_graph: keep the graph so the estimate can be back-propagated (default: whether
            grad mode is on).
        probes: optional K×B×… probe vectors with E[v vᵀ] = I, instead of K Gaussian draws
            (e.g. √D times the standard basis, which makes the trace exact).
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    weights = [(-1.0) ** (k + 1) / k for k in range(1, num_terms + 1)]
    return _series(gx, x, weights, num_probes, generator, create_graph, probes)


def roulette_num_terms(num_exact_terms: int, stop_probability: float,
                       generator: torch.Generator | None = None) -> int:
    """N = ``num_exact_terms`` + G, G ~ Geometric(p) on {0, 1, …}: P(G ≥ m) = (1 − p)^m.

    The count decides how many terms run, a host-side decision: it is drawn on the CPU
    (``generator`` must be a CPU generator, or None for the global CPU RNG), so no device value
    is ever read back (no ``.item()`` on a CUDA tensor in a training step).
    """
    if not 0.0 < stop_probability < 1.0:
        raise ValueError("stop_probability must lie in (0, 1)")
    u = float(torch.rand((), generator=generator))
    extra = 0  # inverse-CDF sample of the geometric count
    while u < (1.0 - stop_probability) ** (extra + 1):
        extra += 1
    return max(1, num_exact_terms + extra)


def cpu_twin(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for host-side draws that follows ``generator`` deterministically: the
    generator itself on the CPU, else one seeded from its (host-known) initial seed."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def russian_roulette_logdet(gx: Tensor, x: Tensor, num_exact_terms: int = 2,
                            stop_probability: float = 0.5, num_probes: int = 1,
                            generator: torch.Generator | None = None,
                            create_graph: bool | None = None, probes: Tensor | None = None,
                            count_generator: torch.Generator | None = None) -> Tensor:
    """Unbiased log det(I + J_g) = E[Σ_{k=1..N} (−1)^{k+1}/k · vᵀ J^k v / P(N ≥ k)]; shape (B,).

    N = ``num_exact_terms`` + G with G ~ Geometric(p) on {0, 1, …}, so P(N ≥ k) = 1 for
    k ≤ num_exact_terms and (1 − p)^{k − num_exact_terms} beyond (Chen et al. 2019). One N is
    drawn per call (``roulette_num_terms``, from ``count_generator``, default
    ``cpu_twin(generator)``) and shared by the batch; the probes come from ``generator``.
    Unbiased whenever the series converges (‖J_g‖ < 1); its variance is finite when
    ‖J_g‖² < 1 − p. ``probes`` as in ``power_series_logdet``.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    if count_generator is None:
        count_generator = cpu_twin(generator)
    num_terms = roulette_num_terms(num_exact_terms, stop_probability, count_generator)
    weights = []
    for k in range(1, num_terms + 1):
        tail = (1.0 - stop_probability) ** max(0, k - num_exact_terms)
        weights.append((-1.0) ** (k + 1) / k / tail)
    return _series(gx, x, weights, num_probes, generator, create_graph, probes)


def exact_logdet(fn: Callable[[Tensor], Tensor], x: Tensor,
                 create_graph: bool | None = None) -> Tensor:
    """Brute force log|det ∂fn(x_i)/∂x_i| per sample from the full Jacobian; shape (B,).

    ``fn`` maps a batch to a batch of the same shape, independently per sample. Costs one
    D×D Jacobian per sample (D = C·H·W): for tests and small inputs.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def f(v: Tensor, shape: torch.Size = xi.shape) -> Tensor:
            return fn(v.reshape(shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(f, xi.reshape(-1), create_graph=create_graph,
                                                 vectorize=True)
        if jac.shape[0] != jac.shape[1]:
            raise ValueError(f"the Jacobian is not square: {tuple(jac.shape)}")
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)
