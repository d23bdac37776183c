"""Residual flow layers y = x + g(x) (i-ResNet, Behrmann et al. 2019): the shared machinery.

A subclass implements only the branch ``g``. This base gives the Banach fixed-point inverse
(``inverse_with_info`` returns what it achieved; never silent when it fails), the
log-determinant estimators of ``attnflow_zoo.logdet_estimators`` and a power-iteration estimate
of ‖J_g‖₂.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import logdet_estimators
from ..core import InvertibleModule, randn_like_on
from ..errors import ConfigError

LOGDET_MODES = ("series", "roulette", "exact")


class InverseNotConvergedWarning(RuntimeWarning):
    """The fixed-point inverse of a residual layer stopped at its iteration limit."""


@dataclass(frozen=True)
class InverseInfo:
    """What one fixed-point inverse achieved (``ResidualLayer.inverse_with_info`` returns it).

    ``residual`` is max_i ‖x_t + g(x_t) − y‖_∞ at the last iterate checked (= ‖x_{t+1} − x_t‖_∞;
    the error of the returned x is at most L/(1 − L) times it when Lip(g) ≤ L < 1).
    """

    iterations: int
    residual: float
    converged: bool
    tol: float
    max_iter: int
    residual_per_sample: Tensor


class ResidualLayer(InvertibleModule):
    """y = x + g(x); inverse by x_{t+1} = y − g(x_t), x_0 = y; logdet = log det(I + J_g).

    Args:
        logdet: "series" (truncated power series + Hutchinson; biased, the original),
            "roulette" (unbiased Russian roulette, Chen et al. 2019) or "exact" (brute-force
            Jacobian: small inputs, tests).
        num_series_terms, num_probes: n and k of the estimators (the original: 5 and 1).
        num_exact_terms, stop_probability: the roulette's always-computed terms and p.
        inverse_max_iter, inverse_tol: the fixed-point iteration stops as soon as
            ‖x_{t+1} − x_t‖_∞ ≤ tol for every sample, or after max_iter iterations (with a
            ``InverseNotConvergedWarning``). ``inverse_tol`` is for float32 inputs; float64
            inputs use inverse_tol · 1e-6.
    """

    def __init__(self, *, logdet: str = "series", num_series_terms: int = 5,
                 num_probes: int = 1, num_exact_terms: int = 2, stop_probability: float = 0.5,
                 inverse_max_iter: int = 100, inverse_tol: float = 1e-6) -> None:
        super().__init__()
        if logdet not in LOGDET_MODES:
            raise ConfigError(f"logdet must be one of {', '.join(LOGDET_MODES)}, got {logdet!r}")
        self.logdet = logdet
        self.num_series_terms = num_series_terms
        self.num_probes = num_probes
        self.num_exact_terms = num_exact_terms
        self.stop_probability = stop_probability
        self.inverse_max_iter = inverse_max_iter
        self.inverse_tol = inverse_tol

    def branch(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        """g(x), same shape as x."""
        raise NotImplementedError

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Eval mode for the duration (spectral-norm vectors are not updated), then restored."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                count_generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x + g(x), log det(I + J_g)) with the configured estimator.

        ``generator`` draws the Hutchinson probes (None: the global RNG); ``count_generator``
        (CPU) draws the roulette's number of terms (default: ``cpu_twin(generator)``).
        """
        grad = torch.is_grad_enabled()
        if self.logdet == "exact":
            gx = self.branch(x)
            with self.frozen():
                logdet = logdet_estimators.exact_logdet(lambda v: v + self.branch(v), x,
                                                        create_graph=grad)
            return x + gx, logdet
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.branch(xg)
            if self.logdet == "series":
                logdet = logdet_estimators.power_series_logdet(
                    gx, xg, self.num_series_terms, self.num_probes, generator, grad)
            else:
                logdet = logdet_estimators.russian_roulette_logdet(
                    gx, xg, self.num_exact_terms, self.stop_probability, self.num_probes,
                    generator, grad, count_generator=count_generator)
        y = x + gx
        if not grad:
            y, logdet = y.detach(), logdet.detach()
        return y, logdet

    def residual(self, x: Tensor) -> Tensor:
        """y = x + g(x) without a log-determinant."""
        return x + self.branch(x)

    def inverse(self, z: Tensor, max_iter: int | None = None, tol: float | None = None,
                init: Tensor | None = None) -> Tensor:
        """x with x + g(x) = z by fixed-point iteration (``inverse_with_info`` without the
        record of what the iteration achieved)."""
        return self.inverse_with_info(z, max_iter, tol, init)[0]

    @torch.no_grad()
    def inverse_with_info(self, z: Tensor, max_iter: int | None = None,
                          tol: float | None = None, init: Tensor | None = None
                          ) -> tuple[Tensor, InverseInfo]:
        """(x, what the iteration achieved): x with x + g(x) = z by fixed-point iteration.

        Converges (geometrically, rate Lip(g)) whenever g is a contraction. A run that hits
        ``max_iter`` warns with the residual it reached. ``init`` replaces x_0 = z (e.g. to
        continue an earlier run).
        """
        max_iter = self.inverse_max_iter if max_iter is None else max_iter
        if tol is None:
            # inverse_tol is meant for float32; float64 inputs get a float64-sized tolerance.
            tol = self.inverse_tol * (1e-6 if z.dtype == torch.float64 else 1.0)
        x = z if init is None else init
        residual = torch.full((z.shape[0],), math.inf, device=z.device)
        iterations = 0
        with self.frozen():
            for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
                x_next = z - self.branch(x)
                residual = (x_next - x).abs().flatten(1).amax(1)
                x = x_next
                if bool((residual <= tol).all()):
                    break
        worst = float(residual.max()) if residual.numel() else 0.0
        converged = bool((residual <= tol).all())
        if not converged:
            warnings.warn(
                f"{type(self).__name__}: fixed-point inverse did not converge in {max_iter} "
                f"iterations (residual {worst:.3e} > tol {tol:.1e}); the branch is probably not "
                "a contraction on these inputs (check jacobian_norm) — the result is inaccurate",
                InverseNotConvergedWarning, stacklevel=2)
        return x, InverseInfo(iterations, worst, converged, tol, max_iter,
                              residual.detach().cpu())

    def jacobian_norm(self, x: Tensor, num_iterations: int = 20,
                      generator: torch.Generator | None = None) -> Tensor:
        """Per-sample ‖J_g(x_i)‖₂, shape (B,), by power iteration on J_gᵀ J_g.

        A lower estimate of the true norm that tightens with ``num_iterations``. The layer is
        evaluated in eval mode (spectral-norm vectors untouched).
        """
        x = x.detach()
        v = randn_like_on(tuple(x.shape), x, generator)
        view = (-1, *[1] * (x.dim() - 1))
        with self.frozen(), torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            gx = self.branch(xg)
            # J v by the double-VJP trick (w = Jᵀu is linear in u, so ∂(w·v)/∂u = J v): on CPU
            # much faster than forward-mode AD through this layer.
            u = torch.zeros_like(gx, requires_grad=True)
            (jt_u,) = torch.autograd.grad(gx, xg, u, create_graph=True)
            for _ in range(num_iterations + 1):
                v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)
                (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
                (v,) = torch.autograd.grad(gx, xg, jv, retain_graph=True)
        return jv.detach().flatten(1).norm(dim=1)
