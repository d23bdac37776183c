"""The model of the "validating invertibility" experiment of Zha et al. 2021 (SPEC §2.4).

Model: squeeze(2) + ONE residual attention layer, y = s(x) + g(s(x)). It is trained to map
images to a fixed random target (MSE), then the test images are recovered from their outputs
by the fixed-point inverse (the experiment runner is ``workflows.validation``). It is a check
of the attention's invertibility, not a density model.
"""


from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..layers.reshape import Squeeze
from ..layers.residual import InverseInfo
from ..layers.residual_attention import KINDS, ResidualAttention
from ..registry import Recipe, register_preset
from .base import ZooModel, image_hw


@dataclass(frozen=True)
class InvertibilityValidatorConfig:
    """Squeeze(2) + one ``ResidualAttention`` on C×H×W images (H, W even; any size).

    Attributes:
        kind: dot | embedded | gaussian | concat.
        lipschitz: "faithful" (the paper's layer) or "certified" (provably contractive).
        gate: "conv" | "gamma" | None (None: the validation code's choice, gamma for gaussian).
        in_channels, image_size: the images (int for square, (H, W) otherwise).
        reduction: q/k channels = 4·in_channels / reduction.
        inverse_max_iter, inverse_tol: the fixed-point inverse (50 iterations in the paper).
        num_power_iterations: of the spectral normalisation (5 in the paper).
    """

    kind: str = "dot"
    lipschitz: str = "faithful"
    gate: str | None = None
    in_channels: int = 3
    image_size: int | tuple[int, int] = 32
    reduction: int = 4
    inverse_max_iter: int = 50
    inverse_tol: float = 1e-6
    num_power_iterations: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", image_hw(self.image_size))


class InvertibilityValidator(ZooModel):
    """x ↦ y = u + g(u), u = squeeze₂(x): B×C×H×W -> B×4C×(H/2)×(W/2) (Zha et al. §5.1).

    ``inverse`` runs the attention's fixed-point inverse then un-squeezes; ``inverse_with_info``
    also returns what the iteration achieved. ``jacobian_norm`` measures ‖J_g‖₂ per image by
    power iteration.
    """

    #: It takes no labels (every zoo model says how many classes it is conditioned on).
    num_classes = 0

    def __init__(self, config: InvertibilityValidatorConfig, *, preset: str | None = None
                 ) -> None:
        super().__init__(config, preset=preset)
        if config.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {config.kind!r}")
        self.squeeze = Squeeze(2)
        self.attention = ResidualAttention(
            4 * config.in_channels, config.kind, lipschitz=config.lipschitz, gate=config.gate,
            reduction=config.reduction, num_power_iterations=config.num_power_iterations,
            inverse_max_iter=config.inverse_max_iter, inverse_tol=config.inverse_tol)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes."""
        return (self.config.in_channels, *image_hw(self.config.image_size))

    def forward(self, x: Tensor) -> Tensor:
        """y = u + g(u), u = squeeze₂(x)."""
        u, _ = self.squeeze(x)
        return self.attention.residual(u)

    def inverse(self, y: Tensor, max_iter: int | None = None, tol: float | None = None,
                init: Tensor | None = None) -> Tensor:
        """x from y by fixed-point iteration (``inverse_with_info`` without its record)."""
        return self.inverse_with_info(y, max_iter, tol, init)[0]

    def inverse_with_info(self, y: Tensor, max_iter: int | None = None,
                          tol: float | None = None, init: Tensor | None = None
                          ) -> tuple[Tensor, InverseInfo]:
        """(x, iterations, residual and convergence of the run): x from y by fixed-point
        iteration (defaults from the config); ``init`` (an image batch like x) continues an
        earlier run instead of starting at x_0 = y."""
        init_u = None if init is None else self.squeeze(init)[0]
        u, info = self.attention.inverse_with_info(y, max_iter=max_iter, tol=tol, init=init_u)
        return self.squeeze.inverse(u), info

    def jacobian_norm(self, x: Tensor, num_iterations: int = 20,
                      generator: torch.Generator | None = None) -> Tensor:
        """Per-image ‖J_g‖₂ of the attention branch at squeeze₂(x), shape (B,)."""
        return self.attention.jacobian_norm(self.squeeze(x)[0], num_iterations, generator)


# --- presets ---------------------------------------------------------------------------------
_SIZES = {
    "cifar10": ("CIFAR-10 32×32", 32),
    "svhn": ("SVHN 32×32", 32),
    "celeba": ("CelebA center-cropped 178, resized to 32×32", 32),
    "celeba_fullscale": ("CelebA at full 218×178", (218, 178)),
}
_SOURCE = ("Zha et al., InvertibleAttention (SPEC 2.4): MSE to one fixed N(0, 1) target, Adam "
           "3e-3, batch 64, 100 epochs on the first 1000 training images; the first 1000 test "
           "images inverted with 10 / 50 / 100 fixed-point iterations (MSE, PSNR).")


def _recipe(dataset: str) -> Recipe:
    full = dataset.endswith("fullscale")  # full-size CelebA: batch 1 for one epoch
    return Recipe(name=f"zha-validation-{dataset.replace('_', '-')}", source=_SOURCE,
                  task="invertibility", dataset=dataset.split("_")[0], optimizer="adam",
                  lr=3e-3, warmup_images=0, batch_size=1 if full else 64,
                  epochs=1 if full else 100, max_shift=0, flip=False, ema_decay=None,
                  train_limit=1000, fid_num_samples=None)


def _preset(name: str, kind: str, dataset: str) -> None:
    desc, size = _SIZES[dataset]
    register_preset(name, InvertibilityValidator,
                    InvertibilityValidatorConfig(kind=kind, image_size=size),
                    f"Invertibility check (Zha et al.): squeeze + {kind} residual attention, "
                    f"{desc}.", recipe=_recipe(dataset))


def _tiny(name: str, kind: str) -> None:
    register_preset(name, InvertibilityValidator,
                    InvertibilityValidatorConfig(kind=kind, lipschitz="certified", in_channels=1,
                                                 image_size=8),
                    f"Tiny certified {kind} invertibility validator (1×8×8) for tests.",
                    recipe=Recipe(name="tiny-validation", source="test-size preset",
                                  task="invertibility", optimizer="adam", lr=3e-3,
                                  warmup_images=0, batch_size=16, epochs=2, max_shift=0,
                                  flip=False, ema_decay=None, train_limit=64,
                                  fid_num_samples=None))


_preset("validator_dot_cifar10", "dot", "cifar10")
_preset("validator_dot_svhn", "dot", "svhn")
_preset("validator_dot_celeba", "dot", "celeba")
_preset("validator_dot_celeba_fullscale", "dot", "celeba_fullscale")
_preset("validator_embedded_cifar10", "embedded", "cifar10")
_preset("validator_embedded_svhn", "embedded", "svhn")
_preset("validator_embedded_celeba", "embedded", "celeba")
_preset("validator_embedded_celeba_fullscale", "embedded", "celeba_fullscale")
_preset("validator_gaussian_cifar10", "gaussian", "cifar10")
_preset("validator_gaussian_svhn", "gaussian", "svhn")
_preset("validator_gaussian_celeba", "gaussian", "celeba")
_preset("validator_gaussian_celeba_fullscale", "gaussian", "celeba_fullscale")
_preset("validator_concat_cifar10", "concat", "cifar10")
_preset("validator_concat_svhn", "concat", "svhn")
_preset("validator_concat_celeba", "concat", "celeba")
_preset("validator_concat_celeba_fullscale", "concat", "celeba_fullscale")
_tiny("validator_dot_tiny", "dot")
_tiny("validator_embedded_tiny", "embedded")
_tiny("validator_gaussian_tiny", "gaussian")
_tiny("validator_concat_tiny", "concat")
