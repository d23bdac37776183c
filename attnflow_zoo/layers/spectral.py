"""Soft spectral normalisation of convolutions (i-ResNet, Behrmann et al. 2019, arXiv 1811.00995).

W ← W / max(1, σ̂(W) / c): the weight is only shrunk when its estimated spectral norm σ̂ exceeds
the target c. σ̂ = uᵀ A v comes from power iteration on the layer's linear operator A, whose
vectors u, v are buffers updated in training mode only (as in ``torch.nn.utils.spectral_norm``
and the Zha et al. / i-ResNet code). ``SoftSpectralNorm`` is the one power iteration; the
convolutions say only what A and Aᵀ are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _normalize(x: Tensor) -> Tensor:
    if x.is_meta:  # no values to scale (a norm on meta imports torch._dynamo on first use)
        return x
    return x / x.norm().clamp_min(1e-12)


class SoftSpectralNorm(nn.Module):
    """Base: a weight W with effective weight W̃ = W / max(1, σ̂(W)/c), σ̂ by power iteration.

    Subclasses set ``weight`` and the buffers ``u`` (output-shaped) and ``v`` (input-shaped),
    implement ``_operator(w, v) = A_w v`` and ``_operator_t(w, u) = A_wᵀ u``, and call
    ``_start_power_iteration()`` at the end of ``__init__``.
    """

    weight: nn.Parameter
    u: Tensor
    v: Tensor

    def __init__(self, coeff: float, num_power_iterations: int) -> None:
        super().__init__()
        self.coeff = coeff
        self.num_power_iterations = num_power_iterations

    def _operator(self, w: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _operator_t(self, w: Tensor, u: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _start_power_iteration(self) -> None:
        # Start from converged vectors so a fresh model in eval mode has a sensible σ̂.
        if self.weight.device.type != "meta":
            self._power_iteration(self.num_power_iterations)

    @torch.no_grad()
    def _power_iteration(self, steps: int) -> None:
        w = self.weight.detach()
        for _ in range(steps):
            self.v.copy_(_normalize(self._operator_t(w, self.u)))
            self.u.copy_(_normalize(self._operator(w, self.v)))

    def effective_weight(self) -> Tensor:
        """W̃ = W / max(1, σ̂/c); runs the power iteration first in training mode."""
        if self.training:
            self._power_iteration(self.num_power_iterations)
        sigma = (self.u * self._operator(self.weight, self.v)).sum()
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)


class SNConv1x1(SoftSpectralNorm):
    """1×1 convolution y = W̃ x + b with W̃ = W / max(1, σ̂(W)/c), W ∈ R^{out×in}.

    σ̂ is the matrix spectral norm from ``num_power_iterations`` power iterations (5 in the
    original). ``exact_norm()`` gives the exact ‖W̃‖₂ (an SVD; cheap for the small matrices of an
    attention layer) where a certified bound is needed: σ̂ is a lower estimate of σ.

    Shapes: x is B×in×H×W (or B×in×N), y is B×out×H×W (B×out×N).
    """

    def __init__(self, in_channels: int, out_channels: int, coeff: float = 0.9,
                 bias: bool = True, num_power_iterations: int = 5) -> None:
        super().__init__(coeff, num_power_iterations)
        conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)  # PyTorch's default init
        self.weight = nn.Parameter(conv.weight.detach().reshape(out_channels, in_channels))
        self.bias = nn.Parameter(conv.bias.detach()) if bias else None
        self.register_buffer("u", _normalize(torch.randn(out_channels)))
        self.register_buffer("v", _normalize(torch.randn(in_channels)))
        self._start_power_iteration()

    def _operator(self, w: Tensor, v: Tensor) -> Tensor:
        return w @ v

    def _operator_t(self, w: Tensor, u: Tensor) -> Tensor:
        return w.t() @ u

    def exact_norm(self, weight: Tensor | None = None) -> Tensor:
        """‖W̃‖₂, exactly (largest singular value), differentiable."""
        w = self.effective_weight() if weight is None else weight
        return torch.linalg.matrix_norm(w, ord=2)

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        w = self.effective_weight() if weight is None else weight
        if x.dim() == 3:  # B×C×N: a batched matmul (much faster than conv1d's double backward)
            y = torch.matmul(w, x)
            return y if self.bias is None else y + self.bias.unsqueeze(1)
        return F.conv2d(x, w[:, :, None, None], self.bias)


class SNConv2d(SoftSpectralNorm):
    """k×k convolution with soft spectral normalisation of the convolution *operator*.

    σ̂ is the operator norm of x ↦ conv(x, W) on inputs of shape in×H×W (zero padding), estimated
    by power iteration with conv2d / conv_transpose2d (i-ResNet's ``spectral_norm_conv``). The
    estimate depends on H×W, which is why the spatial size is a constructor argument.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 input_size: tuple[int, int], coeff: float = 0.9,
                 num_power_iterations: int = 5) -> None:
        super().__init__(coeff, num_power_iterations)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.weight = nn.Parameter(conv.weight.detach())
        self.bias = nn.Parameter(conv.bias.detach())
        self.padding = kernel_size // 2
        h, w = input_size
        self.register_buffer("u", _normalize(torch.randn(1, out_channels, h, w)))
        self.register_buffer("v", _normalize(torch.randn(1, in_channels, h, w)))
        self._start_power_iteration()

    def _operator(self, w: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(v, w, padding=self.padding)

    def _operator_t(self, w: Tensor, u: Tensor) -> Tensor:
        return F.conv_transpose2d(u, w, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding)
