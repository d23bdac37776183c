"""One token through a TarFlow block's transformer over a key/value cache: the inner loop of
the block's token-by-token inverse (``layers.tarflow``; SPEC §6).

At step t the token u_t (B×d) enters with its position (+ context) embedding e_t; every layer
writes its key and value of u_t into the cache and attends to the tokens 0..t held there:

    h ← W_in u_t + e_t
    per layer:  (q, k_t, v_t) = W_qkv LN₁(h),   o = softmax(q K_{0..t}ᵀ / (√d_h·τ)) V_{0..t}
                h ← h + W_o o,   h ← h + W_2 GELU(W_1 LN₂(h))
    (a_{t+1}, b_{t+1}) = W_out h

which is the parallel causal pass (``TarFlowBlock.conditioner``) at token t, in exact arithmetic
(the order of some roundings differs). ``TokenStep`` reads a block's weights once per inverse,
as plain tensors (views, or arranged once: W_qkv's rows head-major with 1/(√d_h·τ) folded into
the q rows; the last layer's W_2 folded into the head), so that the per-token loop is tensor
operations only: no module calls, no parameter look-ups. The attention is two batched products
over the B·H heads, each reading the cached keys and values of tokens 0..t as one contiguous
block per head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..core import soft_cap
from ..precision import upcast


class _LayerWeights(NamedTuple):
    """One transformer layer's tensors and its slice of the cache (``TokenStep``)."""

    norm1: tuple[Tensor, Tensor, float]
    qkv: tuple[Tensor, Tensor]  # (bias, W_qkvᵀ)
    proj: tuple[Tensor, Tensor]
    norm2: tuple[Tensor, Tensor, float]
    hidden: tuple[Tensor, Tensor]  # (b_1 as a column, W_1): the product is formed transposed
    out: tuple[Tensor, Tensor]
    kv: Tensor  # 2×(B·H)×T×d_h: this layer's keys and values (a view of the cache)
    keys: Tensor  # (B·H)×d_h×T: kv[0] transposed (a view)
    values: Tensor  # (B·H)×T×d_h: kv[1] (a view)


def _linear(module: torch.nn.Linear) -> tuple[Tensor, Tensor]:
    return module.bias, module.weight.t()


def scale_shift(out: Tensor, affine: bool, bound: float | None = None
                ) -> tuple[Tensor, Tensor]:
    """(a, b) of a block's head output (…×2d: a then b; …×d and a = 0 for a volume-preserving
    block). With ``bound`` c the log-scale is soft-capped above, a = ``core.soft_cap``(raw, c)
    (raw where raw ≤ 0, c·tanh(raw/c) above: a < c, so the inverse's exp(a) < e^c for any
    input); ``bound`` None: a = raw, ml-tarflow's map (both halves are then views)."""
    if not affine:
        return torch.zeros_like(out), out
    d = out.shape[-1] // 2
    return soft_cap(out[..., :d], bound), out[..., d:]


def _norm(module: torch.nn.LayerNorm) -> tuple[Tensor, Tensor, float]:
    return module.weight, module.bias, module.eps


class TokenStep:
    """(a_{t+1}, b_{t+1}) of a block from its token t, over a key/value cache (module doc).

    The last layer's MLP output and the head are one affine map of (h, GELU(·)) and are
    applied as such: W_out(h + W_2 g + b_2) + b_out = W_out h + (W_out W_2) g + (W_out b_2 +
    b_out), with W_out W_2 (2d × hidden) formed once per inverse.

    Args:
        block: the ``TarFlowBlock`` (its weights are read now; do not change them while the
            step is in use).
        kv: the cache tensor, layers×2×B×H×T×d_h (``KVCache.kv``); step t writes token t's
            keys and values and reads tokens 0..t.
        embeddings: e, what each step adds to W_in u_t: T×W, or T×B×W with a context.
        temperature: τ, dividing the attention logits.
    """

    def __init__(self, block: torch.nn.Module, kv: Tensor, embeddings: Tensor,
                 temperature: float = 1.0) -> None:
        _, _, batch, heads, length, head_dim = kv.shape
        self.shape = (batch, heads, head_dim)
        self.scale = head_dim ** -0.5 / temperature
        self.affine = block.affine
        self.bound = block.log_scale_bound
        self.embeddings = embeddings.unbind(0)
        self.proj_in = _linear(block.proj_in)
        self.layers = [
            _LayerWeights(_norm(layer.attention.norm), self._qkv(layer.attention.qkv),
                          _linear(layer.attention.proj), _norm(layer.mlp.norm),
                          (layer.mlp.hidden.bias[:, None], layer.mlp.hidden.weight),
                          _linear(layer.mlp.out),
                          kv[i].view(2, batch * heads, length, head_dim),
                          kv[i, 0].view(batch * heads, length, head_dim).transpose(1, 2),
                          kv[i, 1].view(batch * heads, length, head_dim))
            for i, layer in enumerate(block.layers)]
        w_out, mlp_out = block.proj_out.weight, block.layers[-1].mlp.out
        self.head = (torch.addmv(block.proj_out.bias, w_out, mlp_out.bias), w_out.t(),
                     (w_out @ mlp_out.weight).t())

    def _qkv(self, qkv: torch.nn.Linear) -> tuple[Tensor, Tensor]:
        """(bias, Wᵀ) of W_qkv with its rows in head-major order (per head: q, k, v, so that
        the q of all B·H heads is one strided (B·H)×1×d_h view of the product) and the q rows
        scaled by 1/(√d_h·τ)."""
        _, heads, head_dim = self.shape
        scale = torch.ones(3, 1, 1, dtype=qkv.weight.dtype, device=qkv.weight.device)
        scale[0] = self.scale
        weight = (qkv.weight.view(3, heads, head_dim, -1) * scale[..., None]).transpose(0, 1)
        bias = (qkv.bias.view(3, heads, head_dim) * scale).transpose(0, 1)
        return bias.reshape(-1), weight.reshape(3 * heads * head_dim, -1).t()

    def __call__(self, token: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(a_{t+1}, b_{t+1}), B×d each (float32 under autocast), from token t (B×d)."""
        h = torch.addmm(self.proj_in[0], token, self.proj_in[1]) + self.embeddings[t]
        *inner, last = self.layers
        for weights in inner:
            h = self._attend(h, weights, t)
            h += torch.addmm(weights.out[0], self._hidden(h, weights), weights.out[1])
        h = self._attend(h, last, t)
        bias, w_out, w_fold = self.head
        out = upcast(torch.addmm(torch.addmm(bias, h, w_out), self._hidden(h, last), w_fold))
        return scale_shift(out, self.affine, self.bound)

    def _attend(self, h: Tensor, w: _LayerWeights, t: int) -> Tensor:
        """h + W_o·attention(LN₁(h)) at token t, writing its key and value into the cache."""
        batch, heads, head_dim = self.shape
        qkv = torch.addmm(w.qkv[0], F.layer_norm(h, (heads * head_dim,), *w.norm1), w.qkv[1])
        qkv = qkv.view(batch * heads, 3, head_dim)
        w.kv.select(2, t).copy_(qkv[:, 1:].transpose(0, 1))
        q = qkv[:, :1]
        p = torch.bmm(q, w.keys[:, :, :t + 1]).softmax(-1)
        o = torch.bmm(p, w.values[:, :t + 1]).view(batch, heads * head_dim)
        return h + torch.addmm(w.proj[0], o, w.proj[1])

    def _hidden(self, h: Tensor, w: _LayerWeights) -> Tensor:
        """GELU(W_1 LN₂(h) + b_1), B×hidden (a transposed view)."""
        # Formed transposed, (W_1 LN₂(h)ᵀ + b_1)ᵀ: GELU of the strided view runs ATen's
        # elementwise kernel rather than oneDNN's, whose per-call set-up outweighs a GELU of
        # B×hidden numbers; the products that take it read the transposed layout as is.
        pre = torch.addmm(w.hidden[0], w.hidden[1], F.layer_norm(h, h.shape[-1:], *w.norm2).t())
        return F.gelu(pre.t())
