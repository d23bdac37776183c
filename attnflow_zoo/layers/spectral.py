"""Soft spectral normalisation of convolutions (i-ResNet, Behrmann et al. 2019, arXiv 1811.00995).

W ← W / max(1, σ̂(W) / c): the weight is only shrunk when its estimated spectral norm σ̂ exceeds
the target c. σ̂ = uᵀ W v comes from power iteration whose vectors u, v are buffers updated in
training mode only (as in ``torch.nn.utils.spectral_norm`` and the Zha et al. / i-ResNet code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm().clamp_min(1e-12)


class SNConv1x1(nn.Module):
    """1×1 convolution y = W̃ x + b with W̃ = W / max(1, σ̂(W)/c), W ∈ R^{out×in}.

    σ̂ is the matrix spectral norm from ``num_power_iterations`` power iterations (5 in the
    original). ``exact_norm()`` gives the exact ‖W̃‖₂ (an SVD; cheap for the small matrices of an
    attention layer) where a certified bound is needed: σ̂ is a lower estimate of σ.

    Shapes: x is B×in×H×W (or B×in×N), y is B×out×H×W (B×out×N).
    """

    def __init__(self, in_channels: int, out_channels: int, coeff: float = 0.9,
                 bias: bool = True, num_power_iterations: int = 5) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)  # PyTorch's default init
        self.weight = nn.Parameter(conv.weight.detach().reshape(out_channels, in_channels))
        self.bias = nn.Parameter(conv.bias.detach()) if bias else None
        self.coeff = coeff
        self.num_power_iterations = num_power_iterations
        self.register_buffer("u", _normalize(torch.randn(out_channels)))
        self.register_buffer("v", _normalize(torch.randn(in_channels)))
        # Start from converged vectors so a fresh model in eval mode has a sensible σ̂.
        if self.weight.device.type != "meta":
            self._power_iteration(self.num_power_iterations)

    @torch.no_grad()
    def _power_iteration(self, steps: int) -> None:
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(steps):
            v.copy_(_normalize(w.t() @ u))
            u.copy_(_normalize(w @ v))

    def effective_weight(self) -> Tensor:
        """W̃ = W / max(1, σ̂/c), out×in; runs the power iteration first in training mode."""
        if self.training:
            self._power_iteration(self.num_power_iterations)
        sigma = torch.dot(self.u, self.weight @ self.v)
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

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


class SNConv2d(nn.Module):
    """k×k convolution with soft spectral normalisation of the convolution *operator*.

    σ̂ is the operator norm of x ↦ conv(x, W) on inputs of shape in×H×W (zero padding), estimated
    by power iteration with conv2d / conv_transpose2d (i-ResNet's ``spectral_norm_conv``). The
    estimate depends on H×W, which is why the spatial size is a constructor argument.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 input_size: tuple[int, int], coeff: float = 0.9,
                 num_power_iterations: int = 5) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.weight = nn.Parameter(conv.weight.detach())
        self.bias = nn.Parameter(conv.bias.detach())
        self.padding = kernel_size // 2
        self.coeff = coeff
        self.num_power_iterations = num_power_iterations
        h, w = input_size
        self.register_buffer("u", _normalize(torch.randn(1, out_channels, h, w)))
        self.register_buffer("v", _normalize(torch.randn(1, in_channels, h, w)))
        if self.weight.device.type != "meta":
            self._power_iteration(self.num_power_iterations)

    @torch.no_grad()
    def _power_iteration(self, steps: int) -> None:
        w = self.weight.detach()
        for _ in range(steps):
            self.v.copy_(_normalize(F.conv_transpose2d(self.u, w, padding=self.padding)))
            self.u.copy_(_normalize(F.conv2d(self.v, w, padding=self.padding)))

    def effective_weight(self) -> Tensor:
        """W̃ = W / max(1, σ̂/c); runs the power iteration first in training mode."""
        if self.training:
            self._power_iteration(self.num_power_iterations)
        sigma = (self.u * F.conv2d(self.v, self.weight, padding=self.padding)).sum()
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding)
