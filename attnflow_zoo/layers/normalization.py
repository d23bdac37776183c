"""ActNorm (Glow, Kingma & Dhariwal 2018): z = (x + b) · exp(s), per channel."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core import InvertibleModule


class ActNorm(InvertibleModule):
    """z = (x + b) ⊙ exp(s), b, s ∈ R^C; logdet = H·W·Σ_c s_c.

    Data-dependent initialisation on the first training batch: b = −mean, s = −log(std + eps),
    so the first batch comes out with zero mean and unit variance per channel. Under
    ``torch.distributed`` the statistics are averaged over ranks, so every replica starts with
    the same parameters. Whether it is initialised is a persistent buffer: a reloaded model
    never re-initialises.

    Shapes: x is B×C×H×W (or B×C).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))

    def _shape(self, x: Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        sq = x.pow(2).mean(dims)
        if dist.is_available() and dist.is_initialized():
            stats = torch.stack([mean, sq])
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
            mean, sq = stats[0], stats[1]
        std = (sq - mean.pow(2)).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        shape = self._shape(x)
        z = (x + self.bias.view(shape)) * torch.exp(self.log_scale.view(shape))
        pixels = x[0, 0].numel()
        logdet = (self.log_scale.sum() * pixels).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        shape = self._shape(z)
        return z * torch.exp(-self.log_scale.view(shape)) - self.bias.view(shape)
