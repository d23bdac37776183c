"""AttnFlow's per-level latent API (``LatentsMixin``, a mixin of ``AttnFlow``): every level's
latent, the priors' teacher-forced parameters of given latents, and unwhitening, all through the
flow's one descent (``AttnFlow._descend``)."""

from __future__ import annotations

from torch import Tensor

from ..errors import ShapeError
from .conditioning import Shift


class LatentsMixin:
    """Needs ``levels``, ``priors``, ``latent_shapes``, ``encode``, ``decode``, ``_descend`` and
    ``conditions`` (``ClassConditionalFlow``)."""

    def encode_latents(self, x: Tensor, y: Tensor | int | None = None) -> list[Tensor]:
        """x -> every latent of the flow, one tensor per level in level order
        [z2_1, …, z2_{L−1}, z_L] (the factored-out halves, then the last level's output), of
        shapes B×``latent_shapes[l]``; ``decode_latents`` inverts it. The flattened
        concatenation is ``forward``'s z."""
        return [z for z, _, _ in self.encode(x, y)[0]]

    def decode_latents(self, latents: list[Tensor], y: Tensor | int | None = None) -> Tensor:
        """``encode_latents``' per-level latents -> x (B×C×H×W)."""
        return self.decode(latents, y)

    def latent_priors(self, latents: list[Tensor], y: Tensor | int | None = None
                      ) -> list[tuple[Tensor, Tensor]]:
        """Per level, the prior's teacher-forced (μ_l, log σ_l) of ``encode_latents``' latents,
        each B×``latent_shapes[l]``: level l's prior sees the kept half rebuilt from the coarser
        levels' latents (and e_y, the class's shift), the mAR prior z_l's earlier channels."""
        self._check_latents(latents)
        params: dict[int, tuple[Tensor, Tensor]] = {}

        def teacher_forced(lvl: int, cond: Tensor | None, shift: Shift) -> Tensor:
            params[lvl] = self.priors[lvl].mean_and_log_std(latents[lvl], cond, shift)
            return latents[lvl]

        self._descend(teacher_forced, self.conditions(y, len(latents[-1])))
        return [params[lvl] for lvl in range(len(self.levels))]

    def unwhiten_latents(self, eps: list[Tensor], y: Tensor | int | None = None
                         ) -> list[Tensor]:
        """Whitened latents ε_l (``evaluation.latents.whiten``) -> the latents z_l, deepest
        level first: z_l = μ_l + σ_l·ε_l, with μ_l, σ_l from the kept half that the deeper
        levels decode to (and, for the mAR prior, channel by channel: ``MARPrior.unwhiten``)."""
        self._check_latents(eps)
        latents: dict[int, Tensor] = {}

        def from_noise(lvl: int, cond: Tensor | None, shift: Shift) -> Tensor:
            latents[lvl] = self.priors[lvl].unwhiten(eps[lvl], cond, shift)
            return latents[lvl]

        self._descend(from_noise, self.conditions(y, len(eps[-1])))
        return [latents[lvl] for lvl in range(len(self.levels))]

    def _check_latents(self, latents: list[Tensor]) -> None:
        if len(latents) != len(self.levels) or any(
                tuple(z.shape[1:]) != s for z, s in zip(latents, self.latent_shapes, strict=False)):
            raise ShapeError(f"expected {len(self.levels)} latents of shapes B×C×H×W with (C, H, "
                             f"W) = {self.latent_shapes}, got {[tuple(z.shape) for z in latents]}")
