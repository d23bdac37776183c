"""The invertible-layer contract, the sequential container and the few helpers every layer uses.

Direction convention (everywhere in the zoo): ``forward`` is data -> latent and returns
``(z, logdet)`` with ``logdet`` the per-sample log|det dz/dx| of shape (B,) in nats;
``inverse`` is latent -> data and returns only the data.

This module imports torch and ``errors`` only: every layer can import it without pulling in the
Hub, checkpoints or models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .errors import ConfigError


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


class ConditionalInvertibleModule(InvertibleModule):
    """A bijection x -> z whose parameters depend on a context c held fixed (e.g. a class
    embedding): ``forward(x, context) -> (z, logdet)``, ``inverse(z, context) -> x``.

    For each c the map is a bijection and logdet is log|det ∂z/∂x| at that c (c is not a
    variable of the Jacobian). ``context`` None means no context; a layer that needs one raises.
    ``FlowSequential`` hands its context to the layers of this kind and only to them.
    """

    def forward(self, x: Tensor, context: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None
                ) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class DataDependentInit:
    """Mixin of modules whose parameters are set from the first batch they see (ActNorm).

    The initialisation is an explicit pass (``initialize_from_data``), never a check inside
    ``forward`` on a tensor flag: such a check is a host synchronisation per module per step on
    CUDA and a graph break under ``torch.compile``. A subclass keeps a persistent boolean buffer
    ``initialized`` (so a loaded model is never re-initialised) and implements
    ``data_init(x)``; its ``forward`` calls ``data_init`` when the plain Python flag
    ``_data_init_pending`` is set.
    """

    _data_init_pending: bool = False

    def data_init(self, x: Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@torch.no_grad()
def initialize_from_data(module: nn.Module, run: Callable[[], object]) -> int:
    """Run ``run()`` (a forward pass on a batch) as the data-dependent initialisation pass.

    Every not-yet-initialised ``DataDependentInit`` submodule of ``module`` sets its parameters
    from the input it receives during ``run``; modules already initialised (e.g. loaded from a
    checkpoint) are left alone. Returns the number of modules initialised.
    """
    pending = [m for m in module.modules()
               if isinstance(m, DataDependentInit) and not bool(m.initialized)]  # type: ignore
    for m in pending:
        m._data_init_pending = True
    try:
        run()
    finally:
        for m in pending:
            m._data_init_pending = False
    return len(pending)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU; otherwise ``torch.device(device)``.

    ``ConfigError`` for an unknown device name or a device this machine does not have.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"`device` {device}: this machine has no CUDA GPU (or this torch "
                              "build has no CUDA); use `device` cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"`device` {device}: only {torch.cuda.device_count()} CUDA "
                              f"device(s) here; use cuda:0…cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ConfigError(f"`device` {device}: MPS is not available here; use cpu or auto")
    return dev


def on_build_device(t: Tensor) -> Tensor:
    """``t`` moved to the device modules are being built on (``torch.get_default_device()``;
    the meta device inside ``factory.meta_build``).

    Constant buffers and initial factors are formed on the CPU and moved with this: the same
    values wherever a model is built, and on the meta device no out-of-place op runs one of
    torch's Python meta kernels (the first of which imports torch._dynamo: seconds of
    ``attnflow models``)."""
    return t.to(torch.get_default_device())


def randn_like_on(shape: tuple[int, ...], like: Tensor,
                  generator: torch.Generator | None = None) -> Tensor:
    """N(0, 1) noise of ``shape`` on ``like``'s device and dtype, drawn on the generator's own
    device (a CPU generator stays usable for a CUDA model, and the same seed gives the same
    numbers on either) and moved if needed."""
    if generator is None or generator.device == like.device:
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device,
                       dtype=like.dtype).to(like.device)


def soft_cap(x: Tensor, bound: float | None) -> Tensor:
    """x where x ≤ 0, c·tanh(x/c) where x > 0 (c = ``bound``): a smooth (C², slope 1 at 0)
    upper bound, always < c, that leaves non-positive values exactly as they are; ``bound``
    None returns x itself.

    Used on log-scales (−log s of a scale s ≤ 1, or log σ) so that the scale an inverse or a
    sampler multiplies by stays below e^c for any input: the s·tanh soft clip of RealNVP's
    log-scales (Dinh et al., "Density estimation using Real NVP", ICLR 2017), here with a
    fixed c and on one side only.
    """
    if bound is None:
        return x
    return torch.where(x > 0, bound * torch.tanh(x / bound), x)


def check_bound(name: str, bound: float | None) -> None:
    """``ConfigError`` unless ``bound`` (a ``soft_cap`` bound) is None or a finite c > 0."""
    if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound)
                                  and bound > 0):
        raise ConfigError(f"{name} must be a positive number (or None for no bound), "
                          f"got {bound!r}")


def zero_logdet(x: Tensor) -> Tensor:
    """A (B,) zero logdet on x's device and dtype, for volume-preserving layers."""
    return x.new_zeros(x.shape[0])


class FlowSequential(ConditionalInvertibleModule):
    """Composition f_n ∘ … ∘ f_1; logdet = Σ_k logdet_k, inverse runs the layers in reverse.

    A ``context`` goes to the ``ConditionalInvertibleModule`` layers (nested sequences
    included); the other layers never see it.
    """

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

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        for layer in self.layers:
            if context is not None and isinstance(layer, ConditionalInvertibleModule):
                x, ld = layer(x, context)
            else:
                x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            if context is not None and isinstance(layer, ConditionalInvertibleModule):
                z = layer.inverse(z, context)
            else:
                z = layer.inverse(z)
        return z


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def diag_normal_logpdf(z: Tensor, mean: Tensor | None = None,
                       log_std: Tensor | None = None) -> Tensor:
    """Per-sample Σ log N(z; μ, diag exp(log σ)²) over all non-batch dims, shape (B,).

    ``mean`` None means μ = 0 and ``log_std`` None means σ = 1 (the standard normal).
    """
    if mean is not None:
        z = z - mean
    if log_std is None:
        elem = -0.5 * z.pow(2) - _HALF_LOG_2PI
    else:
        elem = -0.5 * (z * torch.exp(-log_std)).pow(2) - log_std - _HALF_LOG_2PI
    return elem.flatten(1).sum(1)
