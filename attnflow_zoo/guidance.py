"""Classifier-free guidance of a layer's parameters (SPEC §6, §7): the one mixing rule, used
by the class-conditional priors and couplings and by TarFlow's blocks."""

from __future__ import annotations

from torch import Tensor


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
