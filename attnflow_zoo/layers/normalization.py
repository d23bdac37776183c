"""ActNorm (Glow, Kingma & Dhariwal 2018): z = (x + b) · exp(s), per channel."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core import DataDependentInit, InvertibleModule


class ActNorm(DataDependentInit, InvertibleModule):
    """z = (x + b) ⊙ exp(s), b, s ∈ R^C; logdet = H·W·Σ_c s_c.

    Data-dependent initialisation, run as an explicit pass (``core.initialize_from_data``; ``fit``
    does it on the first training batch): b = −mean, s = −log(std + eps), so that batch comes out
    with zero mean and unit variance per channel. Under ``torch.distributed`` the statistics are
    averaged over ranks, so every replica starts with the same parameters. Whether it is
    initialised is a persistent buffer: a reloaded model is never re-initialised. ``forward``
    itself never reads that buffer (no host synchronisation, no graph break).

    Shapes: x is B×C×H×W (or B×C).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))

    @staticmethod
    def _shape(x: Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Set b, s from the batch x so that it is normalised per channel."""
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
        if self._data_init_pending:
            self.data_init(x)
        shape = self._shape(x)
        z = (x + self.bias.view(shape)) * torch.exp(self.log_scale.view(shape))
        pixels = x[0, 0].numel()
        logdet = (self.log_scale.sum() * pixels).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        shape = self._shape(z)
        return z * torch.exp(-self.log_scale.view(shape)) - self.bias.view(shape)


class ActNormNoLogdet(ActNorm):
    """ActNorm used as a plain normalisation inside a conditioner (its logdet is not part of the
    flow's): x -> (x + b) ⊙ exp(s)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]
