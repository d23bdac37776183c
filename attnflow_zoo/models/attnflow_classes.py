"""AttnFlow's class-conditional parts (``ClassConditionalFlow``, a mixin of ``AttnFlow``): its
labels and what each level receives for them (``conditioning.LevelConditions``), its per-class
modules, Bayes' rule over its classes and Glow's ``y_cond`` class head. SPEC §7, issue 20."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .conditioning import ClassEmbedding, ClassPriorShift, LevelConditions


class ClassConditionalFlow:
    """The class side of a multi-scale flow with ``class_embedding``, ``levels``, ``priors``,
    ``latent_shapes`` and an ``AttnFlowConfig``; uses its ``encode``, ``_flow_pass``,
    ``log_prior``, ``log_density`` and ``check_labels``."""

    def make_class_embedding(self) -> tuple[ClassEmbedding | None, int]:
        """(the class embedding, with a null class when ``class_dropout`` > 0, or None; its
        width E, 0 for an unconditional model)."""
        cfg = self.config
        if not cfg.num_classes:
            return None, 0
        return (ClassEmbedding(cfg.num_classes, cfg.class_embed_channels, cfg.class_dropout > 0),
                cfg.class_embed_channels)

    def build_class_modules(self) -> None:
        """The per-class modules after the flow's: the prior shifts (``class_prior_shift``; K
        rows, K + 1 with a null class) and the class head (``class_head``). Built last and
        without random draws: the other modules' initial weights are those of a model without
        them."""
        cfg = self.config
        null = bool(cfg.num_classes) and cfg.class_dropout > 0
        self.class_shifts = (nn.ModuleList(ClassPriorShift(cfg.num_classes + int(null), shape)
                                           for shape in self.latent_shapes)
                             if cfg.num_classes and cfg.class_prior_shift else None)
        self.class_head = (_zero_linear(self.latent_shapes[-1][0], cfg.num_classes)
                           if cfg.num_classes and cfg.class_head else None)

    def class_context(self, y: Tensor | int | None, batch: int) -> Tensor | None:
        """The labels of a class-conditional model as every conditioned computation takes them
        (``check_labels``: (B,) int64, the null class included), None for an unconditional one;
        what ``generate_from_noise`` takes as ``context``."""
        return self.check_labels(y, batch)

    def conditions(self, y: Tensor | int | None, batch: int) -> LevelConditions:
        """What each level receives for the labels ``y`` of a batch (``check_labels``)."""
        return self.level_conditions(self.class_context(y, batch))

    def level_conditions(self, labels: Tensor | None, guidance: float = 0.0) -> LevelConditions:
        return LevelConditions(self.class_embedding, self.class_shifts, labels,
                               self.config.condition_couplings, guidance)

    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        """log p(x | y) for every class y = 0..K−1, B×K nats (Bayes' rule: p(y | x) is its
        softmax under a uniform p(y)). With unconditioned couplings the flow runs once and only
        the priors run per class (the logdet is the same for every y); otherwise the whole
        model runs on the batch repeated K times."""
        k, b = self.num_classes, x.shape[0]
        if k == 0:
            raise ConfigError("class log-likelihoods need a class-conditional model "
                              "(num_classes > 0)")
        labels = torch.arange(k, device=x.device).repeat_interleave(b)
        if self.config.condition_couplings:
            return self.log_density(x.repeat(k, 1, 1, 1), labels).view(k, b).t()
        outputs, logdet = self._flow_pass(x, self.level_conditions(None))
        conditions = self.level_conditions(labels)

        def repeated(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat(k, 1, 1, 1)

        pieces = [(repeated(z), *conditions.prior(lvl, repeated(kept), *z.shape[2:]))
                  for lvl, (z, kept) in enumerate(outputs)]
        return (self.log_prior(pieces).view(k, b) + logdet).t()

    def class_parameters(self) -> list[nn.Parameter]:
        """The parameters that exist for the class alone: the class embedding, the per-class
        prior shifts and the class head (empty for an unconditional model); what
        ``TrainConfig.class_lr_scale`` trains at its own lr."""
        modules = (self.class_embedding, self.class_shifts, self.class_head)
        return [p for m in modules if m is not None for p in m.parameters()]

    def log_density_and_logits(self, x: Tensor, y: Tensor | int | None = None,
                               generator: torch.Generator | None = None
                               ) -> tuple[Tensor, Tensor]:
        """(log p(x | y), (B,); the class head's logits of the top latent z_L, B×K), one pass.
        With conditioned couplings z_L is computed with y, so the logits can see the label."""
        if self.class_head is None:
            raise ConfigError("this model has no class head (class_head=False): train it "
                              "without a class loss, or build it with class_head=True")
        pieces, logdet = self.encode(x, y)
        return self.log_prior(pieces) + logdet, self.class_head(pieces[-1][0].mean((2, 3)))


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """nn.Linear with zero weight and bias, made without random draws."""
    layer = nn.Linear(in_features, out_features, device="meta")
    layer.weight = nn.Parameter(torch.zeros(out_features, in_features))
    layer.bias = nn.Parameter(torch.zeros(out_features))
    return layer
