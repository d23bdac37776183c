"""Non-invertible building blocks shared by several layers and priors: a zero-initialised
convolution and the convolutional LSTM of the mAR prior."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..precision import compute_dtype, full_precision, upcast


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


def _conv_input_grad(grad_out: Tensor, like: Tensor, weight: Tensor, padding: tuple[int, ...],
                     dilation: tuple[int, ...]) -> Tensor:
    """∂L/∂x of y = conv2d(x, W) (stride 1, "same" padding), x shaped like ``like``."""
    return torch.ops.aten.convolution_backward(
        grad_out, like, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0], 1,
        [True, False, False])[0]


def _conv_weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, ...],
                      dilation: tuple[int, ...]) -> Tensor:
    """∂L/∂W of y = conv2d(x, W) summed over the batch of x (one call for all frames)."""
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0], 1,
        [False, True, False])[1]


class _Recurrence(torch.autograd.Function):
    """The hidden recurrence of one conv-LSTM layer under teacher forcing, forward and backward
    written out (cuDNN-RNN style) so that nothing is allocated or concatenated per step:

    forward, per step t: a_t = gx_t + Conv_hh(h_{t−1}) written into row t of one T×B×4C buffer
    (the gate convolution is the only per-step op that allocates), then in place
    (σ(i), σ(f), σ(o), tanh(g)), c_t = σ(f)·c_{t−1} + σ(i)·tanh(g), h_t = σ(o)·tanh(c_t), each
    into row t of a preallocated sequence buffer.
    backward: the gate gradients of every step go into one T×B×4C buffer; per step only the
    input gradient of Conv_hh is sequential (dh_{t−1} = Conv_hhᵀ(da_t)); the weight gradient of
    Conv_hh is one batched call over all (T−1)·B frames at the end.

    Precision (``attnflow_zoo.precision``): the gate convolutions run in ``cdt`` (bf16 under
    bf16 autocast), the gates, the cell state and every nonlinearity in float32 (float64 stays
    float64); h is returned and kept for the backward in ``cdt``.
    Static shapes, no host synchronisation, no data-dependent branch: a CUDA graph (e.g.
    ``torch.compile(mode="reduce-overhead")``) can capture it.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gx: Tensor, w_hh: Tensor,
                padding: tuple[int, ...], dilation: tuple[int, ...],
                cdt: torch.dtype) -> Tensor:
        with full_precision(gx):
            t_len, k = gx.shape[0], w_hh.shape[1]
            # T×B×4k, becomes (σ(i), σ(f), σ(o), tanh(g)) in place.
            acts = gx.to(upcast(gx[:0]).dtype, copy=True)
            cell = torch.empty_like(acts[:, :, :k])
            tanh_c = torch.empty_like(cell)
            h_seq = torch.empty(cell.shape, dtype=cdt, device=cell.device)
            w = w_hh.to(cdt)
            for t in range(t_len):
                a = acts[t]
                if t:
                    a.add_(F.conv2d(h_seq[t - 1], w, None, 1, padding, dilation))
                a[:, : 3 * k].sigmoid_()
                a[:, 3 * k:].tanh_()
                i, f, o, g = a.split(k, 1)
                if t:
                    torch.mul(f, cell[t - 1], out=cell[t])
                    cell[t].addcmul_(i, g)
                else:
                    torch.mul(i, g, out=cell[t])
                torch.tanh(cell[t], out=tanh_c[t])
                torch.mul(o, tanh_c[t], out=h_seq[t])
        ctx.save_for_backward(w_hh, h_seq, acts, cell, tanh_c)
        ctx.conv = (padding, dilation, cdt, gx.dtype)
        return h_seq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_h: Tensor
                 ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        w_hh, h_seq, acts, cell, tanh_c = ctx.saved_tensors
        padding, dilation, cdt, gx_dtype = ctx.conv
        with full_precision(acts):
            t_len, k = acts.shape[0], w_hh.shape[1]
            w = w_hh.to(cdt)
            grad_a = torch.empty_like(acts)
            # Low-precision copy of the gate gradients for the convolutions (same buffer when
            # the convolutions run in the state's dtype).
            grad_a_low = grad_a if cdt == acts.dtype else torch.empty_like(grad_a, dtype=cdt)
            grad_c = torch.empty_like(cell[0])
            grad_h_t = torch.empty_like(grad_c)
            tmp = torch.empty_like(grad_c)
            dsig = torch.empty_like(grad_c)
            for t in reversed(range(t_len)):
                i, f, o, g = acts[t].split(k, 1)
                gi, gf, go, gg = grad_a[t].split(k, 1)
                grad_h_t.copy_(grad_h[t])
                if t < t_len - 1:
                    grad_h_t.add_(_conv_input_grad(grad_a_low[t + 1], h_seq[t], w, padding,
                                                   dilation))
                # h = o·tanh(c): ∂o (times σ' = o − o²) and ∂c = ∂h·o·(1 − tanh² c).
                torch.mul(grad_h_t, tanh_c[t], out=go)
                go.mul_(torch.addcmul(o, o, o, value=-1, out=dsig))
                torch.mul(tanh_c[t], tanh_c[t], out=tmp).mul_(o).neg_().add_(o).mul_(grad_h_t)
                if t < t_len - 1:  # + ∂c_{t+1}/∂c_t = f_{t+1}
                    grad_c.mul_(acts[t + 1][:, k: 2 * k]).add_(tmp)
                else:
                    grad_c.copy_(tmp)
                # c = f·c_{t−1} + i·g.
                torch.mul(grad_c, g, out=gi)
                gi.mul_(torch.addcmul(i, i, i, value=-1, out=dsig))
                if t:
                    torch.mul(grad_c, cell[t - 1], out=gf)
                    gf.mul_(torch.addcmul(f, f, f, value=-1, out=dsig))
                else:
                    gf.zero_()
                torch.mul(g, g, out=gg).mul_(i).neg_().add_(i).mul_(grad_c)  # ·i(1 − g²)
                if grad_a_low is not grad_a:
                    grad_a_low[t].copy_(grad_a[t])
            grad_w = None
            if ctx.needs_input_grad[1]:
                if t_len > 1:
                    frames = (t_len - 1) * h_seq.shape[1]
                    grad_w = _conv_weight_grad(
                        grad_a_low[1:].reshape(frames, *grad_a.shape[2:]),
                        h_seq[:-1].reshape(frames, *h_seq.shape[2:]), w, padding,
                        dilation).to(w_hh.dtype)
                else:
                    grad_w = torch.zeros_like(w_hh)
        grad_gx = grad_a.to(gx_dtype) if ctx.needs_input_grad[0] else None
        return grad_gx, grad_w, None, None, None


class LSTMState:
    """Preallocated buffers of one ``ConvLSTM`` stepping run (``ConvLSTM.begin``).

    Per layer l: ``xh[l]`` = [x_l | h_l] (B × (C_in,l + C_h) × H × W, in the convolutions'
    dtype), the input of that layer's one fused gate convolution; ``cell[l]`` (B × C_h × H × W)
    and ``acts[l]`` (B × 4C_h × H × W) in float32 (float64 models: float64). Layer l's new h is
    written into its own slot of ``xh[l]`` and copied into the input slot of ``xh[l + 1]``, so
    a step allocates nothing but its convolutions' outputs.
    """

    def __init__(self, xh: list[Tensor], cell: list[Tensor], acts: list[Tensor],
                 weights: list[tuple[Tensor, Tensor, Tensor | None]], in_channels: int) -> None:
        self.xh, self.cell, self.acts, self.weights = xh, cell, acts, weights
        self.in_channels = in_channels
        self.steps = 0

    @property
    def input(self) -> Tensor:
        """The slot the next step's input x (B × C_in × H × W) is written into."""
        return self.xh[0][:, : self.in_channels]


class ConvLSTM(nn.Module):
    """Multi-layer convolutional LSTM (Shi et al. 2015), the recurrence of mAR-SCF's prior.

    Per layer, with gates = Conv_ih(x_t) + Conv_hh(h_{t−1}) split into (i, f, o, g):
    c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g),  h_t = σ(o) ⊙ tanh(c_t), h_0 = c_0 = 0. Every conv
    keeps H×W ("same" padding for its kernel and dilation). Layer l's input is layer l−1's h.

    Two schedules compute the same function:

    - ``forward(x_seq)``, all steps known (teacher forcing): layer by layer, Conv_ih runs once
      over all T·B frames; only the hidden recurrence is sequential (``_Recurrence``: buffers
      written in place, a hand-written backward with one batched Conv_hh weight gradient).
    - ``begin`` + ``step`` (sampling): per step and layer one fused gate conv on [x | h] with
      [W_ih | W_hh] (one conv instead of two), into preallocated buffers (``LSTMState``).

    Precision: gate convolutions in the autocast dtype when autocast is on, gates and cell
    state in float32 (``attnflow_zoo.precision``). Shapes are static and no step reads a value
    back to the host, so a CUDA graph can capture either schedule.

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
        self.in_channels = in_channels
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

    def forward(self, x_seq: Tensor) -> Tensor:
        t, b = x_seq.shape[:2]
        h_seq = x_seq
        for ih, hh in zip(self.ih, self.hh, strict=True):
            gates_x = ih(h_seq.reshape(t * b, *h_seq.shape[2:]))
            cdt = compute_dtype(hh.weight)
            h_seq = _Recurrence.apply(gates_x.view(t, b, *gates_x.shape[1:]), hh.weight,
                                      hh.padding, hh.dilation, cdt)
        return h_seq

    @torch.no_grad()
    def begin(self, like: Tensor) -> LSTMState:
        """Zero state for stepping inputs shaped like ``like`` (B × C_in × H × W); the
        convolutions' dtype is fixed here (autocast's if on), with weights cast once."""
        b, _, h, w = like.shape
        k = self.hidden_channels
        cdt = compute_dtype(self.hh[0].weight)
        acc = upcast(self.hh[0].weight).dtype
        xh, cell, acts, weights = [], [], [], []
        for ih, hh in zip(self.ih, self.hh, strict=True):
            cin = ih.in_channels
            xh.append(torch.zeros(b, cin + k, h, w, dtype=cdt, device=like.device))
            cell.append(torch.zeros(b, k, h, w, dtype=acc, device=like.device))
            acts.append(torch.empty(b, 4 * k, h, w, dtype=acc, device=like.device))
            bias = None if ih.bias is None else ih.bias.to(cdt)
            weights.append((torch.cat([ih.weight, hh.weight], 1).to(cdt), ih.weight.to(cdt),
                            bias))
        return LSTMState(xh, cell, acts, weights, self.in_channels)

    @torch.no_grad()
    def step(self, x: Tensor | None, state: LSTMState) -> Tensor:
        """One time step of every layer, in place on ``state``; returns the top layer's h
        (B × C_h × H × W, a view into ``state``). ``x`` None: the input is already in
        ``state.input``."""
        k = self.hidden_channels
        first = state.steps == 0
        if x is not None:
            state.input.copy_(x)
        with full_precision(state.xh[0]):
            for layer, conv in enumerate(self.ih):
                xh, cell, acts = state.xh[layer], state.cell[layer], state.acts[layer]
                w_cat, w_ih, bias = state.weights[layer]
                cin = conv.in_channels
                if first:  # h = c = 0: only the input half of the fused conv contributes.
                    gates = F.conv2d(xh[:, :cin], w_ih, bias, 1, conv.padding, conv.dilation)
                else:
                    gates = F.conv2d(xh, w_cat, bias, 1, conv.padding, conv.dilation)
                acts.copy_(gates)
                acts[:, : 3 * k].sigmoid_()
                acts[:, 3 * k:].tanh_()
                i, f, o, g = acts.split(k, 1)
                if first:
                    torch.mul(i, g, out=cell)
                else:
                    cell.mul_(f).addcmul_(i, g)
                h = xh[:, cin:]
                torch.mul(o, torch.tanh(cell, out=g), out=h)  # g is spent: its slot is scratch
                if layer + 1 < len(self.ih):
                    state.xh[layer + 1][:, :k].copy_(h)
        state.steps += 1
        return state.xh[-1][:, self.ih[-1].in_channels:]
