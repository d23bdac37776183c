"""The invertible-layer contract, the sequential container and the density-model base.

Direction convention (everywhere in the zoo): ``forward`` is data -> latent and returns
``(z, logdet)`` with ``logdet`` the per-sample log|det dz/dx| of shape (B,) in nats;
``inverse`` is latent -> data and returns only the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from . import data, metrics
from .errors import ConfigError, ShapeError
from .hub import ZooHubMixin


class InvertibleModule(nn.Module):
    """A bijection x -> z with a tractable per-sample log-determinant.

    Subclasses implement ``forward(x) -> (z, logdet)`` with logdet of shape (B,) in nats and
    ``inverse(z) -> x``. ``inverse`` never writes into its input. Layers that change shape keep
    the number of elements per sample.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err


def randn_like_on(shape: tuple[int, ...], like: Tensor,
                  generator: torch.Generator | None = None) -> Tensor:
    """N(0, 1) noise of ``shape`` on ``like``'s device and dtype, drawn on the generator's own
    device (a CPU generator stays usable for a CUDA model, and the same seed gives the same
    numbers on either) and moved if needed."""
    if generator is None or generator.device == like.device:
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device,
                       dtype=like.dtype).to(like.device)


def zero_logdet(x: Tensor) -> Tensor:
    """A (B,) zero logdet on x's device and dtype, for volume-preserving layers."""
    return x.new_zeros(x.shape[0])


class FlowSequential(InvertibleModule):
    """Composition f_n ∘ … ∘ f_1; logdet = Σ_k logdet_k, inverse runs the layers in reverse."""

    def __init__(self, *layers: InvertibleModule | Iterable[InvertibleModule]) -> None:
        super().__init__()
        flat: list[InvertibleModule] = []
        for layer in layers:
            if isinstance(layer, nn.Module):
                flat.append(layer)
            else:
                flat.extend(layer)
        self.layers = nn.ModuleList(flat)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


def standard_normal_logpdf(z: Tensor, mean: Tensor | None = None,
                           log_std: Tensor | None = None) -> Tensor:
    """Per-sample Σ log N(z; mean, exp(log_std)²) over all non-batch dims, shape (B,)."""
    if mean is not None:
        z = z - mean
    if log_std is None:
        elem = -0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)
    else:
        elem = -0.5 * (z * torch.exp(-log_std)).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    return elem.flatten(1).sum(1)


class FlowModel(nn.Module, ZooHubMixin):
    """Base of every zoo density model: an 8-bit image model on the Hub.

    The model's input space is x = x̃ − 0.5 ∈ [−0.5, 0.5) where x̃ ∈ [0, 1)^D is the uniformly
    dequantised image (``data.dequantize``). The shift has a unit Jacobian, so the density of x
    equals the density of x̃.

    Subclasses take one config dataclass (annotate the ``config`` argument with its type so the
    Hub mixin can rebuild it from ``config.json``), and implement:

    - ``forward(x) -> (z, logdet)`` and ``inverse(z) -> x`` over the whole model, with the
      factored-out latents kept in ``z`` so that ``inverse(forward(x)[0]) == x``;
    - ``log_density(x) -> (B,)``: log p(x) in nats for x in the model's input space;
    - ``generate(num_samples, temperature, generator) -> x`` in the model's input space.
    """

    config: object

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config

    # --- to implement --------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def log_density(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def generate(self, num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes."""
        cfg = self.config
        size = cfg.image_size  # type: ignore[attr-defined]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)  # type: ignore[attr-defined]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def check_images(self, x_u8: Tensor) -> None:
        """Raise ``ShapeError`` unless x_u8 is a B×C×H×W batch of the model's image shape."""
        if x_u8.dim() != 4 or tuple(x_u8.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"expected images of shape B×{'×'.join(map(str, self.input_shape))}, got "
                f"{tuple(x_u8.shape)}; resize/crop the data or create the model with a matching "
                "image_size / in_channels"
            )

    def log_prob(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """log p(x̃) in nats, (B,), of the uniformly dequantised x̃ ∈ [0, 1)^D of uint8 images."""
        self.check_images(x_u8)
        # Dequantise in the model's dtype, so a float64 model gets float64 inputs.
        dtype = next((p.dtype for p in self.parameters()), torch.float32)
        x = data.dequantize(x_u8.to(self.device), generator=generator, dtype=dtype) - 0.5
        return self.log_density(x)

    def bits_per_dim(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Bits/dim per image, (B,); single-sample dequantisation estimate (SPEC §4)."""
        return metrics.bits_per_dim(self.log_prob(x_u8, generator), math.prod(self.input_shape))

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw uint8 images, B×C×H×W; ``temperature`` scales the prior's standard deviation."""
        x = self.generate(num_samples, temperature=temperature, generator=generator)
        return data.quantize(x + 0.5)
