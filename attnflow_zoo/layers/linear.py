"""Invertible 1×1 convolution (Glow), LU-parameterised."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import InvertibleModule, on_build_device
from ..precision import full_precision


class InvConv1x1(InvertibleModule):
    """z[:, :, i, j] = W x[:, :, i, j] with W = P L (U + diag(sign · exp(log|s|))).

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular; initialised
    from the LU of a random rotation. logdet = H·W·Σ log|s| (Kingma & Dhariwal 2018, §3.2).
    The inverse uses two triangular solves on the model's device (no CPU round trip).

    Args:
        num_channels: C.
        generator: optional RNG for the random rotation at init.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        c = num_channels
        # The initial factors are computed on the CPU in float64 (``on_build_device``).
        cpu = {"device": "cpu"}
        rand = torch.randn(c, c, generator=generator, dtype=torch.float64, **cpu)
        p, lower, upper = torch.linalg.lu(torch.linalg.qr(rand)[0])
        s = torch.diagonal(upper)
        row, col = torch.arange(c, **cpu)[:, None], torch.arange(c, **cpu)
        self.register_buffer("perm", on_build_device(p.float()))
        self.register_buffer("sign_s", on_build_device(torch.sign(s).float()))
        self.register_buffer("lower_mask", on_build_device((row > col).float()))
        self.register_buffer("eye", on_build_device((row == col).float()))
        self.lower = nn.Parameter(on_build_device(lower.float()))
        self.upper = nn.Parameter(on_build_device(torch.where(row < col, upper, 0.0).float()))
        self.log_s = nn.Parameter(on_build_device(torch.log(torch.abs(s)).float()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with full_precision(x):  # data path and LU product in float32, also under autocast
            w = self.weight()
            z = F.conv2d(x, w.view(*w.shape, 1, 1))
        logdet = (self.log_s.sum() * (x.shape[2] * x.shape[3])).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        with full_precision(z):
            lower, upper = self._factors()
            # W⁻¹ = U⁻¹ L⁻¹ Pᵀ, by triangular solves against the identity (exact, on device).
            l_inv = torch.linalg.solve_triangular(lower, self.eye, upper=False,
                                                  unitriangular=True)
            w_inv = torch.linalg.solve_triangular(upper, l_inv @ self.perm.T, upper=True)
            return F.conv2d(z, w_inv.view(*w_inv.shape, 1, 1))
