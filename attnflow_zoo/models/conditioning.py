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

from ..guidance import guide  # noqa: F401 - the guidance rule, used with the null class


class ClassEmbedding(nn.Module):
    """e_y ∈ R^E, one learned vector per class (``nn.Embedding``, N(0, 1) init), and with
    ``null_class`` one more learned row, index K, the "no class" embedding of classifier-free
    guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022): a model trained with
    labels dropped to K (``drop_labels``) learns p(x | y) and p(x) = p(x | ∅) in one network.

    Without ``null_class`` the table is exactly the K-row table of before (same parameter name,
    shape and initial draws), so older checkpoints load unchanged.

    Args:
        num_classes: K; labels are integers 0..K−1 (and K, the null class, with ``null_class``).
        channels: E.
        null_class: add the learned "no class" row K.

    Shapes: y (B,) int64 -> B×E.
    """

    def __init__(self, num_classes: int, channels: int, null_class: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        #: The null class's index K, or None without one.
        self.null_class: int | None = num_classes if null_class else None
        self.table = nn.Embedding(num_classes + int(null_class), channels)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


def drop_labels(y: Tensor, p: float, null_class: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Classifier-free label dropout: each label replaced by ``null_class`` independently with
    probability ``p`` (one U(0, 1) draw per label from ``generator``, on the generator's device;
    none at p = 0, which returns ``y`` itself). No host synchronisation. (B,) -> (B,)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the label dropout probability must be in [0, 1], got {p!r}")
    if p == 0.0:
        return y
    device = generator.device if generator is not None else y.device
    u = torch.rand(y.shape, generator=generator, device=device).to(y.device)
    return torch.where(u < p, torch.full_like(y, null_class), y)


def null_labels(batch: int, null_class: int, device: torch.device | str | None = None
                ) -> Tensor:
    """(batch,) int64 labels that are all the null class (the unconditional branch)."""
    return torch.full((batch,), null_class, dtype=torch.long, device=device)


def training_labels(model: nn.Module, y: Tensor | None, generator: torch.Generator | None
                    ) -> Tensor | None:
    """The labels a class-conditional model trains on: ``y`` with each label dropped to the
    model's null class (``model.null_class``) with probability ``model.config.class_dropout``
    (``drop_labels``); ``y`` itself for a model without a null class or without labels. What
    ``fit`` calls on every batch, outside the (compilable) step."""
    null = getattr(model, "null_class", None)
    if y is None or null is None:
        return y
    return drop_labels(y, float(model.config.class_dropout), null, generator)


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
