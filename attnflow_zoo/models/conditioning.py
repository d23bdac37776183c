"""Class conditioning of a multi-scale flow: a learned class embedding, what the priors and the
couplings receive from it, and classifier-free guidance.

A class-conditional ``AttnFlow`` models p(x | y) = p(z | y) · |det ∂z/∂x| with

- every prior conditioned on e_y: the prior of level l sees cond_l = [z1_l, E_y] (the kept half
  and the embedding broadcast over the level's H×W as E extra channels; E_y alone at the last
  level, which has no kept half). The mAR prior's input is Conv_in([z_{c−1}, emb(cond_l)]) and
  the Gaussian prior's (μ, log σ) = ZeroConv(cond_l);
- (``class_prior_shift``) the class setting every prior's mean and log-scale directly, per
  position: (μ, log σ) + (Δμ_y, Δlog σ_y) (``ClassPriorShift``);
- (``condition_couplings``) every affine coupling's conditioner, NN([x_a, E_y]).

Only the couplings make the flow's map depend on y; without them log|det ∂z/∂x| is the same for
every y. For each y the map x -> z is a bijection, so p(· | y) is a density whenever each prior
factor p(z_l | cond_l, y) is one (a product of normalised Gaussians, autoregressive over
channels for the mAR prior; the shifts depend on y only, so they keep it one).

Classifier-free guidance (Ho & Salimans 2022): trained with each label dropped to a learned null
class K with probability p (``drop_labels``), the model is p(x | y) and p(x) = p(x | ∅) in one;
a guided sample takes every prior's and coupling's parameters as θ_y + w·(θ_y − θ_∅)
(``guide``, ``Guided``), computed on the same partial sample, level by level.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..guidance import Guided, guide  # noqa: F401 - the guidance API, re-exported

#: A class's (Δμ, Δlog σ) of one level's prior (B×C×H×W each), or None.
Shift = tuple[Tensor, Tensor] | None

__all__ = ["ClassEmbedding", "ClassPriorShift", "Guided", "LevelConditions", "Shift",
           "balanced_labels", "drop_labels", "guide", "null_labels", "prior_condition",
           "training_labels"]


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


class ClassPriorShift(nn.Module):
    """Per class y, learned maps (Δμ_y, Δlog σ_y) ∈ R^{C×H×W} added to a level's prior
    parameters: p(z | cond, y) = Π N(z; μ(cond) + Δμ_y, (σ(cond)·exp(Δlog σ_y))²), autoregressive
    priors channel by channel (μ_c, σ_c still depend on z_{<c} only, so it stays a density).
    The class sets the mean and log-scale of the prior directly, at every position (Glow's
    class-conditional prior, per position; FlowGMM's class means). Zero at init: the prior
    starts as the unshifted one. No random draws at construction.

    Args:
        num_rows: K, or K + 1 with a null class.
        shape: (C, H, W) of the level's latent.

    Shapes: y (B,) int64 -> (Δμ, Δlog σ), B×C×H×W each.
    """

    def __init__(self, num_rows: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        c, h, w = shape
        self.table = nn.Parameter(torch.zeros(num_rows, 2 * c * h * w))

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        shift = F.embedding(y, self.table).view(-1, 2, *self.shape)
        return shift[:, 0], shift[:, 1]


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


class LevelConditions:
    """What each level of a class-conditional multi-scale flow receives for labels y (B,): its
    prior's condition cond_l = [kept_l, E_y] (``prior_condition``), its prior's shift
    (Δμ_y, Δlog σ_y) (``ClassPriorShift``, if the flow has them) and the couplings' context e_y
    (if they are conditioned). With a guidance weight w ≠ 0 each comes paired with the null
    class's: ``Guided`` conditions and contexts, and the shift mixed, guide(shift_y, shift_∅, w).
    Without labels (an unconditional flow) the priors see the kept half alone and nothing else.

    Args:
        embedding: the flow's ``ClassEmbedding`` (None: unconditional).
        shifts: the flow's per-level ``ClassPriorShift`` modules, or None.
        labels: (B,) int64 labels, or None.
        couplings: whether the couplings are conditioned.
        guidance: w; needs the embedding's null class when ≠ 0.
    """

    def __init__(self, embedding: ClassEmbedding | None, shifts: nn.ModuleList | None,
                 labels: Tensor | None, couplings: bool, guidance: float = 0.0) -> None:
        self.labels, self.shifts, self.couplings, self.weight = labels, shifts, couplings, guidance
        self.e = self.e_null = self.null = None
        if labels is None or embedding is None:
            if guidance:
                raise ConfigError("classifier-free guidance needs a class-conditional model "
                                  "trained with label dropout; this one is unconditional: "
                                  "sample it with guidance 0")
            return
        self.e = embedding(labels)
        if guidance:
            if embedding.null_class is None:
                raise ConfigError("classifier-free guidance needs a model trained with label "
                                  "dropout (class_dropout > 0, which gives it a null class); "
                                  "sample this one with guidance 0")
            self.null = null_labels(len(labels), embedding.null_class, labels.device)
            self.e_null = embedding(self.null)

    def flow(self) -> Tensor | Guided | None:
        """The couplings' context: e_y (or ``Guided``), None if they are not conditioned."""
        if self.e is None or not self.couplings:
            return None
        return self.e if self.e_null is None else Guided(self.e, self.e_null, self.weight)

    def prior(self, level: int, kept: Tensor | None, height: int, width: int
              ) -> tuple[Tensor | Guided | None, tuple[Tensor, Tensor] | None]:
        """(cond_l, shift_l) of level ``level``'s prior, given the kept half (None at the last
        level) and the level's height × width."""
        cond = prior_condition(kept, self.e, height, width)
        if self.e_null is not None:
            cond = Guided(cond, prior_condition(kept, self.e_null, height, width), self.weight)
        if self.shifts is None or self.labels is None:
            return cond, None
        shift = self.shifts[level](self.labels)
        if self.null is not None:
            shift = guide(shift, self.shifts[level](self.null), self.weight)
        return cond, shift


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
