"""Classifier-free guidance of a layer's parameters (SPEC §6, §7): the one mixing rule, and the
condition pair that layers and priors receive under guidance."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Guided(NamedTuple):
    """A condition under classifier-free guidance: the class's (``cond``), the null class's
    (``uncond``) and the weight w. A layer or prior that receives one computes its parameters
    θ_c from ``cond`` and θ_u from ``uncond`` on the same input and uses ``guide(θ_c, θ_u, w)``."""

    cond: Tensor
    uncond: Tensor
    weight: float


def guide(cond: Tensor | tuple[Tensor, ...], uncond: Tensor | tuple[Tensor, ...],
          weight: float) -> Tensor | tuple[Tensor, ...]:
    """Classifier-free guidance of parameters: θ = θ_c + w·(θ_c − θ_u), elementwise, for a
    tensor or a tuple of tensors (e.g. a prior's (μ, log σ) or a coupling's (shift, scale)
    computed once with the class and once with the null class). w = 0 returns ``cond`` itself
    (bit for bit the conditional parameters); w = −1 gives the unconditional ones."""
    if isinstance(cond, tuple):
        return tuple(guide(c, u, weight) for c, u in zip(cond, uncond, strict=True))
    if weight == 0:
        return cond
    return cond + weight * (cond - uncond)
