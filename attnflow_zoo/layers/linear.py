"""Invertible 1×1 convolution (Glow), LU-parameterised."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import InvertibleModule
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
        w = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        # The masks by index comparison, not tril / triu / eye: the same values, and a fraction
        # of the time on the meta device, where `attnflow models` builds every preset.
        row, col = torch.arange(c)[:, None], torch.arange(c)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", (row > col).float())
        self.register_buffer("eye", (row == col).float())
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.where(row < col, upper, 0.0).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

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
