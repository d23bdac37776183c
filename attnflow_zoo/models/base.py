"""``FlowModel``: the base of every zoo density model (an 8-bit image model on the Hub)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import metrics
from ..core import initialize_from_data
from ..data import quantize
from ..errors import ConfigError, ShapeError, check_positive_int
from ..hub import ZooHubMixin
from .conditioning import balanced_labels


def image_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(H, W) of a config's ``image_size``: an int for square images or an (H, W) pair."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class ZooModel(nn.Module, ZooHubMixin):
    """A zoo model: a module built from one config dataclass and, when the zoo built it, the
    name of its preset.

    ``ZooModel(config, preset=None)``: ``preset`` is the zoo entry the model is built from
    (``factory.create_model`` gives it; loading gives the checkpoint's, from its
    ``config.json``) and is saved with the model. A subclass takes ``(config, *, preset=None)``
    and passes both on.
    """

    def __init__(self, config: object, *, preset: str | None = None) -> None:
        super().__init__()
        self.config = config
        self._preset = preset

    @property
    def zoo_preset(self) -> str | None:
        """The zoo entry the model was built from; None: built from a bare config. Fixed at
        construction (the checkpoint it saves names the same model card)."""
        return self._preset


class FlowModel(ZooModel):
    """Base of every zoo density model: an 8-bit image model on the Hub.

    The model's input space is x = x̃ − 0.5 ∈ [−0.5, 0.5) where x̃ ∈ [0, 1)^D is the uniformly
    dequantised image (``quantize.to_model_space``). The shift has a unit Jacobian, so the density
    of x equals the density of x̃.

    Subclasses take one frozen config dataclass (annotate the ``config`` argument with its type
    so the Hub mixin can rebuild it from ``config.json``) with ``image_size`` and
    ``in_channels``, and the preset's name (``ZooModel``), and implement:

    - ``forward(x) -> (z, logdet)`` and ``inverse(z) -> x`` over the whole model, with the
      factored-out latents kept in ``z`` so that ``inverse(forward(x)[0]) == x``;
    - ``log_density(x, y=None, generator=None) -> (B,)``: log p(x | y) in nats for x in the
      model's input space (``generator`` feeds stochastic log-determinant estimators, if the
      model has any);
    - ``generate(num_samples, temperature, generator, y=None) -> x`` in the model's input space;
      a family with guidance takes ``guidance=w`` (and its own keyword options) too.

    Labels ``y``: a class-conditional model (``config.num_classes`` = K > 0) takes the class of
    each image, a (B,) integer tensor in 0..K−1 (or one int for the whole batch), in every call
    that computes a density or draws a sample; an unconditional model takes none
    (``check_labels``). Pass ``generator`` by keyword.
    """

    config: object

    # --- to implement --------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def log_density(self, x: Tensor, y: Tensor | int | None = None,
                    generator: torch.Generator | None = None
                    ) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None,
                 y: Tensor | int | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def noise_std(self) -> float:
        """σ of the Gaussian noise the checkpoint was trained on, x = x_bin + σ·ε in model
        space (``config.noise_std``, recorded by training); 0: uniform dequantisation, a
        likelihood checkpoint whose bits/dim is a discrete-data bits/dim."""
        return float(getattr(self.config, "noise_std", 0.0) or 0.0)

    def record_noise_std(self, noise_std: float) -> None:
        """Record the training noise σ in the model's config (what ``fit`` does), so that a
        saved checkpoint says which kind it is. ``ConfigError`` for σ > 0 on a config without a
        ``noise_std`` field (it could not be saved)."""
        check_noise_std(noise_std)
        if noise_std == self.noise_std:
            return
        if not any(f.name == "noise_std" for f in dataclasses.fields(self.config)):
            raise ConfigError(f"{type(self.config).__name__} has no noise_std field to record "
                              "the training noise in; train it with noise_std = 0")
        self.config = dataclasses.replace(self.config, noise_std=float(noise_std))

    # --- shared ----------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes."""
        h, w = image_hw(self.config.image_size)  # type: ignore[attr-defined]
        return (self.config.in_channels, h, w)  # type: ignore[attr-defined]

    @property
    def num_classes(self) -> int:
        """K of a class-conditional model (labels 0..K−1); 0 for an unconditional one."""
        return int(getattr(self.config, "num_classes", 0) or 0)

    @property
    def null_class(self) -> int | None:
        """K, the learned "no class" label of a class-conditional model trained with label
        dropout (config ``class_dropout`` > 0; it takes labels 0..K, K meaning p(x)), else
        None."""
        k = self.num_classes
        return k if k and float(getattr(self.config, "class_dropout", 0.0) or 0.0) > 0 else None

    def check_labels(self, y: Tensor | int | None, batch: int) -> Tensor | None:
        """The labels of a batch of ``batch`` images as a (B,) int64 tensor on the model's
        device; None for an unconditional model. An int labels the whole batch.

        ``ConfigError`` for labels given to an unconditional model or missing for a conditional
        one; ``ShapeError`` for labels of another shape, a non-integer dtype or (CPU labels)
        outside 0..K−1. Labels already on an accelerator are not range-checked here (that would
        wait for the device); ``fit`` checks a dataset's labels once, on the CPU.
        """
        if isinstance(y, torch.Generator):
            raise TypeError("the second positional argument is the labels y: pass the "
                            "generator by keyword (generator=g)")
        k = self.num_classes
        if k == 0:
            if y is not None:
                raise ConfigError("this model is unconditional (num_classes = 0): call it "
                                  "without labels, or build a class-conditional model "
                                  "(num_classes > 0)")
            return None
        if y is None:
            raise ConfigError(f"this model is class-conditional ({k} classes): pass the labels "
                              f"y, a (B,) tensor of integers in 0..{k - 1} (or one int)")
        y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ShapeError(f"labels must be integers in 0..{k - 1}, got dtype {y.dtype}")
        if y.dim() == 0:
            y = y.expand(batch)
        if tuple(y.shape) != (batch,):
            raise ShapeError(f"expected one label per image, shape ({batch},), got "
                             f"{tuple(y.shape)}")
        top = k if self.null_class is None else k + 1
        if y.device.type == "cpu" and batch and not bool(((y >= 0) & (y < top)).all()):
            null = "" if top == k else f", or {k}: the null class"
            raise ShapeError(f"labels must lie in 0..{k - 1} (the model's {k} classes{null}), "
                             f"got {int(y.min())}..{int(y.max())}")
        return y.to(self.device, torch.long)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters()), torch.float32)

    def check_images(self, x_u8: Tensor) -> None:
        """Raise ``ShapeError`` unless x_u8 is a uint8 B×C×H×W batch of the model's shape."""
        if x_u8.dim() != 4 or tuple(x_u8.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"expected images of shape B×{'×'.join(map(str, self.input_shape))}, got "
                f"{tuple(x_u8.shape)}; resize/crop the data or create the model with a matching "
                "image_size / in_channels"
            )
        if x_u8.dtype != torch.uint8:
            raise ShapeError(f"expected uint8 images (0..255), got {x_u8.dtype}; pass the raw "
                             "8-bit images (e.g. `(x * 255).round().to(torch.uint8)` for floats "
                             "in [0, 1])")

    def to_model_space(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x = dequantize(x_u8) − 0.5 on the model's device and in its dtype (so a float64 model
        gets float64 inputs); see ``quantize.to_model_space``."""
        self.check_images(x_u8)
        return quantize.to_model_space(x_u8.to(self.device), generator, self.dtype)

    def initialize_from_data(self, x_u8: Tensor, generator: torch.Generator | None = None,
                             y: Tensor | int | None = None) -> int:
        """The explicit data-dependent initialisation pass (ActNorm) on a batch of uint8 images
        (and their labels, for a class-conditional model); returns how many modules it
        initialised (0 for a model already initialised or loaded). ``fit`` runs it on the first
        training batch."""
        was_training = self.training
        self.train()
        try:
            x = self.to_model_space(x_u8, generator)
            return initialize_from_data(self, lambda: self.log_density(x, y, generator=generator))
        finally:
            self.train(was_training)

    def log_prob(self, x_u8: Tensor, y: Tensor | int | None = None,
                 generator: torch.Generator | None = None, *, grad: bool = False) -> Tensor:
        """log p(x̃ | y) in nats, (B,), of the uniformly dequantised x̃ ∈ [0, 1)^D of uint8
        images (y: the labels of a class-conditional model, else None).

        A score: it runs without the autograd graph (``grad=True`` keeps it, e.g. to take
        gradients of a score). Training differentiates ``log_density``, which always keeps it.
        """
        with torch.set_grad_enabled(grad):
            return self.log_density(self.to_model_space(x_u8, generator), y, generator=generator)

    def bits_per_dim(self, x_u8: Tensor, y: Tensor | int | None = None,
                     generator: torch.Generator | None = None, *, grad: bool = False) -> Tensor:
        """Bits/dim per image, (B,); single-sample dequantisation estimate (SPEC §4). Without
        the autograd graph unless ``grad=True`` (see ``log_prob``)."""
        return metrics.bits_per_dim(self.log_prob(x_u8, y, generator=generator, grad=grad),
                                    math.prod(self.input_shape))

    def default_labels(self, num_samples: int, device: torch.device | str | None = None
                       ) -> Tensor | None:
        """The labels a sample is drawn for when none are given: every class in turn
        (``balanced_labels``) for a class-conditional model, None for an unconditional one."""
        if not self.num_classes:
            return None
        return balanced_labels(num_samples, self.num_classes).to(device)

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0,
               generator: torch.Generator | None = None,
               y: Tensor | int | None = None, guidance: float = 0.0, denoise: bool = False,
               **options: Any) -> Tensor:
        """Draw uint8 images, B×C×H×W; ``temperature`` scales the prior's standard deviation.

        ``y``: the class of each sample for a class-conditional model ((B,) or one int); None
        draws every class in turn (y_i = i mod K). An unconditional model takes no labels.
        ``guidance``: w of the family's guidance (classifier-free for class-conditional models;
        TarFlow's attention-temperature guidance for unconditional ones), 0 for none.
        ``denoise``: one score step x ← x + σ²∇ₓ log p(x | y) before quantising (``denoise``;
        noise-trained checkpoints). ``options``: the family's own sampling options, passed to
        its ``generate`` (TarFlow: ``attention_temperature``, ``annealed``).
        A sample that was non-finite or out of range before the uint8 conversion is marked,
        never a plain (black) tile (``data.quantize.checked_images``, which also counts them:
        ``checked_images(model.generate(...))``).
        """
        check_sampling(num_samples, temperature)
        if y is None:
            y = self.default_labels(num_samples)
        x = self.generate(num_samples, temperature=temperature, generator=generator, y=y,
                          **self.guidance_arguments(guidance, options))
        if denoise:
            x = self.denoise(x, y)
        return quantize.checked_images(x).images

    def guidance_arguments(self, guidance: float, options: dict[str, Any]) -> dict[str, Any]:
        """The keywords ``generate`` gets for ``guidance`` and ``options``: none without them
        (every family's plain call); ``ConfigError`` if this family's ``generate`` does not
        take them."""
        if not guidance and not options:
            return {}
        params = inspect.signature(self.generate).parameters
        unknown = sorted(set(options) - set(params))
        if "guidance" not in params or unknown:
            what = f"the option(s) {', '.join(unknown)}" if unknown else "guidance"
            raise ConfigError(f"{type(self).__name__} sampling takes no {what}; sample it "
                              "without")
        return {"guidance": guidance, **options}

    def denoising_std(self) -> float:
        """σ of ``denoise``: the training noise; ``ConfigError`` for a likelihood checkpoint
        (uniform dequantisation, σ = 0), which has no Gaussian noise to remove."""
        if self.noise_std <= 0:
            raise ConfigError("denoising needs a checkpoint trained with Gaussian noise "
                              "(noise_std > 0); this one was trained with uniform "
                              "dequantisation: sample it without denoising")
        return self.noise_std

    def denoise(self, x: Tensor, y: Tensor | int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """One score-based denoising step, x + σ²·∇ₓ log p(x | y) with σ = ``noise_std``
        (Tweedie's formula for x = x₀ + σε, ε ~ N(0, I): E[x₀ | x] = x + σ²∇ log p_σ(x); TarFlow,
        SPEC §6). Model space in and out, B×C×H×W; differentiates ``log_density`` once.
        ``ConfigError`` for a checkpoint trained without Gaussian noise (σ = 0)."""
        sigma = self.denoising_std()
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = self.log_density(x, y, generator=generator).sum()
            (score,) = torch.autograd.grad(log_p, x)
        return (x + sigma ** 2 * score).detach()


def check_noise_std(noise_std: float) -> None:
    """``ConfigError`` unless the training noise σ is a finite number ≥ 0."""
    if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or not (
            math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"noise_std must be a finite number ≥ 0, got {noise_std!r}")


def check_sampling(num_samples: int, temperature: float) -> None:
    """``ConfigError`` unless ``num_samples`` ≥ 1 and 0 ≤ ``temperature`` < ∞."""
    check_positive_int("the number of samples", num_samples)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"the temperature must be a finite number ≥ 0 (1 is the model's "
                          f"distribution, 0 its mode chain), got {temperature!r}")
