"""AttnFlow: the MaR-Flow (mAR-SCF) multi-scale backbone with invertible attention per step.

Sources: Sukthanker et al., "Generative Flows with Invertible Attentions", CVPR 2022
(arXiv 2106.03959) for iMap / iTrans and their placement; Mahajan et al., "Normalizing Flows
with Multi-Scale Autoregressive Priors", CVPR 2020 (arXiv 2004.03891) for the backbone and the
mAR prior. See SPEC §1 and §3.
"""

# No `from __future__ import annotations`: the Hub mixin reads the real `AttnFlowConfig`
# annotation of `__init__` to rebuild the config from config.json.

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import FlowSequential, InvertibleModule, check_bound
from ..errors import ConfigError, ShapeError, check_choice
from ..layers.coupling import AffineCoupling
from ..layers.linear import InvConv1x1
from ..layers.masked_attention import (
    IMAP_GATES,
    IMAP_MIXINGS,
    ITRANS_FORMS,
    IMap,
    ITrans,
    check_init_mix,
)
from ..layers.mixlogcdf import MixLogCDFCoupling
from ..layers.normalization import ActNorm
from ..layers.reshape import Squeeze, merge_channels, split_channels
from ..priors import OUTPUT_INITS, GaussianPrior, MARPrior
from .attnflow_classes import ClassConditionalFlow
from .attnflow_latents import LatentsMixin
from .base import FlowModel, check_noise_std
from .conditioning import LevelConditions, Shift

#: Coupling layers by config name: (num_channels, config) -> layer.
COUPLINGS: dict[str, Callable[[int, "AttnFlowConfig"], InvertibleModule]] = {
    "affine": lambda c, cfg: AffineCoupling(
        c, cfg.hidden_channels, cfg.class_embed_channels if cfg.condition_couplings else 0,
        cfg.coupling_log_scale_bound),
    "mixlogcdf": lambda c, cfg: MixLogCDFCoupling(
        c, cfg.hidden_channels, cfg.mixlog_num_components, cfg.mixlog_num_blocks,
        cfg.mixlog_num_heads, cfg.mixlog_dropout),
}

ATTENTIONS = ("imap", "itrans", "none")
PRIORS = ("mar", "gaussian")

#: mAR-SCF's prior (kernel, dilation) per level; later levels reuse the last entry.
PRIOR_KERNELS: tuple[tuple[int, int], ...] = ((5, 2), (5, 1), (3, 1))


@dataclass(frozen=True)
class AttnFlowConfig:
    """Architecture of an ``AttnFlow`` (JSON-plain; saved as config.json).

    Attributes:
        image_size: H = W of the input images (divisible by 2**num_levels).
        in_channels: C of the input images (3 RGB, 1 grey).
        num_levels: L, the number of squeeze levels (a split after each level but the last).
        num_steps: K, flow steps per level.
        hidden_channels: width of each coupling's conditioner network.
        coupling: coupling layer, a key of ``COUPLINGS``: "affine" (mAR-SCF's affine coupling)
            or "mixlogcdf" (Flow++'s logistic-mixture CDF coupling, as in mAR-SCF's 3.24 bpd
            models; SPEC §3.1).
        mixlog_num_components: K, logistics per MixLogCDF mixture (Flow++ / mAR-SCF: 32).
        mixlog_num_blocks: gated conv + attention blocks of its conditioner (mAR-SCF: 10).
        mixlog_num_heads: attention heads of its conditioner (4).
        mixlog_dropout: dropout of its conditioner (0.2; off in ``eval()``, so score in eval).
        attention: "imap", "itrans" or "none" (then the model is MaR-Flow).
        attention_levels: per-level on/off tuple of length L (None: attention on every level).
        imap_mixing: iMap's mixing axis, "spatial" (positions) or "channel" (SPEC §1.3).
        imap_init_logit: c, iMap's initial s = b (SPEC §1.3 Decision): 0 (default, with the
            normalized gate) starts every gate where it learns, d log σ/da = 1 − σ(c) = 0.5;
            the published init was 4 (σ(4) = 0.98, d log σ/da = 0.018). See ``IMap``.
        imap_gate: "normalized" (default: y = x·σ(·)/σ(c), the identity at init for any c) or
            "sigmoid" (published: y = x·σ(·)); a Decision, see ``IMap`` (the measurements:
            README, "What attention buys").
        coupling_log_scale_bound: c of the affine coupling's soft-clipped log-scale,
            log s = −c·tanh(−log σ(raw + 2)/c) ∈ (−c, 0) (default 4: every coupling's inverse
            amplifies by at most e^4 ≈ 55); None is mAR-SCF's unbounded s = σ(raw + 2), what
            older checkpoints load as. A Decision, see ``AffineCoupling``.
        imap_log_gate_bound: c_g of iMap's soft-clipped log-gates (default 4: each gate above
            e^−4, times 1/σ(c) for the normalized gate); None is the published gate with no
            floor, what older checkpoints load as. A Decision, see ``IMap``.
        prior_log_std_bound: c of the Gaussian prior's log σ, soft-capped above (raw ≤ 0 as it
            is, c·tanh(raw/c) above: σ < e^c; default 4); None is Glow's unbounded log σ, what
            older checkpoints load as. The mAR prior needs none: its log σ is a conv of the
            conv-LSTM's h ∈ (−1, 1), bounded by its weights. A Decision, see ``GaussianPrior``.
        itrans_patch_size: iTrans token patch size P (1 or 2; must divide each level's H, W).
        itrans_form: "convex" (default; A = (1 − β)I + β·softmax, starts at the identity) or
            "paper" (A = softmax + αI exactly as published); see ``ITrans``.
        itrans_init_mix: the convex iTrans's initial β, the softmax's weight in A (0.05).
        prior: "mar" (mAR conv-LSTM channel prior) or "gaussian" (Glow's diagonal prior).
        prior_hidden_channels: conv-LSTM width of the mAR prior (mAR-SCF: 32).
        prior_num_layers: conv-LSTM layers of the mAR prior (mAR-SCF: 3).
        prior_cond_hidden_channels: hidden width of the prior's emb(z1) net (mAR-SCF: 32).
        prior_embed_channels: output channels of emb(z1) (mAR-SCF: 4).
        prior_output_init: "random" (mAR-SCF's default-initialised output conv of the mAR
            prior) or "zero" (the prior starts as N(0, I)); a Decision, see ``MARPrior``.
        num_classes: K > 0 makes the model class-conditional, p(x | y) with labels 0..K−1: a
            learned class embedding (``class_embed_channels`` wide) conditions every prior
            (see ``models.conditioning``); 0 (default) is unconditional.
        class_embed_channels: E, the width of the class embedding.
        condition_couplings: also feed the class embedding to every affine coupling's
            conditioner (then the flow's logdet depends on y); needs num_classes > 0. Off in
            the presets (measured worse on the digits: README, class-conditional models).
        class_prior_shift: the class also sets every level's prior mean and log-scale directly,
            a learned (Δμ_y, Δlog σ_y) per class and latent position (``ClassPriorShift``;
            a class-conditional model only). Old checkpoints: off.
        class_dropout: p, classifier-free label dropout: ``fit`` trains on each label replaced
            by a learned null class K with probability p, so the one model is also p(x) and
            samples with guidance w (``generate(..., guidance=w)``); p > 0 adds the null class
            (a class-conditional model only). Old checkpoints: 0 (no null class).
        class_head: a linear classifier on the top latent's spatial mean (Glow's ``y_cond``),
            logits = W·mean_{H,W}(z_L) + b, zero-initialised; ``fit`` adds its cross-entropy
            with weight ``TrainConfig.class_loss_weight`` (a class-conditional model only).
        noise_std: σ of the Gaussian noise the checkpoint was trained with (``FlowModel``'s
            ``noise_std``; 0: uniform dequantisation). Set by training.
    """

    image_size: int = 32
    in_channels: int = 3
    num_levels: int = 3
    num_steps: int = 8
    hidden_channels: int = 256
    coupling: str = "affine"
    mixlog_num_components: int = 32
    mixlog_num_blocks: int = 10
    mixlog_num_heads: int = 4
    mixlog_dropout: float = 0.2
    attention: str = "imap"
    attention_levels: tuple[bool, ...] | None = None
    imap_mixing: str = "spatial"
    imap_init_logit: float = 0.0
    imap_gate: str = "normalized"
    coupling_log_scale_bound: float | None = 4.0
    imap_log_gate_bound: float | None = 4.0
    prior_log_std_bound: float | None = 4.0
    #: What a config.json written before a key existed meant by its absence (the checkpoint's
    #: function, not today's default): the published σ gate at c = 4 before the normalized one;
    #: unbounded coupling scales, iMap gates and Gaussian-prior σ; no class shift, no null class.
    LEGACY_DEFAULTS: ClassVar[dict[str, object]] = {
        "imap_gate": "sigmoid", "imap_init_logit": 4.0, "coupling_log_scale_bound": None,
        "imap_log_gate_bound": None, "prior_log_std_bound": None, "class_prior_shift": False,
        "class_dropout": 0.0}
    itrans_patch_size: int = 2
    itrans_form: str = "convex"
    itrans_init_mix: float = 0.05
    prior: str = "mar"
    prior_hidden_channels: int = 32
    prior_num_layers: int = 3
    prior_cond_hidden_channels: int = 32
    prior_embed_channels: int = 4
    prior_output_init: str = "random"
    num_classes: int = 0
    class_embed_channels: int = 8
    condition_couplings: bool = False
    noise_std: float = 0.0
    class_prior_shift: bool = True
    class_dropout: float = 0.1
    class_head: bool = False

    def __post_init__(self) -> None:
        if self.attention_levels is not None and not isinstance(self.attention_levels, tuple):
            object.__setattr__(self, "attention_levels",
                               tuple(bool(v) for v in self.attention_levels))
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` on values the architecture cannot take (each vocabulary is its
        layer's: ``IMAP_GATES``, ``ITRANS_FORMS``, ``priors.OUTPUT_INITS`` ...)."""
        check_noise_std(self.noise_std)
        for name, allowed in (("attention", ATTENTIONS), ("coupling", COUPLINGS),
                              ("prior", PRIORS), ("prior_output_init", OUTPUT_INITS),
                              ("imap_mixing", IMAP_MIXINGS), ("imap_gate", IMAP_GATES),
                              ("itrans_form", ITRANS_FORMS)):
            check_choice(name, getattr(self, name), allowed)
        if not math.isfinite(self.imap_init_logit):
            raise ConfigError(f"imap_init_logit must be a finite number, got "
                              f"{self.imap_init_logit!r}")
        for name in ("coupling_log_scale_bound", "imap_log_gate_bound", "prior_log_std_bound"):
            check_bound(name, getattr(self, name))
        check_init_mix("itrans_init_mix", self.itrans_init_mix)
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.num_levels < 1 or self.num_steps < 1:
            raise ConfigError("num_levels and num_steps must be at least 1")
        if self.num_classes < 0 or self.class_embed_channels < 1:
            raise ConfigError("num_classes must be ≥ 0 and class_embed_channels ≥ 1")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class_dropout must be in [0, 1), got {self.class_dropout!r}")
        if self.condition_couplings and (self.num_classes == 0 or self.coupling != "affine"):
            raise ConfigError("condition_couplings needs num_classes > 0 and the affine "
                              "coupling; set num_classes, or condition the priors only")
        if self.image_size % (2 ** self.num_levels):
            raise ConfigError(f"image_size {self.image_size} must be divisible by "
                              f"2**num_levels = {2 ** self.num_levels}; pad or resize the images")
        if self.attention_levels is not None and len(self.attention_levels) != self.num_levels:
            raise ConfigError(f"attention_levels needs one entry per level ({self.num_levels}), "
                              f"got {len(self.attention_levels)}")
        if self.attention == "itrans":
            p = self.itrans_patch_size
            for lvl in range(self.num_levels):
                side = self.image_size // 2 ** (lvl + 1)
                if self.uses_attention(lvl) and (p < 1 or side % p or side == p):
                    # side == p: one token, softmax ≡ 1, so Q, K and τ would be dead weights.
                    raise ConfigError(f"itrans_patch_size {p} must divide level {lvl + 1}'s "
                                      f"size {side} into at least 2×2 tokens; use a smaller "
                                      "patch size or switch that level off in attention_levels")

    def uses_attention(self, level: int) -> bool:
        """Whether level ``level`` (0-based) has an attention layer in each step."""
        if self.attention == "none":
            return False
        return True if self.attention_levels is None else bool(self.attention_levels[level])


def _attention_layer(cfg: AttnFlowConfig, channels: int, size: int, parity: int
                     ) -> InvertibleModule:
    if cfg.attention == "imap":
        return IMap(channels, size, size, parity=parity, mixing=cfg.imap_mixing,
                    init_logit=cfg.imap_init_logit, gate=cfg.imap_gate,
                    log_gate_bound=cfg.imap_log_gate_bound)
    return ITrans(channels, size, size, parity=parity, patch_size=cfg.itrans_patch_size,
                  form=cfg.itrans_form, init_mix=cfg.itrans_init_mix)


def flow_step(cfg: AttnFlowConfig, channels: int, size: int, parity: int,
              attention: bool) -> FlowSequential:
    """One step: ActNorm → InvConv1x1 → coupling → attention (SPEC §1.1)."""
    layers: list[InvertibleModule] = [
        ActNorm(channels),
        InvConv1x1(channels),
        COUPLINGS[cfg.coupling](channels, cfg),
    ]
    if attention:
        layers.append(_attention_layer(cfg, channels, size, parity))
    return FlowSequential(layers)


class AttnFlow(ClassConditionalFlow, LatentsMixin, FlowModel):
    """Multi-scale flow x -> (z_1, …, z_L) with a mAR (or Gaussian) prior on each factored half.

    Per level l: squeeze (C, H, W) -> (4C, H/2, W/2), K steps of
    ActNorm → InvConv1x1 → coupling → attention (iMap / iTrans / none, mask parity k mod 2),
    then (l < L) split the channels: z1 = first C − C//2 continues, z2 = the rest is factored
    out with prior p(z2 | z1). The last level's output is modelled without conditioning.

    log p(x) = Σ_l log p(z2_l | z1_l) + log p(z_L) + log|det ∂z/∂x|.

    Latent layout: ``forward`` returns z of shape B×D, D = C·H·W, the concatenation of the
    flattened (C-major) per-level latents in level order: [z2_1, z2_2, …, z2_{L−1}, z_L];
    ``latent_shapes`` gives each piece's (C, H, W). ``inverse`` takes the same layout.
    The forward logdet is the flow's alone (no prior term, no −D·ln 256).

    Args:
        config: the architecture (``AttnFlowConfig``).
    """

    def __init__(self, config: AttnFlowConfig, *, preset: str | None = None) -> None:
        super().__init__(config, preset=preset)
        cfg = config
        c, size = cfg.in_channels, cfg.image_size
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        self.class_embedding, e = self.make_class_embedding()
        for lvl in range(cfg.num_levels):
            c, size = 4 * c, size // 2
            steps = [flow_step(cfg, c, size, k % 2, cfg.uses_attention(lvl))
                     for k in range(cfg.num_steps)]
            self.levels.append(FlowSequential(Squeeze(2), steps))
            last = lvl == cfg.num_levels - 1
            c_keep = c if last else c - c // 2
            c_out = c if last else c // 2
            self.priors.append(self._make_prior(c_out, (0 if last else c_keep) + e, lvl))
            self.latent_shapes.append((c_out, size, size))
            c = c_keep
        self.build_class_modules()

    def _make_prior(self, channels: int, cond_channels: int, level: int) -> nn.Module:
        cfg = self.config
        if cfg.prior == "gaussian":
            return GaussianPrior(channels, cond_channels, cfg.prior_log_std_bound)
        kernel, dilation = PRIOR_KERNELS[min(level, len(PRIOR_KERNELS) - 1)]
        return MARPrior(channels, cond_channels, cfg.prior_hidden_channels,
                        cfg.prior_num_layers, kernel, dilation,
                        cfg.prior_cond_hidden_channels, cfg.prior_embed_channels,
                        cfg.prior_output_init)

    # --- the flow ---------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | int | None = None
               ) -> tuple[list[tuple[Tensor, Tensor | None, Shift]], Tensor]:
        """x -> per level (z, cond, shift) (cond: what the level's prior is conditioned on, the
        kept half z1 and the class embedding, each if any; shift: the class's (Δμ, Δlog σ) of
        that prior, or None) and the flow's logdet (B,)."""
        conditions = self.conditions(y, x.shape[0])
        outputs, logdet = self._flow_pass(x, conditions)
        return [(z, *conditions.prior(lvl, kept, *z.shape[2:]))
                for lvl, (z, kept) in enumerate(outputs)], logdet

    def _flow_pass(self, x: Tensor, conditions: LevelConditions
                   ) -> tuple[list[tuple[Tensor, Tensor | None]], Tensor]:
        """x -> per level (z_l, the kept half that continues, None at the last level) and the
        flow's logdet (B,), the couplings given ``conditions.flow()``."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"expected input B×{'×'.join(map(str, self.input_shape))}, got "
                             f"{tuple(x.shape)}")
        logdet = x.new_zeros(x.shape[0])
        outputs: list[tuple[Tensor, Tensor | None]] = []
        h = x
        for lvl, level in enumerate(self.levels):
            h, ld = level(h, conditions.flow())
            logdet = logdet + ld
            kept, z = split_channels(h) if lvl < len(self.levels) - 1 else (None, h)
            outputs.append((z, kept))
            h = kept
        return outputs, logdet

    def forward(self, x: Tensor, y: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """x (B×C×H×W, in [−0.5, 0.5)) -> (z: B×D in the documented layout, logdet: (B,));
        ``y``: labels of a class-conditional model (needed when its couplings are conditioned)."""
        pieces, logdet = self.encode(x, y)
        return torch.cat([z.flatten(1) for z, _, _ in pieces], 1), logdet

    def _descend(self, latent_at: Callable[..., Tensor], conditions: LevelConditions) -> Tensor:
        """x = f⁻¹ run deepest level first, level l's latent being
        ``latent_at(l, cond_l, shift_l)`` (as in ``encode``; ``conditions``: the labels' and
        guidance's). The one descent of decoding, sampling, prior parameters and unwhitening."""
        flow_context = conditions.flow()
        h: Tensor | None = None
        for lvl in reversed(range(len(self.levels))):
            _, height, width = self.latent_shapes[lvl]
            z = latent_at(lvl, *conditions.prior(lvl, h, height, width))
            h = self.levels[lvl].inverse(z if h is None else merge_channels(h, z), flow_context)
        return h

    def unflatten(self, z: Tensor) -> list[Tensor]:
        """Split a B×D latent into the per-level latents, B×C_l×H_l×W_l each."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        if z.dim() != 2 or z.shape[1] != sum(sizes):
            raise ShapeError(f"expected a latent of shape B×{sum(sizes)}, got {tuple(z.shape)}")
        return [p.reshape(-1, *s) for p, s in
                zip(torch.split(z, sizes, 1), self.latent_shapes, strict=True)]

    def decode(self, latents: list[Tensor], y: Tensor | int | None = None) -> Tensor:
        """Per-level latents [z2_1, …, z2_{L−1}, z_L] -> x."""
        self._check_latents(latents)
        return self._descend(lambda lvl, _c, _s: latents[lvl], self.conditions(y, len(latents[-1])))

    def inverse(self, z: Tensor, y: Tensor | int | None = None) -> Tensor:
        """z (B×D, the layout of ``forward``) -> x (B×C×H×W)."""
        return self.decode(self.unflatten(z), y)

    # --- density and sampling ---------------------------------------------------------------
    def log_prior(self, pieces: list[tuple[Tensor, Tensor | None, Shift]]) -> Tensor:
        """Σ_l log p(z_l | cond_l) (the class's shift in its parameters), (B,)."""
        total = pieces[0][0].new_zeros(pieces[0][0].shape[0])
        for prior, (z, cond, shift) in zip(self.priors, pieces, strict=True):
            total = total + prior.log_prob(z, cond, shift)
        return total

    def log_density(self, x: Tensor, y: Tensor | int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """log p(x | y) in nats, (B,), for x in [−0.5, 0.5)^D (exact: ``generator`` is unused;
        ``y`` only for a class-conditional model; y = K, a null class, gives p(x))."""
        pieces, logdet = self.encode(x, y)
        return self.log_prior(pieces) + logdet

    @torch.no_grad()
    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None,
                 y: Tensor | int | None = None, guidance: float = 0.0) -> Tensor:
        """x = f⁻¹(z), z drawn level by level from the priors, deepest first; B×C×H×W.

        ``temperature`` scales every prior's standard deviation; 0 gives the mean chain.
        ``y``: the class of each sample (class-conditional models only); ``guidance``: w of
        classifier-free guidance, every prior's and conditioned coupling's θ_y + w·(θ_y − θ_∅)
        (``models.conditioning``; 0: the plain conditional sample). The noise is drawn first
        (``draw_noise``), then turned into images by the deterministic ``generate_from_noise``
        (what ``torch.compile`` / a CUDA graph takes).
        """
        noise = self.draw_noise(num_samples, temperature, generator)
        return self.generate_from_noise(num_samples, temperature, noise,
                                        self.class_context(y, num_samples), guidance)

    def draw_noise(self, num_samples: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> list[Tensor | None]:
        """Each level's prior noise (level order), drawn deepest level first, the order of
        ancestral sampling; None everywhere at temperature 0 (nothing is drawn)."""
        noise: list[Tensor | None] = [None] * len(self.levels)
        if temperature != 0:
            for lvl in reversed(range(len(self.levels))):
                _, height, width = self.latent_shapes[lvl]
                noise[lvl] = self.priors[lvl].draw_noise(num_samples, height, width, generator)
        return noise

    @torch.no_grad()
    def generate_from_noise(self, num_samples: int, temperature: float,
                            noise: list[Tensor | None], context: Tensor | None = None,
                            guidance: float = 0.0) -> Tensor:
        """The images of ``draw_noise``'s noise: deterministic, static shapes, no host sync;
        ``context``: the labels (``class_context``) of a class-conditional model;
        ``guidance``: as in ``generate``."""
        def sampled(lvl: int, cond: Tensor | None, shift: Shift) -> Tensor:
            _, height, width = self.latent_shapes[lvl]
            return self.priors[lvl].sample_from_noise(num_samples, height, width, cond,
                                                      temperature, noise[lvl], shift)

        return self._descend(sampled, self.level_conditions(context, guidance))

