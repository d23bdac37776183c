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

import torch
from torch import Tensor, nn

from ..core import FlowSequential, InvertibleModule
from ..errors import ConfigError, ShapeError
from ..layers.coupling import AffineCoupling
from ..layers.linear import InvConv1x1
from ..layers.masked_attention import IMap, ITrans
from ..layers.normalization import ActNorm
from ..layers.reshape import Squeeze, merge_channels, split_channels
from ..priors import GaussianPrior, MARPrior
from ..registry import register_model, register_preset
from .base import FlowModel

#: Coupling layers by config name: (num_channels, hidden_channels) -> layer. A MixLogCDF
#: coupling registers here (``COUPLINGS["mixlogcdf"] = ...``) without touching the model.
COUPLINGS: dict[str, Callable[[int, int], InvertibleModule]] = {
    "affine": lambda c, hidden: AffineCoupling(c, hidden),
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
        coupling: coupling layer, a key of ``COUPLINGS`` ("affine").
        attention: "imap", "itrans" or "none" (then the model is MaR-Flow).
        attention_levels: per-level on/off tuple of length L (None: attention on every level).
        imap_mixing: iMap's mixing axis, "spatial" (positions) or "channel" (SPEC §1.3).
        itrans_patch_size: iTrans token patch size P (1 or 2; must divide each level's H, W).
        itrans_form: "convex" (default; A = (1 − β)I + β·softmax, starts at the identity) or
            "paper" (A = softmax + αI exactly as published); see ``ITrans``.
        prior: "mar" (mAR conv-LSTM channel prior) or "gaussian" (Glow's diagonal prior).
        prior_hidden_channels: conv-LSTM width of the mAR prior (mAR-SCF: 32).
        prior_num_layers: conv-LSTM layers of the mAR prior (mAR-SCF: 3).
        prior_cond_hidden_channels: hidden width of the prior's emb(z1) net (mAR-SCF: 32).
        prior_embed_channels: output channels of emb(z1) (mAR-SCF: 4).
    """

    image_size: int = 32
    in_channels: int = 3
    num_levels: int = 3
    num_steps: int = 8
    hidden_channels: int = 256
    coupling: str = "affine"
    attention: str = "imap"
    attention_levels: tuple[bool, ...] | None = None
    imap_mixing: str = "spatial"
    itrans_patch_size: int = 2
    itrans_form: str = "convex"
    prior: str = "mar"
    prior_hidden_channels: int = 32
    prior_num_layers: int = 3
    prior_cond_hidden_channels: int = 32
    prior_embed_channels: int = 4

    def __post_init__(self) -> None:
        if self.attention_levels is not None and not isinstance(self.attention_levels, tuple):
            object.__setattr__(self, "attention_levels",
                               tuple(bool(v) for v in self.attention_levels))
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` on values the architecture cannot take."""
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.coupling not in COUPLINGS:
            raise ConfigError(f"coupling must be one of {tuple(COUPLINGS)}, got {self.coupling!r}")
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.imap_mixing not in ("spatial", "channel"):
            raise ConfigError(f"imap_mixing must be 'spatial' or 'channel', got "
                              f"{self.imap_mixing!r}")
        if self.num_levels < 1 or self.num_steps < 1:
            raise ConfigError("num_levels and num_steps must be at least 1")
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
        return IMap(channels, size, size, parity=parity, mixing=cfg.imap_mixing)
    return ITrans(channels, size, size, parity=parity, patch_size=cfg.itrans_patch_size,
                  form=cfg.itrans_form)


def flow_step(cfg: AttnFlowConfig, channels: int, size: int, parity: int,
              attention: bool) -> FlowSequential:
    """One step: ActNorm → InvConv1x1 → coupling → attention (SPEC §1.1)."""
    layers: list[InvertibleModule] = [
        ActNorm(channels),
        InvConv1x1(channels),
        COUPLINGS[cfg.coupling](channels, cfg.hidden_channels),
    ]
    if attention:
        layers.append(_attention_layer(cfg, channels, size, parity))
    return FlowSequential(layers)


class AttnFlow(FlowModel):
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

    def __init__(self, config: AttnFlowConfig) -> None:
        super().__init__(config)
        cfg = config
        c, size = cfg.in_channels, cfg.image_size
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        for lvl in range(cfg.num_levels):
            c, size = 4 * c, size // 2
            steps = [flow_step(cfg, c, size, k % 2, cfg.uses_attention(lvl))
                     for k in range(cfg.num_steps)]
            self.levels.append(FlowSequential(Squeeze(2), steps))
            last = lvl == cfg.num_levels - 1
            c_keep = c if last else c - c // 2
            c_out = c if last else c // 2
            self.priors.append(self._make_prior(c_out, 0 if last else c_keep, lvl))
            self.latent_shapes.append((c_out, size, size))
            c = c_keep

    def _make_prior(self, channels: int, cond_channels: int, level: int) -> nn.Module:
        cfg = self.config
        if cfg.prior == "gaussian":
            return GaussianPrior(channels, cond_channels)
        kernel, dilation = PRIOR_KERNELS[min(level, len(PRIOR_KERNELS) - 1)]
        return MARPrior(channels, cond_channels, cfg.prior_hidden_channels,
                        cfg.prior_num_layers, kernel, dilation,
                        cfg.prior_cond_hidden_channels, cfg.prior_embed_channels)

    # --- the flow ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[list[tuple[Tensor, Tensor | None]], Tensor]:
        """x -> per-level (z, cond) pairs (cond = the kept half z1, None at the last level) and
        the flow's logdet (B,)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"expected input B×{'×'.join(map(str, self.input_shape))}, got "
                             f"{tuple(x.shape)}")
        logdet = x.new_zeros(x.shape[0])
        pieces: list[tuple[Tensor, Tensor | None]] = []
        h = x
        for lvl, level in enumerate(self.levels):
            h, ld = level(h)
            logdet = logdet + ld
            if lvl < len(self.levels) - 1:
                z1, z2 = split_channels(h)
                pieces.append((z2, z1))
                h = z1
            else:
                pieces.append((h, None))
        return pieces, logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B×C×H×W, in [−0.5, 0.5)) -> (z: B×D in the documented layout, logdet: (B,))."""
        pieces, logdet = self.encode(x)
        return torch.cat([z.flatten(1) for z, _ in pieces], 1), logdet

    def unflatten(self, z: Tensor) -> list[Tensor]:
        """Split a B×D latent into the per-level latents, B×C_l×H_l×W_l each."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        if z.dim() != 2 or z.shape[1] != sum(sizes):
            raise ShapeError(f"expected a latent of shape B×{sum(sizes)}, got {tuple(z.shape)}")
        return [p.reshape(-1, *s) for p, s in
                zip(torch.split(z, sizes, 1), self.latent_shapes, strict=True)]

    def decode(self, latents: list[Tensor]) -> Tensor:
        """Per-level latents [z2_1, …, z2_{L−1}, z_L] -> x."""
        h = latents[-1]
        for lvl in reversed(range(len(self.levels))):
            if lvl < len(self.levels) - 1:
                h = merge_channels(h, latents[lvl])
            h = self.levels[lvl].inverse(h)
        return h

    def inverse(self, z: Tensor) -> Tensor:
        """z (B×D, the layout of ``forward``) -> x (B×C×H×W)."""
        return self.decode(self.unflatten(z))

    # --- density and sampling ---------------------------------------------------------------
    def log_prior(self, pieces: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        """Σ_l log p(z_l | cond_l), (B,)."""
        total = pieces[0][0].new_zeros(pieces[0][0].shape[0])
        for prior, (z, cond) in zip(self.priors, pieces, strict=True):
            total = total + prior.log_prob(z, cond)
        return total

    def log_density(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """log p(x) in nats, (B,), for x in [−0.5, 0.5)^D (exact: ``generator`` is unused)."""
        pieces, logdet = self.encode(x)
        return self.log_prior(pieces) + logdet

    @torch.no_grad()
    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """x = f⁻¹(z), z drawn level by level from the priors, deepest first; B×C×H×W.

        ``temperature`` scales every prior's standard deviation; 0 gives the mean chain.
        The noise is drawn first (``draw_noise``), then turned into images by the
        deterministic ``generate_from_noise`` (what ``torch.compile`` / a CUDA graph takes).
        """
        noise = self.draw_noise(num_samples, temperature, generator)
        return self.generate_from_noise(num_samples, temperature, noise)

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
                            noise: list[Tensor | None]) -> Tensor:
        """The images of ``draw_noise``'s noise: deterministic, static shapes, no host sync."""
        last = len(self.levels) - 1
        _, height, width = self.latent_shapes[last]
        h = self.priors[last].sample_from_noise(num_samples, height, width, None, temperature,
                                                noise[last])
        for lvl in reversed(range(len(self.levels))):
            if lvl < last:
                _, height, width = self.latent_shapes[lvl]
                z2 = self.priors[lvl].sample_from_noise(num_samples, height, width, h,
                                                        temperature, noise[lvl])
                h = merge_channels(h, z2)
            h = self.levels[lvl].inverse(h)
        return h


# --- presets ---------------------------------------------------------------------------------
# Naming: ``{family}_{dataset}`` is the paper-scale model, ``{family}_{dataset}_small`` a
# K = 8, C = 256 model for quick runs, ``{family}_tiny`` / ``{family}_*_tiny`` test sizes.
# family: attnflow_imap, attnflow_itrans, marflow (the backbone without attention).
# Paper scale: the AttnFlow paper does not state K and C; we use mAR-SCF's affine recipe
# (L = 3, K = 32, C = 512 at 32×32; L = 4 at 64×64).
_DATA_SHAPES = {
    # dataset: (image_size, in_channels, num_levels, description); MNIST is padded to 32.
    "cifar10": (32, 3, 3, "CIFAR-10 32×32"),
    "svhn": (32, 3, 3, "SVHN cropped digits 32×32"),
    "mnist": (32, 1, 3, "MNIST padded to 32×32 (1 channel)"),
    "celeba": (64, 3, 4, "CelebA 64×64"),
}
_ATTENTIONS = {"imap": "AttnFlow-iMap", "itrans": "AttnFlow-iTrans",
               "none": "MaR-Flow (no attention)"}
_SIZES = {"paper": (32, 512, "paper scale: K=32, C=512 (mAR-SCF affine recipe)"),
          "small": (8, 256, "small: K=8, C=256")}


def _preset(name: str, attention: str, dataset: str, size: str) -> None:
    image_size, channels, levels, ddesc = _DATA_SHAPES[dataset]
    k, hidden, sdesc = _SIZES[size]
    register_preset(name, AttnFlow, AttnFlowConfig(
        image_size=image_size, in_channels=channels, num_levels=levels, num_steps=k,
        hidden_channels=hidden, attention=attention),
        f"{_ATTENTIONS[attention]} on {ddesc}, L={levels}, {sdesc}.")


_preset("attnflow_imap_cifar10", "imap", "cifar10", "paper")
_preset("attnflow_imap_cifar10_small", "imap", "cifar10", "small")
_preset("attnflow_imap_svhn", "imap", "svhn", "paper")
_preset("attnflow_imap_svhn_small", "imap", "svhn", "small")
_preset("attnflow_imap_mnist", "imap", "mnist", "paper")
_preset("attnflow_imap_mnist_small", "imap", "mnist", "small")
_preset("attnflow_imap_celeba", "imap", "celeba", "paper")
_preset("attnflow_imap_celeba_small", "imap", "celeba", "small")
_preset("attnflow_itrans_cifar10", "itrans", "cifar10", "paper")
_preset("attnflow_itrans_cifar10_small", "itrans", "cifar10", "small")
_preset("attnflow_itrans_svhn", "itrans", "svhn", "paper")
_preset("attnflow_itrans_svhn_small", "itrans", "svhn", "small")
_preset("attnflow_itrans_mnist", "itrans", "mnist", "paper")
_preset("attnflow_itrans_mnist_small", "itrans", "mnist", "small")
_preset("attnflow_itrans_celeba", "itrans", "celeba", "paper")
_preset("attnflow_itrans_celeba_small", "itrans", "celeba", "small")
_preset("marflow_cifar10", "none", "cifar10", "paper")
_preset("marflow_cifar10_small", "none", "cifar10", "small")
_preset("marflow_svhn", "none", "svhn", "paper")
_preset("marflow_svhn_small", "none", "svhn", "small")
_preset("marflow_mnist", "none", "mnist", "paper")
_preset("marflow_mnist_small", "none", "mnist", "small")
_preset("marflow_celeba", "none", "celeba", "paper")
_preset("marflow_celeba_small", "none", "celeba", "small")

_TINY = dict(image_size=8, in_channels=3, num_levels=2, num_steps=2, hidden_channels=8,
             prior_hidden_channels=8, prior_num_layers=2, prior_cond_hidden_channels=8,
             prior_embed_channels=2)


@register_model(AttnFlow)
def attnflow_imap_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap (spatial mixing), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="imap", imap_mixing="spatial")


@register_model(AttnFlow)
def attnflow_imap_channel_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap (channel mixing), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="imap", imap_mixing="channel")


@register_model(AttnFlow)
def attnflow_itrans_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans (2×2 patches, level 1 only), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    # Level 2 is 2×2: a single 2×2 token, so iTrans is switched off there.
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=2,
                          attention_levels=(True, False))


@register_model(AttnFlow)
def attnflow_itrans_p1_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans (1×1 patches), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=1)


@register_model(AttnFlow)
def attnflow_itrans_paper_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans in the published form A = softmax + αI (1×1 patches), tiny (tests)."""
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=1, itrans_form="paper")


@register_model(AttnFlow)
def marflow_tiny() -> AttnFlowConfig:
    """MaR-Flow (no attention), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="none")
