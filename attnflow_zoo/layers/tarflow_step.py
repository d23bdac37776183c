"""One token through a TarFlow block's transformer over a key/value cache: the inner loop of
the block's token-by-token inverse (``layers.tarflow``; SPEC §6).

At step t the token u_t (B×d) enters with its position (+ context) embedding e_t; every layer
writes its key and value of u_t into the cache and attends to the tokens 0..t held there:

    h ← W_in u_t + e_t
    per layer:  (q, k_t, v_t) = W_qkv LN₁(h),   o = softmax(q K_{0..t}ᵀ / (√d_h·τ)) V_{0..t}
                h ← h + W_o o,   h ← h + W_2 GELU(W_1 LN₂(h))
    (a_{t+1}, b_{t+1}) = W_out h

which is the parallel causal pass (``TarFlowBlock.conditioner``) at token t. ``TokenStep`` reads
a block's weights once per inverse, as plain tensors (the weight matrices as transposed views),
so that the per-token loop is tensor operations only: no module calls, no parameter look-ups.
The attention is two batched products over the B·H heads, each reading the cached keys and
values of tokens 0..t as one contiguous block per head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..precision import upcast

if TYPE_CHECKING:
    from .tarflow import TarFlowBlock


class _LayerWeights(NamedTuple):
    """One transformer layer's tensors and its slice of the cache (``TokenStep``)."""

    norm1: tuple[Tensor, Tensor, float]
    qkv: tuple[Tensor, Tensor]  # (bias, W_qkvᵀ)
    proj: tuple[Tensor, Tensor]
    norm2: tuple[Tensor, Tensor, float]
    hidden: tuple[Tensor, Tensor]
    out: tuple[Tensor, Tensor]
    kv: Tensor  # 2×B×H×T×d_h: this layer's keys and values
    keys: Tensor  # (B·H)×T×d_h views of kv[0] / kv[1]
    values: Tensor


def _linear(module: torch.nn.Linear) -> tuple[Tensor, Tensor]:
    return module.bias, module.weight.t()


def _norm(module: torch.nn.LayerNorm) -> tuple[Tensor, Tensor, float]:
    return module.weight, module.bias, module.eps


class TokenStep:
    """(a_{t+1}, b_{t+1}) of a block from its token t, over a key/value cache (module doc).

    Args:
        block: the ``TarFlowBlock`` (its weights are read now; do not change them while the
            step is in use).
        kv: the cache tensor, layers×2×B×H×T×d_h (``KVCache.kv``); step t writes token t's
            keys and values and reads tokens 0..t.
        embeddings: e, what each step adds to W_in u_t: T×W, or T×B×W with a context.
        temperature: τ, dividing the attention logits.
    """

    def __init__(self, block: TarFlowBlock, kv: Tensor, embeddings: Tensor,
                 temperature: float = 1.0) -> None:
        _, _, batch, heads, length, head_dim = kv.shape
        self.shape = (batch, heads, head_dim)
        self.scale = head_dim ** -0.5 / temperature
        self.affine = block.affine
        self.embeddings = embeddings
        self.proj_in = _linear(block.proj_in)
        self.proj_out = _linear(block.proj_out)
        self.layers = [
            _LayerWeights(_norm(layer.attention.norm), _linear(layer.attention.qkv),
                          _linear(layer.attention.proj), _norm(layer.mlp.norm),
                          _linear(layer.mlp.hidden), _linear(layer.mlp.out), kv[i],
                          kv[i, 0].view(batch * heads, length, head_dim),
                          kv[i, 1].view(batch * heads, length, head_dim))
            for i, layer in enumerate(block.layers)]

    def __call__(self, token: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(a_{t+1}, b_{t+1}), B×d each (float32 under autocast), from token t (B×d)."""
        h = torch.addmm(self.proj_in[0], token, self.proj_in[1]) + self.embeddings[t]
        for weights in self.layers:
            h = self._layer(h, weights, t)
        out = upcast(torch.addmm(self.proj_out[0], h, self.proj_out[1]))
        if self.affine:
            a, b = out.chunk(2, -1)
            return a, b
        return torch.zeros_like(out), out

    def _layer(self, h: Tensor, w: _LayerWeights, t: int) -> Tensor:
        batch, heads, head_dim = self.shape
        width = heads * head_dim
        qkv = torch.addmm(w.qkv[0], F.layer_norm(h, (width,), *w.norm1), w.qkv[1])
        w.kv[:, :, :, t].copy_(qkv.view(batch, 3, heads, head_dim)[:, 1:].transpose(0, 1))
        q = (qkv[:, :width] * self.scale).view(batch * heads, 1, head_dim)
        p = torch.bmm(q, w.keys[:, :t + 1].transpose(1, 2)).softmax(-1)
        o = torch.bmm(p, w.values[:, :t + 1]).view(batch, width)
        h = h + torch.addmm(w.proj[0], o, w.proj[1])
        hidden = F.gelu(torch.addmm(w.hidden[0], F.layer_norm(h, (width,), *w.norm2),
                                    w.hidden[1]))
        return h + torch.addmm(w.out[0], hidden, w.out[1])
