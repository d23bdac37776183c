"""Class conditioning of a multi-scale flow: a learned class embedding, and what the priors and
the couplings receive from it.

A class-conditional ``AttnFlow`` models p(x | y) = p(z | y) · |det ∂z/∂x| with

- every prior conditioned on e_y: the prior of level l sees cond_l = [z1_l, E_y] (the kept half
  and the embedding broadcast over the level's H×W as E extra channels; E_y alone at the last
  level, which has no kept half). The mAR prior's input is Conv_in([z_{c−1}, emb(cond_l)]) and
  the Gaussian prior's (μ, log σ) = ZeroConv(cond_l), so y enters the mAR prior's input and the
  Gaussian prior's parameters through the conditioning path they already have;
- optionally (``condition_couplings``) every affine coupling's conditioner, NN([x_a, E_y]).

Only the couplings make the flow's map depend on y; with priors-only conditioning,
log|det ∂z/∂x| is the same for every y. For each y the map x -> z is a bijection, so p(· | y)
is a density whenever each prior factor p(z_l | cond_l) is one (a product of normalised
Gaussians, autoregressive over channels for the mAR prior).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassEmbedding(nn.Module):
    """e_y ∈ R^E, one learned vector per class (``nn.Embedding``, N(0, 1) init).

    Args:
        num_classes: K; labels are integers 0..K−1.
        channels: E.

    Shapes: y (B,) int64 -> B×E.
    """

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_classes, channels)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


def prior_condition(kept: Tensor | None, context: Tensor | None, height: int, width: int
                    ) -> Tensor | None:
    """What a level's prior is conditioned on: [kept, E_y] along channels (E_y = the B×E
    context broadcast over height×width), ``kept`` alone without a context, E_y alone without a
    kept half (the last level), None without either."""
    if context is None:
        return kept
    maps = context[:, :, None, None].expand(-1, -1, height, width)
    return maps if kept is None else torch.cat([kept, maps.to(kept.dtype)], 1)


def balanced_labels(num_samples: int, num_classes: int) -> Tensor:
    """y_i = i mod K, (num_samples,) int64: every class in turn (what ``sample`` draws for a
    class-conditional model when no labels are given)."""
    return torch.arange(num_samples) % num_classes
