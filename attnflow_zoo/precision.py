"""The zoo's one precision rule (mixed precision), and the only way callers choose it.

**Rule.** Under ``torch.autocast`` (``precision="bf16"`` on CPU or CUDA, ``"fp16"`` on CUDA)
only the *conditioners* run in the low precision: the coupling networks, iTrans's query/key
projections and logits, and the convolutions of the priors (emb, Conv_in, the conv-LSTM gate
convolutions, Conv_out). Everything a log-density is made of stays float32 (float64 models
stay float64):

- every logdet, and the prior's (μ, log σ), its Gaussian log-density and every sum of them;
- the data path x → z (ActNorm, InvConv1x1's LU product and its 1×1 convolution, the affine
  maps of the couplings and of the attention layers), so every layer inverts exactly (to
  float32 rounding) given its input. Across layers a float32 rounding difference in a
  conditioner's input can flip one bf16 rounding of its output: a whole model's round trip
  under bf16 is good to ~1e-3 (tests/test_precision.py), not 1e-6;
- iTrans's softmax, A·X₂ and its log-determinant (the LU runs in float64 in any case);
- iMap's gate (cheap; its inverse recomputes it from an input equal only up to rounding);
- on the CPU, softmax(QKᵀ)V of TarFlow's causal attention (``attention``): PyTorch's bf16
  attention kernels for the CPU are slower than its float32 ones (README, "TarFlow"); on
  CUDA it runs in the autocast dtype;
- the conv-LSTM's cell state c and its gate nonlinearities (low-precision gate *convolutions*
  only).

The layers enforce the rule themselves (``upcast`` on a conditioner's output,
``full_precision`` around float32 regions), so a caller under ``torch.autocast`` gets it right
without knowing it; a caller only picks the precision, through ``autocast_for``. The recipes
train in fp32; bf16 is an option, not the default (the measurements: README, "bf16").
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.nn import functional as F

from .errors import ConfigError, check_choice
from .settings import PRECISIONS

_LOW = (torch.bfloat16, torch.float16)


def check_precision(precision: str, device: str | torch.device) -> None:
    """``ConfigError`` for a precision that is not one of ``PRECISIONS``, or fp16 off CUDA (CPU
    autocast has no fp16 kernels worth having): the one place either is refused."""
    check_choice("precision", precision, PRECISIONS)
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"`precision` fp16 needs a CUDA device and this one is {kind}; use "
                          "`precision` bf16, or a CUDA `device`")


def autocast_for(device: str | torch.device, precision: str, *,
                 cache_enabled: bool = True) -> contextlib.AbstractContextManager[object]:
    """The autocast context of ``precision`` on ``device`` (a no-op context for "fp32").

    ``cache_enabled=False`` inside a CUDA-graph capture (autocast's weight-cast cache must not
    outlive the capture). ``ConfigError`` for an unknown precision or fp16 off CUDA (CPU
    autocast has no fp16 kernels worth having; use bf16).
    """
    dev = torch.device(device)
    check_precision(precision, dev)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(dev.type, dtype=dtype, cache_enabled=cache_enabled)


def upcast(x: Tensor) -> Tensor:
    """x in float32 if it is bf16/fp16 (a conditioner's output under autocast), else x as is
    (float32 and float64 pass unchanged, so float64 checks stay float64)."""
    return x.float() if x.dtype in _LOW else x


def full_precision(like: Tensor) -> contextlib.AbstractContextManager[object]:
    """A region where autocast is off on ``like``'s device: its ops run in their inputs'
    dtypes (float32 for the data path). Traceable by ``torch.compile`` (no graph break)."""
    return torch.autocast(like.device.type, enabled=False)


def compute_dtype(like: Tensor) -> torch.dtype:
    """The dtype autocast would run a convolution in on ``like``'s device: the autocast dtype
    when autocast is on there, else ``like``'s own dtype. For code that calls convolutions
    with explicit dtypes (the conv-LSTM's recurrence, whose backward runs outside autocast)."""
    device_type = like.device.type
    if like.is_floating_point() and like.dtype in (torch.float32, *_LOW) and \
            torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return like.dtype


def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
    """softmax(QKᵀ·scale)V (``F.scaled_dot_product_attention`` with ``kwargs``) under the rule:
    in the autocast dtype on CUDA; on the CPU in float32 (inputs upcast, autocast off there),
    since PyTorch's bf16 attention kernels for the CPU are slower than its float32 ones."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with full_precision(q):
        return F.scaled_dot_product_attention(upcast(q), upcast(k), upcast(v), **kwargs)
