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


def _dsigmoid(s: Tensor, buf: Tensor) -> Tensor:
    """σ'(x) = s − s² from s = σ(x), written into ``buf``."""
    return buf.copy_(s).square_().neg_().add_(s)


# --- the teacher-forced recurrence of one conv-LSTM layer ---------------------------------------
# Eagerly it is an autograd.Function (``_Recurrence``). Under ``torch.compile`` the same two
# functions are custom operators with a registered autograd formula, so the compiler sees each
# as one opaque call: no graph break, and no T-step loop unrolled into the graph (which made
# compiling the reference configuration take tens of minutes). Eager code does not call the
# custom operators: their first call imports torch._dynamo (~6 s).
#
# forward, per step t: a_t = gx_t + Conv_hh(h_{t−1}) written into row t of one T×B×4C buffer
# (the gate convolution is the only per-step op that allocates), then in place
# (σ(i), σ(f), σ(o), tanh(g)), c_t = σ(f)·c_{t−1} + σ(i)·tanh(g), h_t = σ(o)·tanh(c_t), each into
# row t of a preallocated sequence buffer (cuDNN-RNN style: nothing concatenated or stacked).
# backward: the gate gradients of every step go into one T×B×4C buffer; per step only the input
# gradient of Conv_hh is sequential (dh_{t−1} = Conv_hhᵀ(da_t)); Conv_hh's weight gradient is
# one batched call over all (T−1)·B frames at the end, not T small ones.
# Precision (``attnflow_zoo.precision``): the gate convolutions run in ``cdt`` (bf16 under bf16
# autocast), the gates, the cell state and every nonlinearity in float32 (float64 stays
# float64); h is returned and kept for the backward in ``cdt``.
# Static shapes, no host synchronisation, no data-dependent branch: a CUDA graph (e.g.
# ``torch.compile(mode="reduce-overhead")`` or ``torch.cuda.graph``) can capture both. That is
# what the code guarantees; a capture on a GPU has not been run yet (benchmarks/gpu.sh's
# ``bf16+graph`` row does it, and tests/test_step_sync.py checks the step for host syncs on CUDA).


def _recurrence_forward(gx: Tensor, w_hh: Tensor, padding: list[int], dilation: list[int],
                        cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h_seq in cdt, activations, cell, tanh(cell)) of one layer from its input gates gx."""
    with full_precision(gx):
        t_len, k = gx.shape[0], w_hh.shape[1]
        # T×B×4k, becomes (σ(i), σ(f), σ(o), tanh(g)) in place.
        acts = gx.to(upcast(gx[:0]).dtype, copy=True).contiguous()
        cell = torch.empty_like(acts[:, :, :k], memory_format=torch.contiguous_format)
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
                cell[t].copy_(f).mul_(cell[t - 1]).addcmul_(i, g)
            else:
                cell[t].copy_(i).mul_(g)
            tanh_c[t].copy_(cell[t]).tanh_()
            h_seq[t].copy_(o).mul_(tanh_c[t])
    return h_seq, acts, cell, tanh_c


def _recurrence_backward(grad_h: Tensor, w_hh: Tensor, h_seq: Tensor, acts: Tensor,
                         cell: Tensor, tanh_c: Tensor, padding: list[int], dilation: list[int],
                         gx_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(∂L/∂gx, ∂L/∂W_hh) from ∂L/∂h_seq and what the forward kept."""
    cdt = h_seq.dtype
    with full_precision(acts):
        t_len, k = acts.shape[0], w_hh.shape[1]
        w = w_hh.to(cdt)
        grad_a = torch.empty_like(acts)
        # Low-precision copy of the gate gradients for the convolutions (same buffer when the
        # convolutions run in the state's dtype).
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
            go.copy_(grad_h_t).mul_(tanh_c[t]).mul_(_dsigmoid(o, dsig))
            tmp.copy_(tanh_c[t]).square_().mul_(o).neg_().add_(o).mul_(grad_h_t)
            if t < t_len - 1:  # + ∂c_{t+1}/∂c_t = f_{t+1}
                grad_c.mul_(acts[t + 1][:, k: 2 * k]).add_(tmp)
            else:
                grad_c.copy_(tmp)
            # c = f·c_{t−1} + i·g.
            gi.copy_(grad_c).mul_(g).mul_(_dsigmoid(i, dsig))
            if t:
                gf.copy_(grad_c).mul_(cell[t - 1]).mul_(_dsigmoid(f, dsig))
            else:
                gf.zero_()
            gg.copy_(g).square_().mul_(i).neg_().add_(i).mul_(grad_c)  # ·i(1 − g²)
            if grad_a_low is not grad_a:
                grad_a_low[t].copy_(grad_a[t])
        if t_len > 1:
            frames = (t_len - 1) * h_seq.shape[1]
            grad_w = _conv_weight_grad(
                grad_a_low[1:].reshape(frames, *grad_a.shape[2:]),
                h_seq[:-1].reshape(frames, *h_seq.shape[2:]), w, padding,
                dilation).to(w_hh.dtype)
        else:
            grad_w = torch.zeros_like(w_hh)
    return grad_a.to(gx_dtype), grad_w


class _Recurrence(torch.autograd.Function):
    """Eager autograd wrapper of ``_recurrence_forward`` / ``_recurrence_backward``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gx: Tensor, w_hh: Tensor,
                padding: list[int], dilation: list[int], cdt: torch.dtype) -> Tensor:
        h_seq, acts, cell, tanh_c = _recurrence_forward(gx, w_hh, padding, dilation, cdt)
        ctx.save_for_backward(w_hh, h_seq, acts, cell, tanh_c)
        ctx.conv = (padding, dilation, gx.dtype)
        return h_seq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_h: Tensor
                 ) -> tuple[Tensor, Tensor, None, None, None]:
        grad_gx, grad_w = _recurrence_backward(grad_h, *ctx.saved_tensors, *ctx.conv)
        return grad_gx, grad_w, None, None, None


# The same two functions as custom operators, for torch.compile (defining them is cheap).
_recurrence_op = torch.library.custom_op("attnflow_zoo::lstm_recurrence",
                                         _recurrence_forward, mutates_args=())
_recurrence_backward_op = torch.library.custom_op("attnflow_zoo::lstm_recurrence_backward",
                                                  _recurrence_backward, mutates_args=())


@_recurrence_op.register_fake
def _(gx: Tensor, w_hh: Tensor, padding: list[int], dilation: list[int],
      cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    k = w_hh.shape[1]
    acts = gx.new_empty(gx.shape, dtype=upcast(gx[:0]).dtype)
    cell = acts.new_empty((*gx.shape[:2], k, *gx.shape[3:]))
    return cell.new_empty(cell.shape, dtype=cdt), acts, cell, torch.empty_like(cell)


@_recurrence_backward_op.register_fake
def _(grad_h: Tensor, w_hh: Tensor, h_seq: Tensor, acts: Tensor, cell: Tensor, tanh_c: Tensor,
      padding: list[int], dilation: list[int], gx_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return acts.new_empty(acts.shape, dtype=gx_dtype), torch.empty_like(w_hh)


def _op_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    gx, w_hh, padding, dilation, _ = inputs
    ctx.save_for_backward(w_hh, *output)
    ctx.conv = (padding, dilation, gx.dtype)


def _op_grad(ctx: torch.autograd.function.FunctionCtx, grad_h: Tensor,
             *_state_grads: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
    # Only h_seq is used by callers; the other three outputs are state kept for the backward.
    grad_gx, grad_w = _recurrence_backward_op(grad_h, *ctx.saved_tensors, *ctx.conv)
    return grad_gx, grad_w, None, None, None


_recurrence_op.register_autograd(_op_grad, setup_context=_op_setup)


def _recurrence(gx: Tensor, w_hh: Tensor, padding: list[int], dilation: list[int],
                cdt: torch.dtype) -> Tensor:
    """h_seq of one layer: the custom operator while compiling, the autograd.Function else."""
    if torch.compiler.is_compiling():
        return _recurrence_op(gx, w_hh, padding, dilation, cdt)[0]
    return _Recurrence.apply(gx, w_hh, padding, dilation, cdt)


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
        self.started = False  # a bool, not a count: torch.compile guards on it

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
      over all T·B frames; only the hidden recurrence is sequential (``_recurrence``: buffers
      written in place, a hand-written backward with one batched Conv_hh weight gradient; a
      custom operator under torch.compile).
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
            h_seq = _recurrence(gates_x.view(t, b, *gates_x.shape[1:]), hh.weight,
                                list(hh.padding), list(hh.dilation), cdt)
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
        first = not state.started
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
                    cell.copy_(i).mul_(g)
                else:
                    cell.mul_(f).addcmul_(i, g)
                h = xh[:, cin:]
                h.copy_(g.copy_(cell).tanh_().mul_(o))  # g is spent: its slot is scratch
                if layer + 1 < len(self.ih):
                    state.xh[layer + 1][:, :k].copy_(h)
        state.started = True
        return state.xh[-1][:, self.ih[-1].in_channels:]
