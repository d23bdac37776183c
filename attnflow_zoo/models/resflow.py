"""i-ResNet density model with residual invertible attention (Zha et al. 2021, SPEC §2.5).

Backbone: Behrmann et al. 2019 ("Invertible Residual Networks", arXiv 1811.00995), as used by
Schwartz-Zha/InvertibleAttention-iResNet: initial squeeze, scales of (ActNorm → residual block)
with a half of the channels factored out after every scale but the last, a learned diagonal
Gaussian prior, and one residual attention layer after the blocks of the first scale.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import diag_normal_logpdf, randn_like_on
from ..errors import ConfigError, ShapeError
from ..layers.normalization import ActNorm
from ..layers.reshape import Squeeze, merge_channels, split_channels
from ..layers.residual import ResidualLayer
from ..layers.residual_attention import KINDS, ResidualAttention
from ..layers.spectral import SNConv1x1, SNConv2d
from ..logdet_estimators import cpu_twin
from ..registry import TINY_RECIPE, Recipe, register_model
from .base import FlowModel, check_noise_std, image_hw


@dataclass(frozen=True)
class ResFlowConfig:
    """i-ResNet + residual attention.

    Attributes:
        in_channels, image_size: the images (int for square, (H, W) otherwise; H and W must be
            divisible by 2^num_scales).
        num_scales, blocks_per_scale, hidden_channels: 3, 16, 512 on CIFAR-10 (the paper).
        coeff: soft spectral-norm target c of the block convolutions (0.9).
        attention: dot | embedded | gaussian | concat | none, after the first scale's blocks.
        attention_lipschitz: "certified" (Lip(g) ≤ 0.9 on every input, so the block inverts and
            its log-det series converges) or "faithful" (the published branch, for
            reproduction: at random initialisation dot and concat are not contractive, and a
            density model built with them is not invertible); see ``ResidualAttention``.
        logdet: "series" (the paper: power series, biased), "roulette" (unbiased) or "exact"
            (brute-force Jacobians; tests / tiny models).
        num_series_terms, num_probes: of the estimators (5 terms, 1 probe).
        inverse_max_iter, inverse_tol: of every fixed-point inverse (100 iterations).
        num_power_iterations: of the spectral normalisation (5).
        noise_std: σ of the Gaussian noise the checkpoint was trained with (``FlowModel``'s
            ``noise_std``; 0: uniform dequantisation). Set by training.
    """

    in_channels: int = 3
    image_size: int | tuple[int, int] = 32
    num_scales: int = 3
    blocks_per_scale: int = 16
    hidden_channels: int = 512
    coeff: float = 0.9
    attention: str = "concat"
    attention_lipschitz: str = "certified"
    logdet: str = "series"
    num_series_terms: int = 5
    num_probes: int = 1
    inverse_max_iter: int = 100
    inverse_tol: float = 1e-6
    num_power_iterations: int = 5
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        check_noise_std(self.noise_std)
        if not isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", image_hw(self.image_size))


class ConvResidualBlock(ResidualLayer):
    """i-ResNet block y = x + g(x), g = [ELU →] SNConv3×3 → ELU → SNConv1×1 → ELU → SNConv3×3.

    Each convolution is softly spectrally normalised to c (the 3×3 ones as operators on
    C×H×W inputs), so Lip(g) ≤ c³ < 1 (up to the power-iteration estimate of σ).
    """

    def __init__(self, channels: int, hidden_channels: int, input_size: tuple[int, int],
                 coeff: float = 0.9, input_nonlin: bool = True, num_power_iterations: int = 5,
                 **residual_kwargs: object) -> None:
        super().__init__(**residual_kwargs)  # type: ignore[arg-type]
        sn = {"coeff": coeff, "num_power_iterations": num_power_iterations}
        self.input_nonlin = input_nonlin
        self.conv1 = SNConv2d(channels, hidden_channels, 3, input_size, **sn)
        self.conv2 = SNConv1x1(hidden_channels, hidden_channels, **sn)
        self.conv3 = SNConv2d(hidden_channels, channels, 3, input_size, **sn)

    def branch(self, x: Tensor) -> Tensor:
        h = F.elu(x) if self.input_nonlin else x
        h = F.elu(self.conv1(h))
        h = F.elu(self.conv2(h))
        return self.conv3(h)


class ResFlow(FlowModel):
    """i-ResNet density model with residual attention (Zha et al. 2021; Behrmann et al. 2019).

    x (B×C×H×W) → squeeze₂ → for each scale s: [squeeze₂ if s > 0] → blocks_per_scale ×
    (ActNorm → ConvResidualBlock) → [ResidualAttention if s = 0] → [split: half of the
    channels to z if s < last]. z (B×D, D = C·H·W) is the concatenation of the factored-out
    latents and the last activation; p(z) = N(μ, diag σ²) with learned μ, log σ.
    """

    def __init__(self, config: ResFlowConfig, *, preset: str | None = None) -> None:
        super().__init__(config, preset=preset)
        if config.attention not in (*KINDS, "none"):
            raise ConfigError(f"attention must be one of {', '.join(KINDS)} or none, "
                              f"got {config.attention!r}")
        c, h, w = self.input_shape
        factor = 2 ** config.num_scales
        if h % factor or w % factor:
            raise ConfigError(f"image size {h}×{w} must be divisible by 2^num_scales = {factor}")
        residual = {"logdet": config.logdet, "num_series_terms": config.num_series_terms,
                    "num_probes": config.num_probes, "inverse_max_iter": config.inverse_max_iter,
                    "inverse_tol": config.inverse_tol}
        self.squeeze = Squeeze(2)
        c, h, w = 4 * c, h // 2, w // 2
        self.scales = nn.ModuleList()
        self.attention: ResidualAttention | None = None
        self.latent_shapes: list[tuple[int, int, int]] = []
        for s in range(config.num_scales):
            if s > 0:
                c, h, w = 4 * c, h // 2, w // 2
            layers = nn.ModuleList()
            for b in range(config.blocks_per_scale):
                layers.append(ActNorm(c))
                layers.append(ConvResidualBlock(
                    c, config.hidden_channels, (h, w), config.coeff,
                    input_nonlin=not (s == 0 and b == 0),
                    num_power_iterations=config.num_power_iterations, **residual))
            self.scales.append(layers)
            if s == 0 and config.attention != "none":
                self.attention = ResidualAttention(
                    c, config.attention, lipschitz=config.attention_lipschitz,
                    num_power_iterations=config.num_power_iterations, **residual)
            if s < config.num_scales - 1:
                self.latent_shapes.append((c // 2, h, w))
                c = c - c // 2
        self.latent_shapes.append((c, h, w))
        dim = math.prod(self.input_shape)
        self.prior_mean = nn.Parameter(torch.zeros(dim))
        self.prior_log_std = nn.Parameter(torch.zeros(dim))

    def _scale_layers(self, s: int) -> list[nn.Module]:
        layers = list(self.scales[s])
        if s == 0 and self.attention is not None:
            layers.append(self.attention)
        return layers

    def _run(self, x: Tensor, with_logdet: bool, generator: torch.Generator | None = None
             ) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"ResFlow expects B×{'×'.join(map(str, self.input_shape))}, "
                             f"got {tuple(x.shape)}")
        logdet = x.new_zeros(x.shape[0])
        # One CPU twin per call draws every roulette term count (no device sync, and the same
        # generator gives the same counts).
        counts = cpu_twin(generator)
        h, _ = self.squeeze(x)
        latents = []
        for s in range(len(self.scales)):
            if s > 0:
                h, _ = self.squeeze(h)
            for layer in self._scale_layers(s):
                if isinstance(layer, ActNorm):
                    h, ld = layer(h)
                    logdet = logdet + ld
                elif with_logdet:
                    h, ld = layer(h, generator=generator, count_generator=counts)
                    logdet = logdet + ld
                else:
                    h = layer.residual(h)
            if s < len(self.scales) - 1:
                h, z2 = split_channels(h)
                latents.append(z2.flatten(1))
        latents.append(h.flatten(1))
        return torch.cat(latents, 1), logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, logdet): z is B×D, logdet (B,) from the configured estimator."""
        return self._run(x, with_logdet=True)

    def latent(self, x: Tensor) -> Tensor:
        """z alone (no log-determinant work): for brute-force checks and encoding."""
        return self._run(x, with_logdet=False)[0]

    def inverse(self, z: Tensor) -> Tensor:
        """x from z (B×D): every residual layer by its fixed-point inverse."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        parts = list(torch.split(z, sizes, dim=1))
        h = parts[-1].reshape(-1, *self.latent_shapes[-1])
        for s in reversed(range(len(self.scales))):
            if s < len(self.scales) - 1:
                h = merge_channels(h, parts[s].reshape(-1, *self.latent_shapes[s]))
            for layer in reversed(self._scale_layers(s)):
                h = layer.inverse(h)
            if s > 0:
                h = self.squeeze.inverse(h)
        return self.squeeze.inverse(h)

    # --- per-level latents (``evaluation.latents``) ----------------------------------------------
    def encode_latents(self, x: Tensor, y: Tensor | int | None = None) -> list[Tensor]:
        """x -> every latent, one tensor per scale in scale order (the factored-out halves,
        then the last activation), of shapes B×``latent_shapes[s]``; their flattened
        concatenation is ``forward``'s z. Unconditional (``y`` must be None)."""
        self.check_labels(y, x.shape[0])
        return self._unflatten(self.latent(x))

    def decode_latents(self, latents: list[Tensor], y: Tensor | int | None = None) -> Tensor:
        """``encode_latents``' latents -> x by the fixed-point inverses (so the round trip is
        exact to ``inverse_tol``, not to float rounding)."""
        self._unflatten_check(latents)
        self.check_labels(y, latents[0].shape[0])
        return self.inverse(torch.cat([z.flatten(1) for z in latents], 1))

    def latent_priors(self, latents: list[Tensor], y: Tensor | int | None = None
                      ) -> list[tuple[Tensor, Tensor]]:
        """Per scale, the prior's (μ_s, log σ_s), B×``latent_shapes[s]`` each (the learned
        diagonal Gaussian: the same for every image and independent of the other scales)."""
        self._unflatten_check(latents)
        b = latents[0].shape[0]
        means = self._unflatten(self.prior_mean.expand(b, -1))
        log_stds = self._unflatten(self.prior_log_std.expand(b, -1))
        return list(zip(means, log_stds, strict=True))

    def unwhiten_latents(self, eps: list[Tensor], y: Tensor | int | None = None
                         ) -> list[Tensor]:
        """Whitened latents ε_s -> z_s = μ_s + σ_s·ε_s."""
        return [m + torch.exp(ls) * e for (m, ls), e in
                zip(self.latent_priors(eps, y), eps, strict=True)]

    def _unflatten(self, z: Tensor) -> list[Tensor]:
        sizes = [math.prod(s) for s in self.latent_shapes]
        return [p.reshape(-1, *s) for p, s in
                zip(torch.split(z, sizes, 1), self.latent_shapes, strict=True)]

    def _unflatten_check(self, latents: list[Tensor]) -> None:
        if len(latents) != len(self.latent_shapes) or any(
                tuple(z.shape[1:]) != s for z, s in zip(latents, self.latent_shapes, strict=False)):
            raise ShapeError(f"expected {len(self.latent_shapes)} latents of shapes B×C×H×W with "
                             f"(C, H, W) = {self.latent_shapes}, got "
                             f"{[tuple(z.shape) for z in latents]}")

    def log_density(self, x: Tensor, y: Tensor | int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """log p(x) = log N(z; μ, σ²) + log det(∂z/∂x), (B,) nats. ``generator`` draws the
        log-determinant estimators' probes and term counts (None: the global RNG); the model is
        unconditional (``y`` must be None)."""
        self.check_labels(y, x.shape[0])
        z, logdet = self._run(x, with_logdet=True, generator=generator)
        return diag_normal_logpdf(z, self.prior_mean, self.prior_log_std) + logdet

    @torch.no_grad()
    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None,
                 y: Tensor | int | None = None) -> Tensor:
        """x = f⁻¹(μ + T·σ·ε), ε ~ N(0, I) (unconditional: ``y`` must be None)."""
        self.check_labels(y, num_samples)
        eps = randn_like_on((num_samples, self.prior_mean.numel()), self.prior_mean, generator)
        z = self.prior_mean + temperature * torch.exp(self.prior_log_std) * eps
        return self.inverse(z)


# --- presets ---------------------------------------------------------------------------------
#: Zha et al.'s InvertibleAttention-iResNet CIFAR_main.py (i-ResNet's defaults; SPEC §2.5).
IRESNET_RECIPE = Recipe(
    name="iresnet-zha-cifar10", dataset="cifar10", lr=3e-3, warmup_images=50_000, batch_size=64,
    epochs=200, max_shift=4, ema_decay=None,
    source="Zha et al., InvertibleAttention-iResNet CIFAR_main.py (i-ResNet defaults): Adamax "
           "3e-3, batch 64, 200 epochs, warm-up 1 epoch, pad 4 + random crop + flip, no EMA. "
           "Zoo deviation: the shift pads with edge values (the original reflects).")


@register_model(ResFlow, recipe=IRESNET_RECIPE)
def resflow_concat_cifar10() -> ResFlowConfig:
    """i-ResNet (3×16 blocks, 512 channels) + concat residual attention, CIFAR-10 (Zha et al.)."""
    return ResFlowConfig(attention="concat", attention_lipschitz="certified")


@register_model(ResFlow, recipe=IRESNET_RECIPE)
def resflow_dot_cifar10() -> ResFlowConfig:
    """i-ResNet (3×16 blocks, 512 channels) + dot residual attention, CIFAR-10 (Zha et al.)."""
    return ResFlowConfig(attention="dot", attention_lipschitz="certified")


@register_model(ResFlow, recipe=TINY_RECIPE)
def resflow_concat_tiny() -> ResFlowConfig:
    """Tiny i-ResNet + certified concat attention (3×8×8, 2×1 blocks), exact logdet, for tests."""
    return ResFlowConfig(image_size=8, num_scales=2, blocks_per_scale=1, hidden_channels=8,
                         attention="concat", attention_lipschitz="certified", logdet="exact")


@register_model(ResFlow, recipe=TINY_RECIPE)
def resflow_dot_tiny() -> ResFlowConfig:
    """Tiny i-ResNet + certified dot attention (3×8×8, 2×1 blocks), exact logdet, for tests."""
    return ResFlowConfig(image_size=8, num_scales=2, blocks_per_scale=1, hidden_channels=8,
                         attention="dot", attention_lipschitz="certified", logdet="exact")
