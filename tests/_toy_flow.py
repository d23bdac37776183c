"""A small Glow-style FlowModel for the Hub, training and CLI tests.

It stands in for the zoo's architectures only where a test needs *some* registered zoo class
(strict loading, push, sample); the architectures themselves are tested with their own presets.
It is deliberately not a registered preset (other tests parametrise over the registry);
``load_model`` finds it by class name, as it finds any ``ZooHubMixin`` subclass that was imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnflow_zoo.core import FlowSequential, diag_normal_logpdf
from attnflow_zoo.layers.coupling import AffineCoupling
from attnflow_zoo.layers.linear import InvConv1x1
from attnflow_zoo.layers.normalization import ActNorm
from attnflow_zoo.layers.reshape import Squeeze
from attnflow_zoo.models.base import FlowModel


@dataclass(frozen=True)
class ToyFlowConfig:
    image_size: int = 8
    in_channels: int = 1
    num_steps: int = 2
    hidden_channels: int = 8
    levels: tuple[int, ...] = (1,)


class ToyFlow(FlowModel):
    """z = f(x) with f = (ActNorm → InvConv1x1 → AffineCoupling)^K ∘ Squeeze; N(0, I) prior."""

    def __init__(self, config: ToyFlowConfig, *, preset: str | None = None) -> None:
        super().__init__(config, preset=preset)
        c = config.in_channels * 4
        g = torch.Generator().manual_seed(0)
        steps = []
        # nn.Conv2d initialises from the global RNG: fork it so every ToyFlow starts the same
        # (the exact-resume test compares two independently built models).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(config.num_steps):
                steps += [ActNorm(c), InvConv1x1(c, generator=g),
                          AffineCoupling(c, config.hidden_channels)]
        self.flow = FlowSequential(Squeeze(2), *steps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(x)

    def inverse(self, z: Tensor) -> Tensor:
        return self.flow.inverse(z)

    def log_density(self, x: Tensor, y: Tensor | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        self.check_labels(y, x.shape[0])
        z, logdet = self.flow(x)
        return diag_normal_logpdf(z) + logdet

    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        c, h, w = self.input_shape
        z = torch.randn(num_samples, c * 4, h // 2, w // 2, generator=generator,
                        device=generator.device if generator is not None else self.device)
        return self.flow.inverse(z.to(self.device) * temperature).clamp(-0.5, 0.5 - 1e-6)


class OtherFlow(ToyFlow):
    """The same maths under another architecture name (for the wrong-architecture test)."""
