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
from ..layers.mixlogcdf import MixLogCDFCoupling
from ..layers.normalization import ActNorm
from ..layers.reshape import Squeeze, merge_channels, split_channels
from ..priors import GaussianPrior, MARPrior
from ..registry import TINY_RECIPE, Recipe, register_model, register_preset
from .base import FlowModel

#: Coupling layers by config name: (num_channels, config) -> layer.
COUPLINGS: dict[str, Callable[[int, "AttnFlowConfig"], InvertibleModule]] = {
    "affine": lambda c, cfg: AffineCoupling(c, cfg.hidden_channels),
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
        itrans_patch_size: iTrans token patch size P (1 or 2; must divide each level's H, W).
        itrans_form: "convex" (default; A = (1 − β)I + β·softmax, starts at the identity) or
            "paper" (A = softmax + αI exactly as published); see ``ITrans``.
        prior: "mar" (mAR conv-LSTM channel prior) or "gaussian" (Glow's diagonal prior).
        prior_hidden_channels: conv-LSTM width of the mAR prior (mAR-SCF: 32).
        prior_num_layers: conv-LSTM layers of the mAR prior (mAR-SCF: 3).
        prior_cond_hidden_channels: hidden width of the prior's emb(z1) net (mAR-SCF: 32).
        prior_embed_channels: output channels of emb(z1) (mAR-SCF: 4).
        prior_output_init: "random" (mAR-SCF's default-initialised output conv of the mAR
            prior; learns 0.4 bits/dim faster early on) or "zero" (the prior starts as
            N(0, I)); a Decision, see ``MARPrior``.
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
    itrans_patch_size: int = 2
    itrans_form: str = "convex"
    prior: str = "mar"
    prior_hidden_channels: int = 32
    prior_num_layers: int = 3
    prior_cond_hidden_channels: int = 32
    prior_embed_channels: int = 4
    prior_output_init: str = "random"

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
        if self.prior_output_init not in ("random", "zero"):
            raise ConfigError(f"prior_output_init must be 'random' or 'zero', got "
                              f"{self.prior_output_init!r}")
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
        COUPLINGS[cfg.coupling](channels, cfg),
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
                        cfg.prior_cond_hidden_channels, cfg.prior_embed_channels,
                        cfg.prior_output_init)

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
        """
        last = len(self.levels) - 1
        c, size, _ = self.latent_shapes[last]
        h = self.priors[last].sample(num_samples, size, size, None, temperature, generator)
        for lvl in reversed(range(len(self.levels))):
            if lvl < last:
                _, size, _ = self.latent_shapes[lvl]
                z2 = self.priors[lvl].sample(num_samples, size, size, h, temperature, generator)
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
_SIZES = {  # size: (K, C, coupling, description)
    "paper": (32, 512, "affine", "paper scale: K=32, C=512, affine (mAR-SCF affine recipe)"),
    "small": (8, 256, "affine", "small: K=8, C=256, affine"),
    # The configuration AttnFlow's table states (L=3, K=2, C=256); its 3.247 bpd sits beside
    # mAR-SCF's MixLogCDF 3.24, not the affine ≈ 3.33 (SPEC §3.1).
    "mixlog": (2, 256, "mixlogcdf", "paper configuration: K=2, C=256, MixLogCDF couplings"),
    "mixlog_small": (4, 96, "mixlogcdf", "K=4, C=96, MixLogCDF couplings"),
}


# Recipes (SPEC §3, §3.1): mAR-SCF's marscf_main.py, plus the zoo's decisions where it is silent.
_EPOCHS = {"cifar10": 400, "svhn": 270, "mnist": 330, "celeba": 120}  # ≈ 20M images each
_SHIFT = {"cifar10": 3, "svhn": 3, "mnist": 0, "celeba": 3}  # mAR-SCF: MNIST is only padded
_MARSCF_SOURCE = ("mAR-SCF (visinf/mar-scf marscf_main.py): Adamax 8e-4, linear warm-up over "
                  "10,000 images, batch 128 (affine) / 64 (MixLogCDF), CIFAR-10 shift <= 3 px + "
                  "flip. Zoo decisions: EMA 0.999 (Flow++; mAR-SCF keeps none); 20M training "
                  "images on every dataset (mAR-SCF's ~400 CIFAR-10 epochs), a quarter for "
                  "_small presets; shift <= 3 px on SVHN and CelebA.")


def _recipe(dataset: str, size: str) -> Recipe:
    coupling = _SIZES[size][2]
    small = size.endswith("small")
    return Recipe(
        name=f"marscf-{coupling}-{dataset}" + ("-small" if small else ""),
        source=_MARSCF_SOURCE, dataset=dataset, lr=8e-4, warmup_images=10_000,
        batch_size=128 if coupling == "affine" else 64,
        epochs=_EPOCHS[dataset] // 4 if small else _EPOCHS[dataset],
        max_shift=_SHIFT[dataset], ema_decay=0.999)


def _preset(name: str, attention: str, dataset: str, size: str) -> None:
    image_size, channels, levels, ddesc = _DATA_SHAPES[dataset]
    k, hidden, coupling, sdesc = _SIZES[size]
    register_preset(name, AttnFlow, AttnFlowConfig(
        image_size=image_size, in_channels=channels, num_levels=levels, num_steps=k,
        hidden_channels=hidden, attention=attention, coupling=coupling),
        f"{_ATTENTIONS[attention]} on {ddesc}, L={levels}, {sdesc}.",
        recipe=_recipe(dataset, size))


_FAMILIES = {"attnflow_imap": "imap", "attnflow_itrans": "itrans", "marflow": "none"}
_MIXLOG_DATA = {"cifar10": ("mixlog", "mixlog_small"), "svhn": ("mixlog", "mixlog_small"),
                "celeba": ("mixlog_small",)}
for _family, _attention in _FAMILIES.items():  # {family}_{dataset}[_{size}]: 39 entries
    for _dataset in _DATA_SHAPES:
        _preset(f"{_family}_{_dataset}", _attention, _dataset, "paper")
        _preset(f"{_family}_{_dataset}_small", _attention, _dataset, "small")
    for _dataset, _sizes in _MIXLOG_DATA.items():
        for _size in _sizes:
            _preset(f"{_family}_{_dataset}_{_size}", _attention, _dataset, _size)

# The quickstart entry (`attnflow quickstart`, the embedded digits): sized by held-out bits/dim
# after a fixed wall time on 2 shared CPU cores (cards/attnflow_imap_digits.json has the numbers).
# Glow's Gaussian prior: mAR's conv-LSTM prior learned more per step but ran 2.5-3x slower on CPU.
DIGITS_RECIPE = Recipe(
    name="quickstart-digits", source="the zoo's own (no paper trains on these 4,000 digits): "
    "chosen by held-out bits/dim after a fixed wall time on 2 CPU cores; mAR-SCF's MNIST "
    "recipe leaves out the shift, and so does this one", dataset="digits", lr=2e-3,
    warmup_images=320, batch_size=16, steps=3000, max_shift=0, ema_decay=0.999,
    fid_num_samples=None)


@register_model(AttnFlow, recipe=DIGITS_RECIPE)
def attnflow_imap_digits() -> AttnFlowConfig:
    """AttnFlow-iMap on the embedded digits 1×32×32, L=3, K=4, C=64, Gaussian prior (quickstart)."""
    return AttnFlowConfig(image_size=32, in_channels=1, num_levels=3, num_steps=4,
                          hidden_channels=64, attention="imap", prior="gaussian")


_TINY = dict(image_size=8, in_channels=3, num_levels=2, num_steps=2, hidden_channels=8,
             prior_hidden_channels=8, prior_num_layers=2, prior_cond_hidden_channels=8,
             prior_embed_channels=2)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap (spatial mixing), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="imap", imap_mixing="spatial")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_channel_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap (channel mixing), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="imap", imap_mixing="channel")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans (2×2 patches, level 1 only), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    # Level 2 is 2×2: a single 2×2 token, so iTrans is switched off there.
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=2,
                          attention_levels=(True, False))


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_p1_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans (1×1 patches), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=1)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_paper_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans in the published form A = softmax + αI (1×1 patches), tiny (tests)."""
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=1, itrans_form="paper")


_MIXLOG_TINY = dict(coupling="mixlogcdf", mixlog_num_components=3, mixlog_num_blocks=1,
                    mixlog_num_heads=2)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_mixlog_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap with MixLogCDF couplings, tiny: 3×8×8, L=2, K=2, C=8, K_mix=3 (tests)."""
    return AttnFlowConfig(**_TINY, **_MIXLOG_TINY, attention="imap")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def marflow_mixlog_tiny() -> AttnFlowConfig:
    """MaR-Flow with MixLogCDF couplings, tiny: 3×8×8, L=2, K=2, C=8, K_mix=3 (tests)."""
    return AttnFlowConfig(**_TINY, **_MIXLOG_TINY, attention="none")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def marflow_tiny() -> AttnFlowConfig:
    """MaR-Flow (no attention), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="none")
