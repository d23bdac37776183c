"""TarFlow's block: a causal transformer that makes an affine autoregressive map over tokens.

Source: Zhai et al., "Normalizing Flows are Capable Generative Models" (Apple, 2024; ICML 2025,
arXiv 2412.06329), code apple/ml-tarflow ``transformer_flow.py`` (SPEC §6). On tokens
x ∈ R^{B×T×d} (patches of an image) a block computes, in its own token order u = π(x)
(π: the identity, or the reversed order for every other block):

    h = Transformer_causal(W_in u + pos (+ c))          pre-norm attention + MLP layers
    (a_t, b_t) = W_out h_{t−1}  (a_0 = b_0 = 0)           depend on u_<t only
    z_t = (u_t − b_t) ⊙ exp(−a_t),   logdet = −Σ_t Σ_i a_{t,i}   (per sample, nats)

The Jacobian ∂z/∂u is block lower-triangular with diagonal blocks diag(exp(−a_t)), hence the
log-determinant. ``forward`` is one parallel pass (a causal mask); ``inverse`` recovers u token
by token, u_t = z_t ⊙ exp(a_t) + b_t, each step one token's pass through the transformer
(``tarflow_step.TokenStep``) with the keys and values of the earlier tokens read from a
preallocated ``KVCache`` (no module holds sampling state; the cache is an argument). W_out
starts at zero; its bias at zero too (every block starts as the identity) or, as ml-tarflow
leaves it, at PyTorch's default U(±1/√W) (``head_bias_init``).

**Decision** (``log_scale_bound`` c): ml-tarflow's a is unbounded (c = None, the default of
this class), and in the inverse it feeds back on itself: u_t = z_t·exp(a_t) + b_t enters the
residual stream of the next token's pass linearly (W_in u_t; no norm after the last layer), so
a_{t+1} can grow with u_t, and u_{t+1} with exp(a_{t+1}): nothing keeps a sample finite. With
c > 0, a = ``core.soft_cap``(raw, c) < c (raw ≤ 0 as it is, c·tanh(raw/c) above), one rule
(``tarflow_step.scale_shift``) for the parallel pass, both inverses and the log-determinant:
every inverse step amplifies z_t by at most e^c, which breaks the loop; where a ≤ 0 or a ≪ c
the map is ml-tarflow's.

Guidance (``Guidance``) mixes, at each inverse step, the (a, b) of this pass with those of a
second, unguided pass: a ← a + w(a − a_u), b ← b + w(b − b_u), the unguided pass running with
another context (classifier-free guidance: the "no class" embedding) and/or a temperature on
its attention logits (attention-temperature guidance of unconditional models).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import ConditionalInvertibleModule, check_bound, soft_cap
from ..errors import ConfigError, ShapeError, check_choice
from ..guidance import guide
from ..precision import attention, compute_dtype, upcast
from .tarflow_step import TokenStep, scale_shift

#: How the output head's bias starts: "zero" (every block the identity) or "uniform"
#: (PyTorch's default U(±1/√W), drawn with the rest of the weights: ml-tarflow's init).
HEAD_BIAS_INITS = ("zero", "uniform")


class KVCache:
    """The keys and values of one pass through a block's layers, allocated once for T tokens.

    ``kv[l, 0]`` / ``kv[l, 1]``: the keys / values of layer l, B×H×T×d_h each, written at token
    t by step t of the inverse (one copy for both) and read for tokens 0..t; nothing grows
    during the inverse. One cache serves every block of a model in turn (each writes from
    token 0 again), so a sampler allocates one per pass (two with guidance).
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, length: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.kv = torch.empty((num_layers, 2, batch, num_heads, length, head_dim),
                              device=device, dtype=dtype)

    @property
    def length(self) -> int:
        """T, the number of tokens the cache holds."""
        return self.kv.shape[4]

    def like(self) -> KVCache:
        """Another cache of the same shape, device and dtype."""
        layers, _, batch, heads, length, head_dim = self.kv.shape
        return KVCache(layers, batch, heads, length, head_dim, self.kv.device, self.kv.dtype)

    def matches(self, batch: int, block: TarFlowBlock, dtype: torch.dtype) -> bool:
        """Whether the cache fits ``block``'s inverse on a batch of ``batch`` in ``dtype``."""
        attn = block.layers[0].attention
        return (tuple(self.kv.shape) == (len(block.layers), 2, batch, attn.num_heads,
                                         block.num_tokens, attn.head_dim)
                and self.kv.dtype == dtype)


@dataclass(frozen=True)
class Guidance:
    """How a token-by-token inverse is guided (SPEC §6).

    Attributes:
        weight: w; at step t the pass's (a, b) become (a, b) + w_t·((a, b) − (a_u, b_u)).
        context: the unguided pass's context (B×W, e.g. the "no class" embedding), None for no
            context.
        attention_temperature: τ of the unguided pass: its attention logits are divided by τ.
        annealed: w_t = w·t/(T − 1) for the token t being computed (ml-tarflow's
            ``annealed_guidance``), else w_t = w.
    """

    weight: float
    context: Tensor | None = None
    attention_temperature: float = 1.0
    annealed: bool = False

    def weight_at(self, t: int, num_tokens: int) -> float:
        """w_t for token t (1..T−1)."""
        return self.weight * t / (num_tokens - 1) if self.annealed else self.weight


class CausalSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention, o = W_o · softmax(q kᵀ/(√d_h·τ) + causal) v.

    ``qkv`` holds [W_q; W_k; W_v], each W heads × d_h rows (ml-tarflow's layout).
    """

    def __init__(self, width: int, head_dim: int) -> None:
        super().__init__()
        if head_dim < 1 or width % head_dim:
            raise ConfigError(f"head_dim {head_dim} must divide the width {width}")
        self.head_dim = head_dim
        self.num_heads = width // head_dim
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, k, v) of a B×T×W input, B×H×T×d_h each."""
        b, t, _ = h.shape
        qkv = self.qkv(self.norm(h)).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, h: Tensor, temperature: float = 1.0) -> Tensor:
        """B×T×W -> B×T×W, every token at once (causal)."""
        b, t, width = h.shape
        q, k, v = self.heads(h)
        o = attention(q, k, v, is_causal=True, scale=self.head_dim ** -0.5 / temperature)
        return self.proj(o.transpose(1, 2).reshape(b, t, width))

    def weights(self, h: Tensor, temperature: float = 1.0) -> Tensor:
        """The causal softmax weights of a B×T×W input, B×H×T×T (rows = queries)."""
        q, k, _ = self.heads(h)
        logits = (q @ k.transpose(-1, -2)).float() * (self.head_dim ** -0.5 / temperature)
        t = h.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        return logits.masked_fill(~causal, float("-inf")).softmax(-1)


class FeedForward(nn.Module):
    """Pre-norm MLP, W_2 GELU(W_1 LN(h)), hidden width ``expansion``·W."""

    def __init__(self, width: int, expansion: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, expansion * width)
        self.out = nn.Linear(expansion * width, width)

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(self.norm(h), self.hidden.weight, self.hidden.bias)),
                        self.out.weight, self.out.bias)


class TransformerLayer(nn.Module):
    """h ← h + Attn(h); h ← h + MLP(h) (pre-norm, causal)."""

    def __init__(self, width: int, head_dim: int, expansion: int) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(width, head_dim)
        self.mlp = FeedForward(width, expansion)

    def forward(self, h: Tensor, temperature: float = 1.0) -> Tensor:
        """B×T×W -> B×T×W, every token at once."""
        h = h + self.attention(h, temperature)
        return h + self.mlp(h)


class TarFlowBlock(ConditionalInvertibleModule):
    """One TarFlow block on tokens B×T×d: z = π⁻¹((u − b) ⊙ exp(−a)), u = π(x) (module doc).

    Args:
        token_dim: d, the numbers per token (C·P² for P×P patches of C channels).
        num_tokens: T (≥ 2).
        width: W, the transformer's width.
        num_layers: transformer layers of the block.
        head_dim: d_h, the width of each attention head (W / d_h heads).
        expansion: the MLP's hidden width over W.
        reverse: π reverses the token order (ml-tarflow: every odd block).
        affine: a non-zero log-scale a (ml-tarflow's "nvp"); False: a = 0, a shift only
            (volume preserving).
        log_scale_bound: c of the soft-capped log-scale a < c (module doc), or None for
            ml-tarflow's unbounded a.
        head_bias_init: ``HEAD_BIAS_INITS``: "zero" (identity at init) or "uniform" (the
            bias keeps nn.Linear's draw, as in ml-tarflow; W_out is zero either way).

    Context: an optional B×W vector added to every token's input embedding (a class
    embedding); for each context the block is a bijection.
    """

    def __init__(self, token_dim: int, num_tokens: int, width: int, num_layers: int,
                 head_dim: int = 64, expansion: int = 4, reverse: bool = False,
                 affine: bool = True, log_scale_bound: float | None = None,
                 head_bias_init: str = "zero") -> None:
        super().__init__()
        check_bound("log_scale_bound", log_scale_bound)
        check_choice("head_bias_init", head_bias_init, HEAD_BIAS_INITS)
        if num_tokens < 2 or token_dim < 1 or num_layers < 1:
            raise ConfigError(f"a TarFlow block needs ≥ 2 tokens, token_dim ≥ 1 and ≥ 1 layer; "
                              f"got T={num_tokens}, d={token_dim}, {num_layers} layers")
        self.token_dim = token_dim
        self.num_tokens = num_tokens
        self.reverse = reverse
        self.affine = affine
        self.log_scale_bound = log_scale_bound
        self.proj_in = nn.Linear(token_dim, width)
        # Scaled in place: on the meta device an out-of-place product runs a Python kernel
        # whose first use imports torch._dynamo (seconds, in `attnflow models`).
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width).mul_(1e-2))
        self.layers = nn.ModuleList(TransformerLayer(width, head_dim, expansion)
                                    for _ in range(num_layers))
        self.proj_out = nn.Linear(width, token_dim * (2 if affine else 1))
        nn.init.zeros_(self.proj_out.weight)  # (a, b) = the bias at init
        if head_bias_init == "zero":  # identity at init: a = b = 0
            nn.init.zeros_(self.proj_out.bias)

    def extra_repr(self) -> str:
        return f"log_scale_bound={self.log_scale_bound}"

    # --- shared pieces ----------------------------------------------------------------------
    def permute(self, x: Tensor) -> Tensor:
        """π (its own inverse): the block's token order."""
        return x.flip(1) if self.reverse else x

    def positions(self) -> Tensor:
        """The position embeddings in the block's token order, T×W (ml-tarflow permutes
        them with the tokens)."""
        return self.pos_embed.flip(0) if self.reverse else self.pos_embed

    def _embed(self, u: Tensor, context: Tensor | None, pos: Tensor) -> Tensor:
        h = self.proj_in(u) + pos
        return h if context is None else h + context[:, None, :]

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) of the head's output for the NEXT token, in float32 (float64 models: 64)."""
        return scale_shift(upcast(self.proj_out(h)), self.affine, self.log_scale_bound)

    def conditioner(self, u: Tensor, context: Tensor | None = None,
                    temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """(a, b), B×T×d each, of tokens u in the block's order, shifted so that (a_t, b_t)
        depend on u_<t only (a_0 = b_0 = 0): one parallel causal pass."""
        h = self._embed(u, context, self.positions())
        for layer in self.layers:
            h = layer(h, temperature)
        a, b = self._scale_shift(h)
        return F.pad(a[:, :-1], (0, 0, 1, 0)), F.pad(b[:, :-1], (0, 0, 1, 0))

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ShapeError(f"expected tokens B×{self.num_tokens}×{self.token_dim}, got "
                             f"{tuple(x.shape)}")

    # --- the map ----------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B×T×d) -> (z, logdet (B,)), one parallel pass."""
        self._check(x)
        u = self.permute(x)
        a, b = self.conditioner(u, context)
        z = (u - b) * torch.exp(-a)
        return self.permute(z), -a.sum((1, 2))

    def inverse(self, z: Tensor, context: Tensor | None = None,
                guidance: Guidance | None = None, cache: KVCache | None = None,
                guidance_cache: KVCache | None = None) -> Tensor:
        """z (B×T×d) -> x, token by token with key/value caches (allocated here unless given:
        ``cache`` for this pass, ``guidance_cache`` for the unguided pass of ``guidance``).
        Not differentiable (the caches are written in place; the loop runs in inference
        mode): for gradients use ``inverse_uncached``."""
        self._check(z)
        v = self.permute(z)
        with torch.inference_mode():
            tokens = self._inverse_tokens(v, context, guidance, cache, guidance_cache)
        return self.permute(torch.stack(tokens, 1))

    def _inverse_tokens(self, v: Tensor, context: Tensor | None, guidance: Guidance | None,
                        cache: KVCache | None, guidance_cache: KVCache | None) -> list[Tensor]:
        """The tokens u_0..u_{T−1} (B×d each, the block's order) from v = π(z)."""
        guided = guidance is not None and guidance.weight != 0
        step = TokenStep(self, self._cache_for(v, cache).kv, self._step_inputs(context))
        unguided = TokenStep(self, self._cache_for(v, guidance_cache).kv,
                             self._step_inputs(guidance.context),
                             guidance.attention_temperature) if guided else None
        given = v.unbind(1)
        tokens = [given[0]]
        for t in range(self.num_tokens - 1):
            a, b = step(tokens[t], t)
            if unguided is not None:
                a, b = self._guided((a, b), unguided(tokens[t], t),
                                    guidance.weight_at(t + 1, self.num_tokens))
            tokens.append(torch.addcmul(b, given[t + 1], torch.exp(a)))
        return tokens

    def _guided(self, ab: tuple[Tensor, Tensor], ab_unguided: tuple[Tensor, Tensor],
                weight: float) -> tuple[Tensor, Tensor]:
        """The guided (a, b) of one inverse step: ``guide``'s mix, its a capped again by the
        bound (each pass's a is below c, their mix a + w(a − a_u) need not be)."""
        a, b = guide(ab, ab_unguided, weight)
        return soft_cap(a, self.log_scale_bound), b

    def _step_inputs(self, context: Tensor | None) -> Tensor:
        """What each step adds to W_in u_t: the position embeddings (and the context), T×W
        or T×B×W, computed once per inverse."""
        pos = self.positions()
        return pos if context is None else pos[:, None, :] + context[None]

    def _cache_for(self, v: Tensor, cache: KVCache | None) -> KVCache:
        dtype = compute_dtype(v)
        if cache is not None:
            if not cache.matches(v.shape[0], self, dtype):
                raise ShapeError("the key/value cache does not fit this block and batch; "
                                 "allocate it with TarFlowBlock.new_cache")
            return cache
        return self.new_cache(v.shape[0], v, dtype)

    def new_cache(self, batch: int, like: Tensor, dtype: torch.dtype | None = None) -> KVCache:
        """A ``KVCache`` for this block's inverse on ``batch`` samples, on ``like``'s device,
        in ``dtype`` (default: what the layers compute in, ``precision.compute_dtype``)."""
        attn = self.layers[0].attention
        return KVCache(len(self.layers), batch, attn.num_heads, self.num_tokens,
                       attn.head_dim, like.device, dtype or compute_dtype(like))

    def inverse_uncached(self, z: Tensor, context: Tensor | None = None,
                         guidance: Guidance | None = None) -> Tensor:
        """The inverse without a cache: for each token t a full causal pass over the tokens
        recovered so far (O(T) passes; differentiable). The reference ``inverse`` must equal."""
        self._check(z)
        v = self.permute(z)
        guided = guidance is not None and guidance.weight != 0
        tokens = [v[:, 0]]
        for t in range(1, self.num_tokens):
            known = torch.stack(tokens + [torch.zeros_like(v[:, 0])] * (self.num_tokens - t), 1)
            a, b = (p[:, t] for p in self.conditioner(known, context))
            if guided:
                a_u, b_u = (p[:, t] for p in self.conditioner(
                    known, guidance.context, guidance.attention_temperature))
                a, b = self._guided((a, b), (a_u, b_u), guidance.weight_at(t, self.num_tokens))
            tokens.append(v[:, t] * torch.exp(a) + b)
        return self.permute(torch.stack(tokens, 1))

    # --- pictures ---------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, x: Tensor, context: Tensor | None = None) -> Iterator[Tensor]:
        """Each layer's causal attention weights for input tokens x (B×T×d), averaged over
        heads, B×T×T with rows = query tokens and both axes in the IMAGE's token order (a
        reversed block's causal triangle is then the upper one)."""
        h = self._embed(self.permute(x), context, self.positions())
        for layer in self.layers:
            w = layer.attention.weights(h).mean(1)
            yield w.flip(1, 2) if self.reverse else w
            h = layer(h)

