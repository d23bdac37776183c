"""Affine coupling in the mAR-SCF / Glow style and its conditioner network (SPEC §3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import ConditionalInvertibleModule, Guided, check_bound, guide, soft_cap
from ..precision import upcast
from .nets import ZeroConv2d
from .normalization import ActNormNoLogdet


class CouplingNet(nn.Sequential):
    """NN(x_a) of mAR-SCF's affine coupling (SPEC §3):
    Conv3×3 → ActNorm → ReLU → Conv1×1 → ActNorm → ReLU → ZeroConv3×3.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            ActNormNoLogdet(hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False),
            ActNormNoLogdet(hidden_channels),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels),
        )
        for m in (self[0], self[3]):
            nn.init.normal_(m.weight, std=0.05)


class AffineCoupling(ConditionalInvertibleModule):
    """z_a = x_a,  z_b = x_b ⊙ s + shift,  log s = −c·tanh(−log σ(raw + 2)/c),
    (shift, raw) = NN([x_a, ctx]) interleaved.

    x_a is the first C − C//2 channels, x_b the last C//2; ctx is an optional context vector
    (``context_channels`` > 0, e.g. a class embedding), B×E, broadcast over H×W and concatenated
    to x_a as extra input channels of NN. logdet = Σ log s (a function of x_a and ctx).
    The last conv of NN is zero-initialised, so at init z_b ≈ σ(2)·x_b (near the identity).
    Source: Mahajan et al., "Normalizing Flows with Multi-Scale Autoregressive Priors",
    CVPR 2020 (code visinf/mar-scf), after Glow's affine coupling.

    **Decision** (``log_scale_bound`` c): mAR-SCF's and Glow's s = σ(raw + 2) (c = None, the
    default of this class) has no floor, so the inverse x_b = (z_b − shift)/s amplifies without
    bound. With c > 0 the log-scale is soft-clipped (``core.soft_cap`` of −log s) into (−c, 0):
    s stays in (e^−c, 1), the inverse amplifies by at most e^c for any input, and where
    |log s| ≪ c the map is the published one.

    Args:
        num_channels: C (≥ 2).
        hidden_channels: width of the conditioner.
        context_channels: E of the context vector; 0 (default) for an unconditional coupling.
        log_scale_bound: c, or None for the unbounded published scale σ(raw + 2).
    """

    def __init__(self, num_channels: int, hidden_channels: int = 256,
                 context_channels: int = 0, log_scale_bound: float | None = None) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError("AffineCoupling needs at least 2 channels")
        check_bound("log_scale_bound", log_scale_bound)
        self.log_scale_bound = log_scale_bound
        self.num_a = num_channels - num_channels // 2
        self.context_channels = context_channels
        num_b = num_channels // 2
        self.net = CouplingNet(self.num_a + context_channels, 2 * num_b, hidden_channels)

    def _params(self, x_a: Tensor, context: Tensor | Guided | None) -> tuple[Tensor, Tensor]:
        if isinstance(context, Guided):  # classifier-free guidance (``models.conditioning``)
            return guide(self._params(x_a, context.cond), self._params(x_a, context.uncond),
                         context.weight)
        if self.context_channels:
            if context is None or context.shape != (x_a.shape[0], self.context_channels):
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"this coupling is conditional: pass a context of shape "
                                 f"B×{self.context_channels}, got {got}")
            maps = context[:, :, None, None].expand(-1, -1, *x_a.shape[2:])
            x_a = torch.cat([x_a, maps.to(x_a.dtype)], 1)
        elif context is not None:
            raise ValueError("this coupling takes no context (context_channels = 0)")
        # The conditioner may run in bf16 (autocast); shift, scale and logdet are float32.
        h = upcast(self.net(x_a))
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, raw + 2.0

    def extra_repr(self) -> str:
        return f"log_scale_bound={self.log_scale_bound}"

    def log_scale(self, pre: Tensor) -> Tensor:
        """log s of the pre-activation raw + 2: log σ(pre), soft-clipped above −c if bounded."""
        if self.log_scale_bound is None:
            return F.logsigmoid(pre)
        return -soft_cap(-F.logsigmoid(pre), self.log_scale_bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.num_a], x[:, self.num_a :]
        shift, pre = self._params(x_a, context)
        log_scale = self.log_scale(pre)
        # The published map keeps its own operations (σ, not exp log σ): bit for bit as before.
        scale = torch.sigmoid(pre) if self.log_scale_bound is None else torch.exp(log_scale)
        z_b = x_b * scale + shift
        return torch.cat([x_a, z_b], 1), log_scale.flatten(1).sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        z_a, z_b = z[:, : self.num_a], z[:, self.num_a :]
        shift, pre = self._params(z_a, context)
        if self.log_scale_bound is None:
            x_b = (z_b - shift) / torch.sigmoid(pre)
        else:
            x_b = (z_b - shift) * torch.exp(-self.log_scale(pre))
        return torch.cat([z_a, x_b], 1)
