"""MixLogCDF coupling of Flow++, as ported by mAR-SCF (SPEC §3.1).

Sources: Ho, Chen, Srinivas, Duan, Abbeel, "Flow++: Improving Flow-Based Generative Models with
Variational Dequantization and Architecture Design", ICML 2019 (arXiv 1902.00275; code
aravindsrinivas/flowpp); Mahajan, Bhattacharyya, Fritz, Schiele, Roth, "Normalizing Flows with
Multi-Scale Autoregressive Priors", CVPR 2020 (arXiv 2004.03891; code visinf/mar-scf,
``flow_modules/mixlogcdf_coupling.py``, ``mixlogcdf_nn.py``, ``log_dist.py``).

Numerics (SPEC §3.1 Decision): logit F is computed as the difference of two log-space mixture
sums, log F = logsumexp_k(log w_k + log σ(z_k)) and log(1 − F) = logsumexp_k(log w_k + log σ(−z_k)),
never as logit(exp(logsumexp(·))), which loses 1 − F to rounding in the tails.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from ..core import InvertibleModule
from ..errors import ConfigError, ShapeError
from ..precision import upcast

HEAD_INITS = ("fixed", "port")

#: Flow++'s clamp on the components' log-scales.
LOG_SCALE_MIN = -7.0

_LN2 = math.log(2.0)


class BisectionNotConvergedWarning(RuntimeWarning):
    """The bisection inverse of a MixLogCDF coupling stopped at its iteration limit."""


@dataclass(frozen=True)
class BisectionInfo:
    """What one bisection inverse achieved (``MixLogCDFCoupling.inverse_with_info``):
    ``iterations`` run and ``residual`` = max |logit F(x̂_a) − u| (a 0-dim tensor on the
    input's device, so reading it is the caller's host sync)."""

    iterations: int
    residual: Tensor


# --- the mixture of logistics --------------------------------------------------------------------

def log_sigmoid_pair(z: Tensor) -> tuple[Tensor, Tensor]:
    """(log σ(z), log σ(−z)) from one exp and one log1p: min(±z, 0) − log1p(e^{−|z|}).

    min(±z, 0) is written (±z − |z|)/2, exact in floating point and with derivative ½ at z = 0
    (torch's |z|' = 0 there), so the gradient is right everywhere.
    """
    soft = torch.log1p(torch.exp(-z.abs()))
    return 0.5 * (z - z.abs()) - soft, 0.5 * (-z - z.abs()) - soft


def mixture_logit_cdf(x: Tensor, log_weights: Tensor, means: Tensor,
                      log_scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u = logit F(x), log F, log(1 − F) of F = Σ_k w_k σ((x − μ_k)e^{−log s_k}), elementwise.

    Both logs come from log-space sums, so u keeps full relative accuracy where F rounds to 0 or
    1 (SPEC §3.1 Decision).

    Args:
        x: B×C×H×W.
        log_weights: log w_k, B×K×C×H×W (log-softmax over K).
        means: μ_k, B×K×C×H×W.
        log_scales: log s_k, B×K×C×H×W.

    Returns:
        (u, log F, log(1 − F)), each B×C×H×W.
    """
    return _logit_cdf(x, log_weights, means, torch.exp(-log_scales))


def _logit_cdf(x: Tensor, log_w: Tensor, mu: Tensor,
               inv_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ls_pos, ls_neg = log_sigmoid_pair((x.unsqueeze(1) - mu) * inv_s)
    log_cdf = torch.logsumexp(log_w + ls_pos, 1)
    log_sf = torch.logsumexp(log_w + ls_neg, 1)
    return log_cdf - log_sf, log_cdf, log_sf


def mixture_log_pdf_and_logit_cdf(x: Tensor, log_weights: Tensor, means: Tensor,
                                  log_scales: Tensor) -> tuple[Tensor, Tensor]:
    """(log u'(x), u(x)) with u = logit F:  log u' = log f − log F − log(1 − F).

    log f = logsumexp_k[log w_k + z_k − log s_k − 2·softplus(z_k)], evaluated as
    logsumexp_k[log w_k + log σ(z_k) + log σ(−z_k) − log s_k] (the same quantity; it reuses the
    two log-sigmoids and avoids softplus's linear cut-off at z > 20, an error of 2e−9 per element).
    Shapes as in ``mixture_logit_cdf``; both outputs B×C×H×W.
    """
    z = (x.unsqueeze(1) - means) * torch.exp(-log_scales)
    ls_pos, ls_neg = log_sigmoid_pair(z)
    log_cdf = torch.logsumexp(log_weights + ls_pos, 1)
    log_sf = torch.logsumexp(log_weights + ls_neg, 1)
    log_pdf = torch.logsumexp(log_weights + ls_pos + ls_neg - log_scales, 1)
    return log_pdf - log_cdf - log_sf, log_cdf - log_sf


def init_mixture(num_components: int, spread: float) -> tuple[Tensor, Tensor]:
    """The fixed mixture a zero-weight head starts from: equal weights, μ_k = c·logit((k + ½)/K),
    one scale s = √(1 − 3·mean_k(μ_k²)/π²), c = ``spread``; returns (means, log_scales), each (K,).

    The means are quantiles of a logistic of scale c, and s makes the mixture's variance
    mean_k(μ_k²) + s²π²/3 exactly the standard logistic's π²/3, so logit F_0(x) ≈ x in the bulk:
    max |logit F_0(x) − x| on [−4, 4] is 0.014, 0.024, 0.034 for K = 2, 4, 32 at c = 0.3, and
    the tails have slope 1/s (≈ 1.04 at K = 32). c = 0 is the exact identity, but then the K
    components are interchangeable and gradient descent can never separate them; c > 0 breaks
    that symmetry.
    """
    k = torch.arange(num_components, dtype=torch.float64, device="cpu")  # read even on meta
    means = spread * torch.logit((k + 0.5) / num_components)
    scale = math.sqrt(1.0 - 3.0 * float(means.pow(2).mean()) / math.pi**2)
    return means, torch.full_like(means, math.log(scale))


# --- the conditioner (Flow++'s NN; specific to this coupling) -------------------------------------

def _wn_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size,
                                 padding=kernel_size // 2))


def _concat_elu(x: Tensor) -> Tensor:
    return F.elu(torch.cat([x, -x], 1))


def _channel_layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def sinusoidal_positions(num_positions: int, num_channels: int, *, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
    """Fixed Transformer encodings of the flattened positions, shape 1×N×C:
    [sin(n·τ_i), cos(n·τ_i)] with τ_i = 10⁴^{−i/(C/2 − 1)}, zero-padded for odd C."""
    half = num_channels // 2
    pos = torch.arange(num_positions, device=device, dtype=torch.float64)
    inv = torch.exp(-math.log(1e4) / max(half - 1, 1)
                    * torch.arange(half, device=device, dtype=torch.float64))
    angle = pos[:, None] * inv[None, :]
    enc = F.pad(torch.cat([angle.sin(), angle.cos()], 1), (0, num_channels % 2))
    return enc.to(dtype).unsqueeze(0)


class GatedConv(nn.Module):
    """x ↦ GLU(Conv1×1(Dropout(concatELU(Conv3×3(concatELU(x)))))), B×C×H×W → B×C×H×W.

    PixelCNN++'s gated residual branch, used by Flow++. Dropout is channel-wise (``Dropout2d``)
    as in mAR-SCF's port.
    """

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.conv = _wn_conv(2 * channels, channels, 3)
        self.drop = nn.Dropout2d(dropout)
        self.gate = _wn_conv(2 * channels, 2 * channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gate(self.drop(_concat_elu(self.conv(_concat_elu(x)))))
        return F.glu(h, 1)


class GatedAttention(nn.Module):
    """x ↦ GLU(W_g · MHA(x + PE)), self-attention over the H·W positions, B×C×H×W → B×C×H×W.

    Q, K, V from one bias-free weight-normed projection of x plus fixed sinusoidal positions;
    ``scaled_dot_product_attention`` with dropout on the attention weights (training only).
    """

    def __init__(self, channels: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = weight_norm(nn.Linear(channels, 3 * channels, bias=False))
        self.gate = weight_norm(nn.Linear(channels, 2 * channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)
        seq = seq + sinusoidal_positions(h * w, c, device=x.device, dtype=x.dtype)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in self.in_proj(seq).chunk(3, -1))
        att = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = F.glu(self.gate(att.transpose(1, 2).flatten(2)), -1)
        return out.transpose(1, 2).reshape(b, c, h, w)


class ConvAttentionBlock(nn.Module):
    """x ← LN(x + GatedConv(x));  x ← LN(x + GatedAttention(x)), LayerNorm over channels."""

    def __init__(self, channels: int, num_heads: int, dropout: float,
                 use_attention: bool) -> None:
        super().__init__()
        self.conv = GatedConv(channels, dropout)
        self.norm_conv = nn.LayerNorm(channels)
        self.attn = GatedAttention(channels, num_heads, dropout) if use_attention else None
        self.norm_attn = nn.LayerNorm(channels) if use_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = _channel_layer_norm(self.norm_conv, x + self.conv(x))
        if self.attn is not None and self.norm_attn is not None:
            x = _channel_layer_norm(self.norm_attn, x + self.attn(x))
        return x


class MixLogCDFConditioner(nn.Module):
    """NN(x_b) → (â, b, π, μ, log s): WN-conv3×3 → blocks → WN-conv3×3 head.

    Input B×C_b×H×W; head output B×(2 + 3K)·C_a×H×W, read as (2 + 3K) groups of C_a channels in
    the order â, b, π_1..K, μ_1..K, log s_1..K (mAR-SCF's layout).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int,
                 num_components: int, num_blocks: int, num_heads: int, dropout: float,
                 use_attention: bool) -> None:
        super().__init__()
        self.in_conv = _wn_conv(in_channels, hidden_channels, 3)
        self.blocks = nn.ModuleList(
            ConvAttentionBlock(hidden_channels, num_heads, dropout, use_attention)
            for _ in range(num_blocks))
        self.head = _wn_conv(hidden_channels, out_channels * (2 + 3 * num_components), 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.in_conv(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


# --- the coupling ---------------------------------------------------------------------------------

class MixLogCDFCoupling(InvertibleModule):
    """y_a = (logit F(x_a) + b)·e^{a},  F = Σ_k w_k σ((x_a − μ_k)e^{−log s_k});  z = (x_b, y_a).

    x is B×C×H×W (C ≥ 2, odd C allowed); x_a = the first C//2 channels (transformed), x_b = the
    last C − C//2 (they condition: (â, b, π, μ, log s) = NN(x_b), a = w_c·tanh(â) with a learned
    per-channel w_c (init 1), w = softmax(π), log s clamped ≥ −7, K components).
    logdet = Σ_{c,h,w} [log f − log F − log(1 − F) + a], shape (B,).

    Output layout: with ``swap=True`` (default) the halves are swapped inside the layer, as
    mAR-SCF's TupleFlip does after the coupling: z = cat(x_b, y_a) along channels, so the next
    coupling (which transforms its first C//2 channels) changes what this one kept. With
    ``swap=False``, z = cat(y_a, x_b). ``inverse`` reads the same layout.

    Inverse: u = y_a·e^{−a} − b, then logit F(x_a) = u is solved per element by bisection in the
    logit domain (exact and monotone in the tails, where F rounds to 0 or 1) on the bracket
    [min_k(μ_k − 20·Σ_j s_j), max_k(μ_k + 20·Σ_j s_j)] (SPEC; Flow++ uses 200), widened per
    element to min_k(μ_k + s_k(u − ln 2)) / max_k(μ_k + s_k(u + ln 2)) where |u| is beyond what
    the SPEC bracket covers (these ends provably enclose the root for any u, so nothing is
    clamped). The number of halvings that brings the widest bracket below tol (1e-10 in float64,
    the dtype's epsilon otherwise) is computed once, so the loop itself never syncs with the
    host; it runs that many, at most ``inverse_max_iter``, and warns with
    ``BisectionNotConvergedWarning`` unless every final bracket is ≤ tol·max(1, |x̂_a|) (the
    relative part is for |x̂_a| > 1, where the float grid ends the halving).
    ``inverse_with_info`` also returns the iterations run and max |logit F(x̂_a) − u|
    (``BisectionInfo``). The inverse is not differentiable through the bisection.

    At init (``head_init="fixed"``, the SPEC's "start near the identity" Decision) the head's
    weights are zero (weight-norm gains g = 0), so a = 0, b = 0 and the mixture is the same
    fixed F_0 for every element and every input (``init_mixture``: equal weights,
    μ_k = c·logit((k + ½)/K), one s matching the standard logistic's variance,
    c = ``init_spread``). The layer then computes z = (x_b, logit F_0(x_a)): an elementwise,
    input-independent monotone map with |logit F_0(x) − x| ≤ 0.035 on [−4, 4] and slope 1/s ≈ 1.04
    in the tails — near, but not exactly, the identity (c = 0 would be the identity and leave the
    components forever interchangeable).
    ``head_init="port"`` keeps PyTorch's default init of the head, as mAR-SCF does.

    Conditioner (SPEC §3.1): WN-conv3×3 (C_b → C_h) → ``num_blocks`` × [x += GatedConv(x), LN;
    x += GatedAttention(x), LN] → WN-conv3×3 (C_h → C_a·(2 + 3K)), weight norm by
    ``torch.nn.utils.parametrizations.weight_norm`` (no data-dependent init, as in the port).

    Args:
        num_channels: C (≥ 2).
        hidden_channels: C_h, the conditioner's width (divisible by ``num_heads``).
        num_components: K, logistics in the mixture (Flow++ / mAR-SCF: 32).
        num_blocks: conv + attention blocks in the conditioner (mAR-SCF: 10).
        num_heads: attention heads (4).
        dropout: dropout of the gated convs (channel-wise) and the attention weights (0.2).
        use_attention: False drops the attention half of every block (the port's ``use_attn``).
        swap: swap the halves on output (mAR-SCF's TupleFlip).
        head_init: "fixed" (zero-weight head, fixed mixture; default) or "port" (random head).
        init_spread: c of the fixed initial mixture, 0 ≤ c < 1.
        inverse_max_iter: bisection iteration limit.
        inverse_tol: bisection tolerance (None: 1e-10 in float64, the dtype's epsilon otherwise).
    """

    def __init__(self, num_channels: int, hidden_channels: int = 96, num_components: int = 32,
                 num_blocks: int = 10, num_heads: int = 4, dropout: float = 0.2, *,
                 use_attention: bool = True, swap: bool = True, head_init: str = "fixed",
                 init_spread: float = 0.3, inverse_max_iter: int = 100,
                 inverse_tol: float | None = None) -> None:
        super().__init__()
        if num_channels < 2:
            raise ConfigError(f"MixLogCDFCoupling needs at least 2 channels, got {num_channels}; "
                              "squeeze the input first")
        if hidden_channels < 1 or num_components < 1 or num_blocks < 0:
            raise ConfigError("hidden_channels and num_components must be ≥ 1 and num_blocks ≥ 0, "
                              f"got {hidden_channels}, {num_components}, {num_blocks}")
        if use_attention and (num_heads < 1 or hidden_channels % num_heads):
            raise ConfigError(f"hidden_channels ({hidden_channels}) must be a multiple of "
                              f"num_heads ({num_heads}); change one of them")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if not 0.0 <= init_spread < 1.0:
            raise ConfigError(f"init_spread must be in [0, 1), got {init_spread}")
        if inverse_max_iter < 1:
            raise ConfigError(f"inverse_max_iter must be ≥ 1, got {inverse_max_iter}")
        if inverse_tol is not None and not inverse_tol > 0:
            raise ConfigError(f"inverse_tol must be positive, got {inverse_tol}")
        self.num_channels = num_channels
        self.num_a = num_channels // 2
        self.num_b = num_channels - self.num_a
        self.num_components = num_components
        self.swap = swap
        self.inverse_max_iter = inverse_max_iter
        self.inverse_tol = inverse_tol
        self.net = MixLogCDFConditioner(self.num_b, self.num_a, hidden_channels, num_components,
                                        num_blocks, num_heads, dropout, use_attention)
        # a = w_c·tanh(â). mAR-SCF wraps this scale in weight_norm, which on a C×1×1 weight is
        # g·sign(v): the same map and gradients as the plain parameter here.
        self.rescale = nn.Parameter(torch.ones(self.num_a, 1, 1))
        if head_init == "fixed":
            self._init_head(init_spread)

    @torch.no_grad()
    def _init_head(self, spread: float) -> None:
        head = self.net.head
        head.parametrizations.weight.original0.zero_()  # the weight-norm gain g
        means, log_scales = init_mixture(self.num_components, spread)
        bias = torch.zeros(2 + 3 * self.num_components, self.num_a, dtype=torch.float64)
        k = self.num_components
        bias[2 + k : 2 + 2 * k] = means[:, None]
        bias[2 + 2 * k :] = log_scales[:, None]
        head.bias.copy_(bias.flatten())

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ShapeError(f"MixLogCDFCoupling was built for B×{self.num_channels}×H×W inputs, "
                             f"got {tuple(x.shape)}; build it with the channels it receives")

    def mixture_params(self, x_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(a, b, log w, μ, log s) from the conditioning half x_b (B×C_b×H×W).

        a, b: B×C_a×H×W; log w (log-softmax over K), μ, log s (clamped ≥ −7): B×K×C_a×H×W.
        """
        # The conditioner may run in bf16 (autocast); the mixture and its logdet are float32.
        h = upcast(self.net(x_b)).unflatten(1, (2 + 3 * self.num_components, self.num_a))
        k = self.num_components
        a = self.rescale * torch.tanh(h[:, 0])
        log_w = F.log_softmax(h[:, 2 : 2 + k], 1)
        log_s = h[:, 2 + 2 * k :].clamp(min=LOG_SCALE_MIN)
        return a, h[:, 1], log_w, h[:, 2 + k : 2 + 2 * k], log_s

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        x_a, x_b = x[:, : self.num_a], x[:, self.num_a :]
        a, b, log_w, mu, log_s = self.mixture_params(x_b)
        log_du, u = mixture_log_pdf_and_logit_cdf(x_a, log_w, mu, log_s)
        y_a = (u + b) * torch.exp(a)
        logdet = (log_du + a).flatten(1).sum(1)
        z = torch.cat([x_b, y_a], 1) if self.swap else torch.cat([y_a, x_b], 1)
        return z, logdet

    def inverse(self, z: Tensor, max_iter: int | None = None,
                tol: float | None = None) -> Tensor:
        """x from z (``inverse_with_info`` without its record)."""
        return self.inverse_with_info(z, max_iter, tol)[0]

    def inverse_with_info(self, z: Tensor, max_iter: int | None = None,
                          tol: float | None = None) -> tuple[Tensor, BisectionInfo]:
        """(x, what the bisection achieved): x from z (layout as in the class docstring);
        ``max_iter``/``tol`` override the layer's bisection settings for this call."""
        self._check(z)
        if self.swap:
            x_b, y_a = z[:, : self.num_b], z[:, self.num_b :]
        else:
            y_a, x_b = z[:, : self.num_a], z[:, self.num_a :]
        max_iter = self.inverse_max_iter if max_iter is None else max_iter
        if tol is None:
            tol = self.inverse_tol
        if tol is None:
            tol = 1e-10 if z.dtype == torch.float64 else torch.finfo(z.dtype).eps
        with torch.no_grad():
            a, b, log_w, mu, log_s = self.mixture_params(x_b)
            u = y_a * torch.exp(-a) - b
            x_a, info = self._bisect(u, log_w, mu, log_s, max_iter, tol)
        return torch.cat([x_a, x_b], 1), info

    def _bisect(self, u: Tensor, log_w: Tensor, mu: Tensor, log_s: Tensor, max_iter: int,
                tol: float) -> tuple[Tensor, BisectionInfo]:
        s = torch.exp(log_s)
        inv_s = torch.exp(-log_s)
        span = 20.0 * s.sum(1)
        lo = torch.minimum(mu.amin(1) - span, (mu + s * (u - _LN2).unsqueeze(1)).amin(1))
        hi = torch.maximum(mu.amax(1) + span, (mu + s * (u + _LN2).unsqueeze(1)).amax(1))
        # One host sync before the loop: bisection halves every bracket each step, so the widest
        # one fixes how many steps all elements need to get below tol (absolute); where |x| > 1
        # the float grid stops the halving earlier, which the relative test below accepts.
        widest = float((hi - lo).max()) if u.numel() else 0.0
        needed = math.ceil(math.log2(widest / tol)) if widest > tol else 0
        steps = min(needed, max_iter) if math.isfinite(widest) else max_iter
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            above = _logit_cdf(mid, log_w, mu, inv_s)[0] > u
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        x = 0.5 * (lo + hi)
        residual = (_logit_cdf(x, log_w, mu, inv_s)[0] - u).abs()
        info = BisectionInfo(steps, (residual.max() if residual.numel()
                                     else residual.new_zeros(())).detach())
        excess = ((hi - lo) / x.abs().clamp(min=1.0)).max() if u.numel() else x.new_zeros(())
        if not float(excess) <= tol:
            warnings.warn(
                f"MixLogCDFCoupling: bisection stopped after {steps} iterations with bracket "
                f"width {float(excess):.3e} (relative to max(1, |x|)) > tol {tol:.1e}, residual "
                f"{float(info.residual):.3e} in logit F; raise max_iter (limit "
                f"{max_iter}), or check the latent for non-finite values",
                BisectionNotConvergedWarning, stacklevel=4)
        return x, info
