"""TarFlow: a stack of causal-transformer autoregressive blocks on image patches (SPEC §6).

Source: Zhai, Zhang, Nakkiran, Berthelot, Gu, Zheng, Chen, Bautista, Jaitly, Susskind,
"Normalizing Flows are Capable Generative Models" (Apple, 2024; ICML 2025, arXiv 2412.06329);
code apple/ml-tarflow (``transformer_flow.py``). The model is ml-tarflow's ``Model`` with the
zoo's conventions: a per-sample log-determinant in nats, 8-bit data in the zoo's model space,
strict safetensors, and sampling state passed as arguments (``layers.tarflow``).
"""

# No `from __future__ import annotations`: the Hub mixin reads the real `TarFlowConfig`
# annotation of `__init__` to rebuild the config from config.json.

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..core import check_bound, diag_normal_logpdf, randn_like_on
from ..errors import ConfigError, ShapeError, check_choice
from ..layers.reshape import patchify, unpatchify
from ..layers.tarflow import HEAD_BIAS_INITS, Guidance, TarFlowBlock
from ..registry import Recipe, register_model
from .base import FlowModel, check_noise_std
from .conditioning import ClassEmbedding, null_labels

PRIORS = ("standard", "learned")


@dataclass(frozen=True)
class TarFlowConfig:
    """Architecture of a ``TarFlow`` (JSON-plain; saved as config.json).

    Attributes:
        image_size: H = W of the input images (divisible by ``patch_size``).
        in_channels: C of the input images.
        patch_size: P; tokens are the T = (H/P)² non-overlapping P×P patches, d = C·P² numbers
            each in (c, i, j) order, in row-major patch order (ml-tarflow's ``patchify``).
        width: the transformers' width (ml-tarflow's ``channels``).
        num_blocks: autoregressive blocks; block k runs in reversed token order for odd k.
        layers_per_block: transformer layers per block.
        head_dim: width of each attention head (ml-tarflow: 64).
        expansion: MLP hidden width over ``width`` (ml-tarflow: 4).
        affine: True: affine blocks z = (u − b)·exp(−a) (ml-tarflow's "nvp", the default);
            False: shifts only (volume preserving; then ``prior`` = "learned" is ml-tarflow's
            "vp" mode).
        prior: "standard" (z ~ N(0, I), ml-tarflow's default) or "learned" (a learned
            per-position, per-channel log σ: z ~ N(0, diag σ²)).
        data_scale: s: the blocks see s·x for the zoo's model-space x ∈ [−0.5, 0.5)
            (logdet + D·ln s). 2 (default) is ml-tarflow's data range [−1, 1], so their
            weights and hyper-parameters carry over; a Decision (SPEC §6).
        num_classes: K > 0 makes the model class-conditional (a learned class embedding per
            block added to every token); 0 (default) is unconditional.
        class_dropout: p, classifier-free label dropout of a class-conditional model: ``fit``
            trains on each label replaced by the learned "no class" row K with probability p
            (ml-tarflow's ``drop_label``, 0.1 in its README), so ``generate(..., guidance=w)``
            can guide; 0: no "no class" row, no classifier-free guidance.
        log_scale_bound: c of every block's soft-capped log-scale, a = c·tanh(raw/c) where
            raw > 0 (raw ≤ 0 as it is): each inverse step amplifies by less than e^c for any
            input. None (the default: ml-tarflow's unbounded a) is what converted ml-tarflow
            weights and checkpoints written before the key existed load as; the zoo's presets
            set one. A Decision, see ``layers.tarflow``.
        head_bias_init: the blocks' output-head bias at init, "zero" (default: every block the
            identity) or "uniform" (PyTorch's U(±1/√width), drawn from the RNG that draws the
            other weights: ml-tarflow's init, so a seed gives ml-tarflow's initial weights).
        noise_std: σ of the Gaussian noise the checkpoint was trained with, in model-space
            units (0: uniform dequantisation, a likelihood checkpoint; > 0: a sample-quality
            checkpoint whose bits/dim is not a discrete-data bits/dim). Set by training
            (``TrainConfig.noise_std``); ``sample(..., denoise=True)`` takes its step with it.
    """

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 2
    width: int = 768
    num_blocks: int = 8
    layers_per_block: int = 8
    head_dim: int = 64
    expansion: int = 4
    affine: bool = True
    prior: str = "standard"
    data_scale: float = 2.0
    num_classes: int = 0
    class_dropout: float = 0.1
    log_scale_bound: float | None = None
    head_bias_init: str = "zero"
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` on values the architecture cannot take."""
        p = self.patch_size
        if p < 1 or self.image_size % p or (self.image_size // p) ** 2 < 2:
            raise ConfigError(f"patch_size {p} must divide image_size {self.image_size} into at "
                              "least 2 tokens")
        if min(self.in_channels, self.width, self.num_blocks, self.layers_per_block,
               self.expansion) < 1:
            raise ConfigError("in_channels, width, num_blocks, layers_per_block and expansion "
                              "must be at least 1")
        if self.head_dim < 1 or self.width % self.head_dim:
            raise ConfigError(f"head_dim {self.head_dim} must divide width {self.width}")
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if not (math.isfinite(self.data_scale) and self.data_scale > 0):
            raise ConfigError(f"data_scale must be a positive number, got {self.data_scale!r}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"num_classes must be ≥ 0 and class_dropout in [0, 1), got "
                              f"{self.num_classes} and {self.class_dropout!r}")
        check_bound("log_scale_bound", self.log_scale_bound)
        check_choice("head_bias_init", self.head_bias_init, HEAD_BIAS_INITS)
        check_noise_std(self.noise_std)

    @property
    def num_tokens(self) -> int:
        """T = (H/P)²."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """d = C·P²."""
        return self.in_channels * self.patch_size ** 2


class TarFlow(FlowModel):
    """x -> z = f_K ∘ … ∘ f_1(patchify(s·x)), each f_k a ``TarFlowBlock``; z ~ N(0, I) (or the
    learned diagonal prior).

    log p(x | y) = log N(z; 0, σ²) + Σ_k logdet_k + D·ln s.

    Latent layout: ``forward`` returns z of shape B×D, the tokens B×T×d flattened (token-major);
    ``inverse`` takes the same. ``encode_latents`` gives the one latent as an image-shaped
    B×C×H×W (``unpatchify``), so the latent tools (interpolation, reconstruction, the bits/dim
    split of ``inspect``) work as for the multi-scale models, with one level.

    Args:
        config: the architecture (``TarFlowConfig``).
    """

    def __init__(self, config: TarFlowConfig, *, preset: str | None = None) -> None:
        super().__init__(config, preset=preset)
        cfg = config
        self.blocks = nn.ModuleList(
            TarFlowBlock(cfg.token_dim, cfg.num_tokens, cfg.width, cfg.layers_per_block,
                         cfg.head_dim, cfg.expansion, reverse=k % 2 == 1, affine=cfg.affine,
                         log_scale_bound=cfg.log_scale_bound, head_bias_init=cfg.head_bias_init)
            for k in range(cfg.num_blocks))
        self.prior_log_std = (nn.Parameter(torch.zeros(cfg.num_tokens, cfg.token_dim))
                              if cfg.prior == "learned" else None)
        self.latent_shapes: list[tuple[int, int, int]] = [self.input_shape]
        self.class_embeddings = nn.ModuleList(
            ClassEmbedding(cfg.num_classes, cfg.width, null_class=cfg.class_dropout > 0)
            for _ in range(cfg.num_blocks)) if cfg.num_classes else None
        if self.class_embeddings is not None:
            for embedding in self.class_embeddings:  # ml-tarflow's scale (N(0, 0.01²))
                nn.init.normal_(embedding.table.weight, std=1e-2)

    # --- tokens -------------------------------------------------------------------------------
    def to_tokens(self, x: Tensor) -> Tensor:
        """Model-space images B×C×H×W -> the blocks' input tokens B×T×d (s·x, patchified)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"expected input B×{'×'.join(map(str, self.input_shape))}, got "
                             f"{tuple(x.shape)}")
        return patchify(x * self.config.data_scale, self.config.patch_size)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """The inverse of ``to_tokens``."""
        return unpatchify(tokens, self.input_shape, self.config.patch_size) \
            / self.config.data_scale

    def _tokens_of(self, z: Tensor) -> Tensor:
        cfg = self.config
        if z.dim() != 2 or z.shape[1] != cfg.num_tokens * cfg.token_dim:
            raise ShapeError(f"expected a latent of shape B×{cfg.num_tokens * cfg.token_dim}, "
                             f"got {tuple(z.shape)}")
        return z.view(-1, cfg.num_tokens, cfg.token_dim)

    def contexts(self, y: Tensor | int | None, batch: int) -> list[Tensor | None]:
        """Each block's context: its class embedding of labels y (B×W) for a class-conditional
        model (label K: the "no class" row), None for an unconditional one."""
        labels = self.check_labels(y, batch)
        if labels is None:
            return [None] * len(self.blocks)
        return [embedding(labels) for embedding in self.class_embeddings]

    # --- the flow -----------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """x -> (z tokens B×T×d, the flow's logdet (B,), D·ln s included)."""
        tokens = self.to_tokens(x)
        logdet = x.new_full((x.shape[0],), math.prod(self.input_shape)
                            * math.log(self.config.data_scale))
        for block, context in zip(self.blocks, self.contexts(y, x.shape[0]), strict=True):
            tokens, ld = block(tokens, context)
            logdet = logdet + ld
        return tokens, logdet

    def forward(self, x: Tensor, y: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """x (B×C×H×W in [−0.5, 0.5)) -> (z: B×D, logdet: (B,)); ``y``: labels of a
        class-conditional model."""
        tokens, logdet = self.encode(x, y)
        return tokens.flatten(1), logdet

    def decode(self, tokens: Tensor, y: Tensor | int | None = None, guidance: float = 0.0,
               attention_temperature: float = 1.0, annealed: bool = False) -> Tensor:
        """z tokens (B×T×d) -> x, the blocks inverted last first, token by token over one
        preallocated key/value cache (two with guidance) shared by the blocks."""
        n = tokens.shape[0]
        contexts = self.contexts(y, n)
        guides = self._guides(n, guidance, attention_temperature, annealed)
        cache = self.blocks[0].new_cache(n, tokens)
        guided_cache = cache.like() if any(g is not None for g in guides) else None
        for block, context, guide in zip(reversed(self.blocks), reversed(contexts),
                                         reversed(guides), strict=True):
            tokens = block.inverse(tokens, context, guide, cache, guided_cache)
        return self.from_tokens(tokens)

    def _guides(self, batch: int, weight: float, attention_temperature: float,
                annealed: bool) -> list[Guidance | None]:
        """Each block's ``Guidance`` (None everywhere without guidance): the unguided pass
        sees the "no class" embedding (class-conditional) and attention logits divided by
        ``attention_temperature``."""
        if weight == 0:
            return [None] * len(self.blocks)
        if not self.num_classes:
            if attention_temperature == 1.0:
                raise ConfigError("guidance of an unconditional TarFlow is attention-"
                                  "temperature guidance: give an attention_temperature other "
                                  "than 1 (the unguided pass divides its attention logits by "
                                  "it)")
            return [Guidance(weight, None, attention_temperature, annealed)
                    for _ in self.blocks]
        if self.null_class is None:
            raise ConfigError("classifier-free guidance needs a model trained with label "
                              "dropout (class_dropout > 0, which gives it a null class); "
                              "sample this one with guidance 0")
        null = self.contexts(null_labels(batch, self.null_class, self.device), batch)
        return [Guidance(weight, context, attention_temperature, annealed) for context in null]

    def inverse(self, z: Tensor, y: Tensor | int | None = None) -> Tensor:
        """z (B×D, the layout of ``forward``) -> x (B×C×H×W)."""
        return self.decode(self._tokens_of(z), y)

    # --- latents (one level) -----------------------------------------------------------------
    def encode_latents(self, x: Tensor, y: Tensor | int | None = None) -> list[Tensor]:
        """[z as an image B×C×H×W] (``unpatchify`` of the tokens; no data scale)."""
        tokens, _ = self.encode(x, y)
        return [unpatchify(tokens, self.input_shape, self.config.patch_size)]

    def decode_latents(self, latents: list[Tensor], y: Tensor | int | None = None) -> Tensor:
        """``encode_latents``' latent -> x."""
        self._check_latents(latents)
        return self.decode(patchify(latents[0], self.config.patch_size), y)

    def latent_priors(self, latents: list[Tensor], y: Tensor | int | None = None
                      ) -> list[tuple[Tensor, Tensor]]:
        """[(μ = 0, log σ)] of the latent, B×C×H×W each."""
        self._check_latents(latents)
        z = latents[0]
        log_std = self._prior_log_std_image(z)
        return [(torch.zeros_like(z), log_std.expand_as(z))]

    def unwhiten_latents(self, eps: list[Tensor], y: Tensor | int | None = None
                         ) -> list[Tensor]:
        """z = σ·ε."""
        self._check_latents(eps)
        return [eps[0] * torch.exp(self._prior_log_std_image(eps[0]))]

    def _prior_log_std_image(self, like: Tensor) -> Tensor:
        if self.prior_log_std is None:
            return torch.zeros_like(like[:1])
        return unpatchify(self.prior_log_std[None].to(like.dtype), self.input_shape,
                          self.config.patch_size)

    def _check_latents(self, latents: list[Tensor]) -> None:
        if len(latents) != 1 or tuple(latents[0].shape[1:]) != self.input_shape:
            shape = "×".join(map(str, self.input_shape))
            raise ShapeError(f"expected one latent of shape B×{shape}, got "
                             f"{[tuple(z.shape) for z in latents]}")

    # --- density and sampling ------------------------------------------------------------------
    def log_density(self, x: Tensor, y: Tensor | int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """log p(x | y) in nats, (B,), for x in [−0.5, 0.5)^D (exact; ``generator`` unused)."""
        tokens, logdet = self.encode(x, y)
        return diag_normal_logpdf(tokens, None, self.prior_log_std) + logdet

    @torch.no_grad()
    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, y: Tensor | int | None = None,
                 guidance: float = 0.0, *, attention_temperature: float = 1.0,
                 annealed: bool = False) -> Tensor:
        """x = f⁻¹(T·σ·ε), ε ~ N(0, I); B×C×H×W in model space.

        ``guidance`` w: classifier-free guidance of a class-conditional model (the unguided
        pass sees the "no class" embedding), attention-temperature guidance of an
        unconditional one (the unguided pass divides its attention logits by
        ``attention_temperature``); ``annealed`` ramps w linearly over the tokens (SPEC §6).
        """
        cfg = self.config
        ref = self.blocks[0].pos_embed
        eps = randn_like_on((num_samples, cfg.num_tokens, cfg.token_dim), ref, generator)
        z = temperature * eps
        if self.prior_log_std is not None:
            z = z * torch.exp(self.prior_log_std)
        return self.decode(z, y, guidance, attention_temperature, annealed)


# --- presets -----------------------------------------------------------------------------------
# ``tarflow_{dataset}`` are likelihood entries (uniform dequantisation, fp32: discrete-data
# bits/dim); ``tarflow_cond_{dataset}`` are class-conditional sample-quality entries (Gaussian
# noise augmentation, label dropout, guidance, denoising; their bits/dim is not comparable).
_TARFLOW_SOURCE = ("ml-tarflow (apple/ml-tarflow train.py and README): AdamW betas (0.9, 0.95), "
                   "weight decay 1e-4, lr 1e-4, linear warm-up over the first epoch then cosine "
                   "(their floor 1e-6; the zoo's cosine ends at 0), horizontal flips, no EMA; "
                   "ImageNet-64: batch 256, 100 epochs in fp32 with uniform dequantisation for "
                   "bits/dim, 200 epochs with Gaussian noise sigma = 0.05 on [-1, 1] (0.025 in "
                   "the zoo's model space) and bf16 for samples.")


def _adamw(name: str, *, source: str = _TARFLOW_SOURCE, **fields: object) -> Recipe:
    """A TarFlow recipe: ml-tarflow's optimizer and schedule, the entry's own sizes."""
    settings: dict[str, object] = dict(optimizer="adamw", betas=(0.9, 0.95), weight_decay=1e-4,
                                       lr=1e-4, schedule="cosine", max_shift=0, flip=True,
                                       ema_decay=None)
    settings.update(fields)
    return Recipe(name=name, source=source, **settings)  # type: ignore[arg-type]


TARFLOW_TINY_RECIPE = _adamw(
    "tarflow-tiny-test", source="test-size preset: a short run for the test suite, not for "
    "quality", lr=1e-3, warmup_images=160, batch_size=16, steps=100, flip=None,
    fid_num_samples=256)

#: The digits entry: the zoo's own sizes for a few CPU minutes (4,000 training digits).
TARFLOW_DIGITS_RECIPE = _adamw(
    "tarflow-digits", source="the zoo's own (no paper trains on these 4,000 digits): "
    "ml-tarflow's AdamW (0.9, 0.95), weight decay 1e-4, warm-up then cosine, at a lr and "
    "batch for a few CPU minutes; no flips on digits", dataset="digits", lr=1e-3,
    warmup_images=4_000, batch_size=32, steps=3_000, flip=False, fid_num_samples=None)

TARFLOW_CIFAR10_RECIPE = _adamw(
    "tarflow-cifar10", source=_TARFLOW_SOURCE + " CIFAR-10 (no official configuration; the "
    "zoo's): batch 256, 400 epochs (~20M images, as the zoo's other CIFAR-10 entries), warm-up "
    "over one epoch.", dataset="cifar10", warmup_images=50_000, batch_size=256, epochs=400)

TARFLOW_CIFAR10_SMALL_RECIPE = TARFLOW_CIFAR10_RECIPE.replace(
    name="tarflow-cifar10-small", lr=3e-4, epochs=100)

TARFLOW_IMAGENET64_RECIPE = _adamw(
    "tarflow-imagenet64", source=_TARFLOW_SOURCE + " This entry: the bits/dim run (uniform "
    "dequantisation, fp32, 100 epochs; the paper's 2.99 bits/dim).", dataset="imagenet64",
    warmup_images=1_281_167, batch_size=256, epochs=100)


#: What every zoo preset sets beyond ml-tarflow's architecture: a soft cap c = 4 on the blocks'
#: log-scales (every inverse step amplifies by less than e^4 ≈ 55, as the other families'
#: bounds). The head bias keeps the default zero init (every block the identity at init): with
#: the bound it trained better than ml-tarflow's (README, "TarFlow against the real ml-tarflow").
_ZOO_CHOICES: dict[str, object] = {"log_scale_bound": 4.0}


@register_model(TarFlow, recipe=TARFLOW_TINY_RECIPE)
def tarflow_tiny() -> TarFlowConfig:
    """TarFlow, tiny: 3×8×8, P=2 (16 tokens of 12), width 16, 2 blocks × 2 layers (tests)."""
    return TarFlowConfig(image_size=8, in_channels=3, patch_size=2, width=16, num_blocks=2,
                         layers_per_block=2, head_dim=8, expansion=2, **_ZOO_CHOICES)


@register_model(TarFlow, recipe=TARFLOW_DIGITS_RECIPE)
def tarflow_digits() -> TarFlowConfig:
    """TarFlow on the embedded digits 1×32×32: P=4 (64 tokens), width 128, 4 blocks × 2 layers."""
    return TarFlowConfig(image_size=32, in_channels=1, patch_size=4, width=128, num_blocks=4,
                         layers_per_block=2, head_dim=32, **_ZOO_CHOICES)


@register_model(TarFlow, recipe=TARFLOW_CIFAR10_SMALL_RECIPE)
def tarflow_cifar10_small() -> TarFlowConfig:
    """TarFlow on CIFAR-10 32×32, small: P=2 (256 tokens), width 256, 4 blocks × 4 layers."""
    return TarFlowConfig(image_size=32, in_channels=3, patch_size=2, width=256, num_blocks=4,
                         layers_per_block=4, **_ZOO_CHOICES)


@register_model(TarFlow, recipe=TARFLOW_CIFAR10_RECIPE)
def tarflow_cifar10() -> TarFlowConfig:
    """TarFlow on CIFAR-10 32×32: the paper's ImageNet-64 shape (P=2, width 768, 8 × 8)."""
    return TarFlowConfig(image_size=32, in_channels=3, patch_size=2, width=768, num_blocks=8,
                         layers_per_block=8, **_ZOO_CHOICES)


@register_model(TarFlow, recipe=TARFLOW_IMAGENET64_RECIPE)
def tarflow_imagenet64() -> TarFlowConfig:
    """TarFlow on ImageNet 64×64 (the paper's bits/dim model): P=2, width 768, 8 blocks × 8."""
    return TarFlowConfig(image_size=64, in_channels=3, patch_size=2, width=768, num_blocks=8,
                         layers_per_block=8, **_ZOO_CHOICES)


# Class-conditional sample-quality entries: Gaussian noise augmentation (in the zoo's model
# space, half ml-tarflow's number), 10 % label dropout to the "no class" row, bf16 as
# ml-tarflow trains its noise models; sample with guidance and denoising.
TARFLOW_COND_DIGITS_RECIPE = TARFLOW_DIGITS_RECIPE.replace(
    name="tarflow-cond-digits", noise_std=0.05,
    source="the zoo's digits recipe (see tarflow-digits) with ml-tarflow's MNIST notebook "
           "noise (train_local.ipynb: sigma = 0.1 on [-1, 1], 0.05 in model space) and 10 % "
           "label dropout: a sample-quality recipe")

TARFLOW_COND_CIFAR10_RECIPE = TARFLOW_CIFAR10_RECIPE.replace(
    name="tarflow-cond-cifar10", noise_std=0.025, precision="bf16",
    source=_TARFLOW_SOURCE + " CIFAR-10 (no official configuration; the zoo's): ml-tarflow's "
    "ImageNet-64 noise (0.05 on [-1, 1]) and bf16, 10 % label dropout, batch 256, 400 epochs.")

TARFLOW_COND_IMAGENET64_RECIPE = TARFLOW_IMAGENET64_RECIPE.replace(
    name="tarflow-cond-imagenet64", noise_std=0.025, precision="bf16", epochs=200,
    source=_TARFLOW_SOURCE + " This entry: the class-conditional sample-quality run (noise "
    "0.05 on [-1, 1], bf16, 10 % label dropout, 200 epochs; the paper's FID 2.90 with "
    "guidance).")


@register_model(TarFlow, recipe=TARFLOW_TINY_RECIPE)
def tarflow_cond_tiny() -> TarFlowConfig:
    """Class-conditional TarFlow (3 classes, 10 % label dropout), tiny: 3×8×8, P=2 (tests)."""
    return replace(tarflow_tiny(), num_classes=3)


@register_model(TarFlow, recipe=TARFLOW_COND_DIGITS_RECIPE)
def tarflow_cond_digits() -> TarFlowConfig:
    """Class-conditional TarFlow on the embedded digits (10 classes): tarflow_digits' shape."""
    return replace(tarflow_digits(), num_classes=10)


@register_model(TarFlow, recipe=TARFLOW_COND_CIFAR10_RECIPE)
def tarflow_cond_cifar10() -> TarFlowConfig:
    """Class-conditional TarFlow on CIFAR-10 (10 classes): P=2, width 768, 8 × 8."""
    return replace(tarflow_cifar10(), num_classes=10)


@register_model(TarFlow, recipe=TARFLOW_COND_IMAGENET64_RECIPE)
def tarflow_cond_imagenet64() -> TarFlowConfig:
    """Class-conditional TarFlow on ImageNet 64×64 (1000 classes; the paper's FID 2.90 model)."""
    return replace(tarflow_imagenet64(), num_classes=1000)
