"""Non-invertible building blocks shared by several layers and priors: a zero-initialised
convolution and the convolutional LSTM of the mAR prior."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ZeroConv2d(nn.Module):
    """Conv2d initialised to zero, output scaled by exp(3·logs) (Glow's ``Conv2dZeros``).

    Zero initialisation makes the layer that uses it start at (or next to) the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class ConvLSTM(nn.Module):
    """Multi-layer convolutional LSTM (Shi et al. 2015), the recurrence of mAR-SCF's prior.

    Per layer, with gates = Conv_ih(x_t) + Conv_hh(h_{t−1}) split into (i, f, o, g):
    c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g),  h_t = σ(o) ⊙ tanh(c_t). Every conv keeps H×W
    ("same" padding for its kernel and dilation). Layer l's input is layer l−1's h.

    Two schedules compute the same function:

    - ``forward(x_seq)``, all steps known (teacher forcing): layer by layer, the input-to-hidden
      conv of a layer runs once over all T·B frames; only the hidden recurrence is sequential.
    - ``step(x, state)``, one step of all layers (sampling): one fused conv per layer on
      cat(x, h) with cat(W_ih, W_hh), so each step is a single conv per layer.

    Shapes: x_seq is T×B×C_in×H×W; outputs T×B×C_h×H×W (the top layer's h).

    Args:
        in_channels: C_in of the input at each step.
        hidden_channels: C_h of every layer.
        num_layers: stacked layers.
        kernel_size: odd conv kernel of every gate conv.
        dilation: dilation of every gate conv.
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_layers: int = 3,
                 kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("ConvLSTM needs an odd kernel_size")
        pad = dilation * (kernel_size // 2)
        self.hidden_channels = hidden_channels
        self.ih = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else hidden_channels, 4 * hidden_channels,
                      kernel_size, padding=pad, dilation=dilation)
            for i in range(num_layers))
        self.hh = nn.ModuleList(
            nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=pad,
                      dilation=dilation, bias=False)
            for _ in range(num_layers))
        with torch.no_grad():
            # Forget-gate bias +1 (Jozefowicz et al. 2015): remember by default at init.
            for conv in self.ih:
                conv.bias[hidden_channels: 2 * hidden_channels].fill_(1.0)

    def _cell(self, gates: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        # Gate order (i, f, o, g): one sigmoid over the first three quarters. split/chunk (not
        # slicing) so that backward concatenates once instead of zero-filling per slice.
        k = self.hidden_channels
        sig, g = gates.split([3 * k, k], 1)
        i, f, o = torch.sigmoid(sig).chunk(3, 1)
        ig = i * torch.tanh(g)
        c_new = ig if c is None else torch.addcmul(ig, f, c)
        return o * torch.tanh(c_new), c_new

    def forward(self, x_seq: Tensor) -> Tensor:
        t, b = x_seq.shape[:2]
        h_seq = x_seq
        for ih, hh in zip(self.ih, self.hh, strict=True):
            gates_x = ih(h_seq.reshape(t * b, *h_seq.shape[2:]))
            # unbind, not gates_x[step]: one backward stack instead of T full-size zero fills.
            gates_steps = gates_x.view(t, b, *gates_x.shape[1:]).unbind(0)
            h, c = None, None
            outs = []
            for gx in gates_steps:
                gates = gx if h is None else gx + hh(h)
                h, c = self._cell(gates, c)
                outs.append(h)
            h_seq = torch.stack(outs)
        return h_seq

    def fused_weights(self) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """Per layer (cat(W_ih, W_hh) on the input dim, b_ih, W_ih), for ``step``."""
        return [(torch.cat([ih.weight, hh.weight], 1), ih.bias, ih.weight)
                for ih, hh in zip(self.ih, self.hh, strict=True)]

    def step(self, x: Tensor, state: list[tuple[Tensor, Tensor]] | None,
             weights: list[tuple[Tensor, Tensor | None, Tensor]] | None = None
             ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One time step of every layer: (top h, new state). ``state`` None means zeros."""
        if weights is None:
            weights = self.fused_weights()
        conv = self.ih[0]
        new_state = []
        for i, (w_cat, bias, w_ih) in enumerate(weights):
            if state is None:  # h = c = 0: the hidden conv contributes nothing.
                gates = F.conv2d(x, w_ih, bias, padding=conv.padding, dilation=conv.dilation)
                h, c = self._cell(gates, None)
            else:
                h_prev, c_prev = state[i]
                gates = F.conv2d(torch.cat([x, h_prev], 1), w_cat, bias, padding=conv.padding,
                                 dilation=conv.dilation)
                h, c = self._cell(gates, c_prev)
            new_state.append((h, c))
            x = h
        return x, new_state
