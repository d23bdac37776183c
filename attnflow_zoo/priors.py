"""Priors over the latents of a multi-scale flow: mAR channel prior and diagonal Gaussian.

Both take a latent z (B×C×H×W) and an optional conditioning tensor (the half z1 that continues
through the flow when z = z2 is factored out), and offer ``log_prob``, ``mean_and_log_std``
(teacher forced) and ``sample``. They work for any batch size and any H×W.

Sampling also takes, for class-conditional models (``models.conditioning``), an additive
``shift`` (Δμ, Δlog σ) of every parameter (B×C×H×W each; added to channel c's μ_c, log σ_c
inside the autoregression) and, under classifier-free guidance, a ``Guided`` condition: the
parameters are θ_c + w·(θ_c − θ_u) of the class's and the null class's condition, channel by
channel on the same sampled z_{<c}.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import check_bound, diag_normal_logpdf, randn_like_on, soft_cap
from .errors import ShapeError, check_choice
from .guidance import Guided, guide
from .layers.nets import ConvLSTM, ZeroConv2d
from .precision import full_precision, upcast

#: How the mAR prior's output conv starts (``MARPrior``'s Decision).
OUTPUT_INITS = ("random", "zero")


class Prior(nn.Module):
    """Abstract base of the zoo's priors: p(z | cond) = Π N(z; μ, σ²), a diagonal normal whose
    (μ, log σ) each subclass computes in ``mean_and_log_std``."""

    def mean_and_log_std(self, z: Tensor, cond: Tensor | None = None,
                         shift: tuple[Tensor, Tensor] | None = None
                         ) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """Teacher-forced (μ, log σ), B×C×H×W, with ``shift`` (module docstring) in them."""
        raise NotImplementedError

    def log_prob(self, z: Tensor, cond: Tensor | None = None,
                 shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """log p(z | cond) in nats, shape (B,)."""
        mean, log_std = self.mean_and_log_std(z, cond, shift)
        return diag_normal_logpdf(z, mean, log_std)

    def draw_noise(self, num_samples: int, height: int, width: int,
                   generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover
        """The N(0, 1) noise ``sample_from_noise`` turns into a sample (float32 at least)."""
        raise NotImplementedError

    def sample_from_noise(self, num_samples: int, height: int, width: int,
                          cond: Tensor | Guided | None, temperature: float, noise: Tensor | None,
                          shift: tuple[Tensor, Tensor] | None = None
                          ) -> Tensor:  # pragma: no cover - interface
        """The sample of ``noise`` (None: temperature 0, the mode chain), B×C×H×W, with
        ``shift`` = (Δμ, Δlog σ) added to the parameters and ``cond`` possibly ``Guided``
        (module docstring). Deterministic, static shapes: what ``torch.compile`` or a CUDA
        graph captures."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, num_samples: int, height: int, width: int, cond: Tensor | None = None,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """z ~ p(z | cond) with every standard deviation scaled by ``temperature``, B×C×H×W;
        temperature 0 gives the mode chain (no noise is drawn)."""
        noise = (None if temperature == 0
                 else self.draw_noise(num_samples, height, width, generator))
        return self.sample_from_noise(num_samples, height, width, cond, temperature, noise)

    def whiten(self, z: Tensor, cond: Tensor | None = None,
               shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """ε = (z − μ)/σ with the teacher-forced (μ, σ) of ``mean_and_log_std``, B×C×H×W.

        For an autoregressive prior μ_c, σ_c depend on z_{<c} only, so ε is the noise that
        ``unwhiten`` (and ``sample`` at T = 1) turns back into z.
        """
        mean, log_std = self.mean_and_log_std(z, cond, shift)
        return (z - mean) * torch.exp(-log_std)

    def unwhiten(self, eps: Tensor, cond: Tensor | None = None,
                 shift: tuple[Tensor, Tensor] | None = None
                 ) -> Tensor:  # pragma: no cover - interface
        """z = μ + σ·ε, the inverse of ``whiten``, B×C×H×W (μ, log σ shifted by ``shift``)."""
        raise NotImplementedError


class MARPrior(Prior):
    """mAR-SCF channel-autoregressive prior p(z | z1) = Π_c N(z_c; μ_c, σ_c²).

    (μ_c, log σ_c) = Conv_out(LSTM_c), where the conv-LSTM's input at step c is
    Conv_in([z_{c−1}, emb(z1)]) (z_0 = 0), emb = Conv5×5(→32) → ReLU → Conv5×5(→4). Without
    conditioning (the last level) the input is Conv_in(z_{c−1}). Channels are the time axis, each
    channel an H×W map, so the prior is fully convolutional (any H×W, any batch size).

    Because Conv_in is linear, Conv_in([z, e]) = Conv_z(z) + Conv_e(e): emb(z1) and its conv are
    computed once per call, not once per channel. Training (``log_prob``) runs all channels at
    once under teacher forcing; only ``sample`` is sequential over channels.

    Decision (``output_init``): "random" (default) initialises the output conv as mAR-SCF does
    (PyTorch's default); "zero" starts the prior as N(0, I) (Glow's learned prior). Zero blocks
    every gradient into the conv-LSTM, Conv_in and emb until the output weights have grown, and
    under the lr warm-up that takes thousands of images (the measurement: README, "The mAR
    prior's output initialisation").

    Source: Mahajan et al., "Normalizing Flows with Multi-Scale Autoregressive Priors",
    CVPR 2020 (code visinf/mar-scf, ``ChannelPriorUniScale``).

    Args:
        num_channels: C of the modelled latent (the number of autoregressive steps).
        cond_channels: channels of the conditioning z1; 0 for an unconditional prior.
        hidden_channels: width of the conv-LSTM (mAR-SCF: 32).
        num_layers: conv-LSTM layers (mAR-SCF: 3).
        kernel_size: kernel of the input and gate convs (mAR-SCF: 5, 5, 3 by level).
        dilation: dilation of the gate convs (mAR-SCF: 2, 1, 1 by level).
        cond_hidden_channels: hidden width of emb (mAR-SCF: 32).
        embed_channels: output channels of emb (mAR-SCF: 4).
        output_init: "random" or "zero" (the output conv's initialisation, see above).
    """

    def __init__(self, num_channels: int, cond_channels: int = 0, hidden_channels: int = 32,
                 num_layers: int = 3, kernel_size: int = 5, dilation: int = 1,
                 cond_hidden_channels: int = 32, embed_channels: int = 4,
                 output_init: str = "random") -> None:
        super().__init__()
        check_choice("output_init", output_init, OUTPUT_INITS)
        self.num_channels = num_channels
        self.cond_channels = cond_channels
        pad = kernel_size // 2
        if cond_channels > 0:
            self.embed = nn.Sequential(
                nn.Conv2d(cond_channels, cond_hidden_channels, 5, padding=2),
                nn.ReLU(),
                nn.Conv2d(cond_hidden_channels, embed_channels, 5, padding=2),
            )
            self.in_cond = nn.Conv2d(embed_channels, hidden_channels, kernel_size, padding=pad,
                                     bias=False)
        self.in_z = nn.Conv2d(1, hidden_channels, kernel_size, padding=pad)
        self.lstm = ConvLSTM(hidden_channels, hidden_channels, num_layers, kernel_size, dilation)
        self.out = nn.Conv2d(hidden_channels, 2, 3, padding=1)
        if output_init == "zero":
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def _cond_input(self, cond: Tensor | None) -> Tensor | None:
        """Conv_e(emb(z1)), B×hidden×H×W, or None without conditioning."""
        if self.cond_channels == 0:
            return None
        if cond is None:
            raise ValueError("this prior is conditional: pass cond (the kept half z1)")
        return self.in_cond(self.embed(cond))

    def mean_and_log_std(self, z: Tensor, cond: Tensor | None = None,
                         shift: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced (μ, log σ) of every channel given the channels before it (plus
        ``shift``); B×C×H×W, float32 under autocast (the convolutions run in the autocast
        dtype)."""
        b, c, h, w = z.shape
        if c != self.num_channels:
            raise ShapeError(f"prior expects {self.num_channels} channels, got {c}")
        # Step t sees z_{t−1}: shift the channels by one, a zero map first. Time-major layout.
        prev = torch.cat([z.new_zeros(b, 1, h, w), z[:, :-1]], 1).transpose(0, 1)
        x_seq = self.in_z(prev.reshape(c * b, 1, h, w)).view(c, b, -1, h, w)
        e = self._cond_input(cond)
        if e is not None:
            x_seq = x_seq + e.unsqueeze(0)
        h_seq = self.lstm(x_seq)
        out = upcast(self.out(h_seq.reshape(c * b, -1, h, w))).view(c, b, 2, h, w)
        mean, log_std = out.unbind(2)
        mean, log_std = mean.transpose(0, 1), log_std.transpose(0, 1)
        if shift is None:
            return mean, log_std
        return mean + shift[0], log_std + shift[1]

    def draw_noise(self, num_samples: int, height: int, width: int,
                   generator: torch.Generator | None = None) -> Tensor:
        """ε of every channel, C×B×1×H×W: one draw per channel in channel order (the numbers
        a per-step draw inside the sampling loop would get)."""
        like = self.out.weight[:0]
        like = like.to(upcast(like).dtype)
        return torch.stack([randn_like_on((num_samples, 1, height, width), like, generator)
                            for _ in range(self.num_channels)])

    @torch.no_grad()
    def sample_from_noise(self, num_samples: int, height: int, width: int,
                          cond: Tensor | Guided | None, temperature: float, noise: Tensor | None,
                          shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """z_c = μ_c + T·σ_c·ε_c channel by channel, B×C×H×W; ``noise`` None (T = 0): the
        mode chain z_c = μ_c. ``shift``, a ``Guided`` ``cond``: the module docstring (under
        guidance the conv-LSTM runs the class's and the null class's chains side by side, a
        batch of 2B, both fed the one sampled z_{<c}).

        The sampled z_c (not the mean) feeds step c + 1, as in ancestral sampling. The loop has
        static shapes, preallocated state (``ConvLSTM.begin``), no random-number generation
        and no host synchronisation: a CUDA graph can capture it.
        """
        ref = self.out.weight
        c_len = self.num_channels
        guided = isinstance(cond, Guided)
        e = (torch.cat([self._cond_input(cond.cond), self._cond_input(cond.uncond)])
             if guided else self._cond_input(cond))
        rows = 2 * num_samples if guided else num_samples
        z = torch.empty(num_samples, c_len, height, width, dtype=upcast(ref[:0]).dtype,
                        device=ref.device)
        state = self.lstm.begin(z[:1, :1].expand(rows, self.lstm.in_channels, -1, -1))
        # Step 0's input is Conv_in(0) + e = b_in + e.
        first = self.in_z.bias.view(1, -1, 1, 1).expand(rows, -1, height, width)
        for step in range(c_len):
            x = first if step == 0 else self.in_z(z[:, step - 1: step])
            if guided and step:
                x = torch.cat([x, x])
            if e is not None:
                x = x + e
            state.input.copy_(x)
            out = upcast(self.out(self.lstm.step(None, state)))
            if guided:
                out = guide(*out.chunk(2), cond.weight)
            with full_precision(out):
                mean, log_std = out[:, :1], out[:, 1:]
                if shift is not None:
                    mean = mean + shift[0][:, step: step + 1]
                    log_std = log_std + shift[1][:, step: step + 1]
                if noise is None:
                    z[:, step: step + 1].copy_(mean)
                else:
                    z[:, step: step + 1].copy_(log_std).exp_().mul_(noise[step]).mul_(
                        temperature).add_(mean)
        return z

    def unwhiten(self, eps: Tensor, cond: Tensor | None = None,
                 shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """z_c = μ_c(z_{<c}, cond) + σ_c·ε_c channel by channel (``sample_from_noise`` at T = 1
        with the given noise ε, B×C×H×W); the inverse of ``whiten``."""
        b, c, h, w = eps.shape
        if c != self.num_channels:
            raise ShapeError(f"prior expects {self.num_channels} channels, got {c}")
        return self.sample_from_noise(b, h, w, cond, 1.0, eps.transpose(0, 1).unsqueeze(2),
                                      shift)


class GaussianPrior(Prior):
    """Diagonal Gaussian p(z | z1) = N(z; μ(z1), diag σ(z1)²) (Glow's split prior).

    With conditioning, (μ, log σ) = ZeroConv3×3(z1) interleaved; without, a learned per-channel
    (μ, log σ). Both start at N(0, I). Source: Kingma & Dhariwal, "Glow", NeurIPS 2018.

    **Decision** (``log_std_bound`` c): Glow's conditional log σ is linear in z1, so sampling
    z = μ + T·σ·ε amplifies ε by a factor that grows exponentially with z1. With c > 0, log σ
    is soft-capped above (``core.soft_cap``: raw where raw ≤ 0, c·tanh(raw/c) above), so σ < e^c
    for any z1; small σ (a contraction when sampling) is left as it is. None (the default of
    this class) is Glow's prior.

    Args:
        num_channels: C of the modelled latent.
        cond_channels: channels of the conditioning z1; 0 for an unconditional prior.
        log_std_bound: c, or None for an unbounded log σ.
    """

    def __init__(self, num_channels: int, cond_channels: int = 0,
                 log_std_bound: float | None = None) -> None:
        super().__init__()
        check_bound("log_std_bound", log_std_bound)
        self.num_channels = num_channels
        self.cond_channels = cond_channels
        self.log_std_bound = log_std_bound
        if cond_channels > 0:
            self.net = ZeroConv2d(cond_channels, 2 * num_channels)
        else:
            self.mean = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
            self.log_std = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def _params(self, b: int, h: int, w: int, cond: Tensor | Guided | None,
                shift: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(μ, log σ): the raw parameters (guided, shifted), log σ soft-capped last, so the
        bound holds for every class and guidance weight."""
        mean, log_std = self._raw(b, h, w, cond)
        if shift is not None:
            mean, log_std = mean + shift[0], log_std + shift[1]
        return mean, soft_cap(log_std, self.log_std_bound)

    def _raw(self, b: int, h: int, w: int, cond: Tensor | Guided | None
             ) -> tuple[Tensor, Tensor]:
        if isinstance(cond, Guided):
            return guide(self._raw(b, h, w, cond.cond), self._raw(b, h, w, cond.uncond),
                         cond.weight)
        if self.cond_channels == 0:
            return (self.mean.expand(b, -1, h, w), self.log_std.expand(b, -1, h, w))
        if cond is None:
            raise ValueError("this prior is conditional: pass cond (the kept half z1)")
        out = upcast(self.net(cond))
        return out[:, 0::2], out[:, 1::2]

    def mean_and_log_std(self, z: Tensor, cond: Tensor | None = None,
                         shift: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(μ, log σ), B×C×H×W."""
        if z.shape[1] != self.num_channels:
            raise ShapeError(f"prior expects {self.num_channels} channels, got {z.shape[1]}")
        return self._params(z.shape[0], z.shape[2], z.shape[3], cond, shift)

    def draw_noise(self, num_samples: int, height: int, width: int,
                   generator: torch.Generator | None = None) -> Tensor:
        """ε, B×C×H×W."""
        like = self.net.conv.weight[:0] if self.cond_channels else self.mean[:0]
        like = like.to(upcast(like).dtype)
        return randn_like_on((num_samples, self.num_channels, height, width), like, generator)

    @torch.no_grad()
    def sample_from_noise(self, num_samples: int, height: int, width: int,
                          cond: Tensor | Guided | None, temperature: float, noise: Tensor | None,
                          shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """z = μ + T·σ·ε, B×C×H×W; ``noise`` None (T = 0) gives the mean. ``shift``, a
        ``Guided`` ``cond``: the module docstring."""
        mean, log_std = self._params(num_samples, height, width, cond, shift)
        if noise is None:
            return mean.clone()
        return mean + temperature * torch.exp(log_std) * noise

    def unwhiten(self, eps: Tensor, cond: Tensor | None = None,
                 shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """z = μ(cond) + σ(cond)·ε, B×C×H×W; the inverse of ``whiten``."""
        if eps.shape[1] != self.num_channels:
            raise ShapeError(f"prior expects {self.num_channels} channels, got {eps.shape[1]}")
        mean, log_std = self._params(eps.shape[0], eps.shape[2], eps.shape[3], cond, shift)
        return mean + torch.exp(log_std) * eps
