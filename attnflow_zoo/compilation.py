"""``torch.compile`` of a flow model's training computation and of its sampling.

Design (issue 14):

- ``dynamic=False`` on purpose. With the default (automatic dynamic shapes after the first
  shape change, e.g. a last partial batch) Inductor fails on this model
  (``InductorError … Relational: 1 < s15``). Static shapes compile each batch shape once
  (a partial last batch costs one more compilation) and are what CUDA graphs need.
- No graph breaks: ActNorm's data-dependent init is an explicit pass (``core``), the
  conv-LSTM's recurrence is one ``autograd.Function`` that Dynamo traces, sampling draws its
  noise eagerly (``draw_noise``: ``torch.Generator`` cannot enter a graph) and compiles only
  the deterministic ``generate_from_noise``. ``fullgraph=True`` makes a break an error
  rather than a silent slowdown (except under DDP, whose optimizer splits graphs at bucket
  boundaries).
- Compile a module *after* ``initialize_from_data``; the init pass itself runs eagerly.
- ``mode="reduce-overhead"`` (CUDA graphs) suits the launch-bound mAR prior on a GPU: every
  step has static shapes and no host synchronisation.

The cost of the first call (compilation) is measured by ``benchmarks/speed.py`` and
``benchmarks/gpu.sh``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def compile_available(backend: str = "inductor") -> bool:
    """Whether ``torch.compile`` with ``backend`` works here (Inductor needs a C++ compiler on
    CPU); a one-op probe."""
    try:
        fn = torch.compile(lambda t: t * 2 + 1, dynamic=False, fullgraph=True, backend=backend)
        return bool(fn(torch.ones(2)).sum() == 6)
    except Exception:  # noqa: BLE001 - any backend failure means "not here"
        return False


def compile_training(module: nn.Module, *, mode: str | None = None, **options: Any
                     ) -> nn.Module:
    """The compiled training computation: ``module`` is the model (its ``forward`` / call) or
    the training loop's wrapper that calls ``log_density`` (DDP-wrapped or not).

    Backward is compiled along with the forward (AOTAutograd); the optimizer step stays eager.
    """
    ddp = isinstance(module, nn.parallel.DistributedDataParallel)
    return torch.compile(module, dynamic=False, fullgraph=not ddp, mode=mode, **options)


def compile_log_density(model: nn.Module, *, mode: str | None = None, **options: Any
                        ) -> Callable[..., Tensor]:
    """``model.log_density`` compiled (forward + backward of the training objective);
    ``options`` go to ``torch.compile`` (e.g. ``backend``)."""
    return torch.compile(model.log_density, dynamic=False, fullgraph=True, mode=mode,
                         **options)


def compile_sampling(model: nn.Module, *, mode: str | None = None, **options: Any
                     ) -> Callable[..., Tensor]:
    """A ``generate(num_samples, temperature=1.0, generator=None, y=None)`` whose deterministic part
    (``model.generate_from_noise``) is compiled; the noise is drawn eagerly with
    ``model.draw_noise`` (the same numbers as ``model.generate``)."""
    compiled = torch.compile(model.generate_from_noise, dynamic=False, fullgraph=True,
                             mode=mode, **options)

    def generate(num_samples: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, y: Any = None) -> Tensor:
        noise = model.draw_noise(num_samples, temperature, generator)
        with torch.no_grad():
            if y is None and not model.num_classes:
                return compiled(num_samples, temperature, noise)
            return compiled(num_samples, temperature, noise, model.class_context(y, num_samples))

    return generate
