"""Masked invertible attention of AttnFlow: the 3-D checkerboard mask, iMap and iTrans (SPEC §1).

Source: Sukthanker, Huang, Kumar, Timofte, Van Gool, "Generative Flows with Invertible
Attentions", CVPR 2022 (arXiv 2106.03959). Both layers are triangular in the split
(masked x_M, unmasked x_U): the attention weights are computed from x_M only, x_M is mapped by
an invertible map that does not look at x_U, and x_U is mapped by an invertible map whose
parameters come from x_M. So the inverse recovers x_M first, recomputes the attention from it,
then undoes the map on x_U, and the Jacobian determinant is the product of the two diagonal
blocks' determinants.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import InvertibleModule, check_bound, on_build_device, soft_cap
from ..errors import ConfigError, ShapeError, check_choice
from ..precision import full_precision, upcast
from .reshape import patchify, unpatchify

IMAP_MIXINGS = ("spatial", "channel")
IMAP_GATES = ("sigmoid", "normalized")
ITRANS_FORMS = ("convex", "paper")
ITRANS_PATCH_SIZES = (1, 2, 4)


def check_init_mix(name: str, value: float) -> None:
    """``ConfigError`` unless the convex iTrans's initial β is in (0, ½): β = ½ would make
    A = (1 − β)I + β·softmax lose its diagonal dominance, and β = 0 is a frozen identity."""
    if not 0 < value < 0.5:
        raise ConfigError(f"{name} must be in (0, 0.5), got {value!r}")


def checkerboard_mask(num_channels: int, height: int, width: int, parity: int = 0, *,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
    """The 3-D checkerboard M[c, i, j] = (c + i + j + parity) mod 2, shape C×H×W.

    Neighbours along the channel axis and along both spatial axes always differ, so with even C
    half of the channels are masked (M = 1) at every pixel. It is not a stripe pattern on the
    flattened H·W index. ``parity`` 1 gives 1 − M.

    Args:
        num_channels: C.
        height: H.
        width: W.
        parity: 0 or 1.
        device: where to build the mask.
        dtype: its floating dtype (default: torch's default dtype).
    """
    if parity not in (0, 1):
        raise ConfigError(f"mask parity must be 0 or 1, got {parity!r}")
    if min(num_channels, height, width) < 1:
        raise ConfigError(f"mask shape must be positive, got {num_channels}×{height}×{width}")
    c = torch.arange(num_channels, device="cpu").view(-1, 1, 1)  # on the CPU, then moved
    i = torch.arange(height, device="cpu").view(1, -1, 1)        # (``core.on_build_device``)
    j = torch.arange(width, device="cpu").view(1, 1, -1)
    mask = ((c + i + j + parity) % 2).to(dtype or torch.get_default_dtype())
    return on_build_device(mask) if device is None else mask.to(device)


def _check_shape(x: Tensor, shape: tuple[int, int, int], layer: str) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise ShapeError(
            f"{layer} was built for inputs B×{'×'.join(map(str, shape))}, got {tuple(x.shape)}; "
            f"build the layer with the (channels, height, width) of the tensor it receives"
        )


class IMap(InvertibleModule):
    """iMap: y = x ⊙ σ((1 − M) ⊙ (a + b) + M ⊙ s_c), with a = mean_c Conv1x1(M ⊙ x).

    The gate a (B×1×H×W) is computed from the masked entries only; it scales the unmasked
    entries, and a learned per-channel scale σ(s_c) scales the masked ones.
    logdet = Σ_{c,p} (1 − M_cp) log σ(a_p + b) + Σ_{c,p} M_cp log σ(s_c), per sample.

    The paper reshapes to (B, H·W, C) and applies a 1-D conv; two readings exist (SPEC §1.3):

    - ``mixing="spatial"`` (default): the conv mixes the N = H·W positions, so a_p depends on
      every masked value of the image (long-range attention). A conv over positions followed by
      the mean over channels equals an N×N matrix applied to the channel mean of M ⊙ x, which is
      how it is computed: N² parameters and N² multiply-adds per sample (at 32×32 that is
      1024² ≈ 1.05 M parameters, 4 MiB in float32, per layer; at 16×16 it is 65 536).
    - ``mixing="channel"``: the conv mixes channels per pixel (the re-implementations), so a_p
      depends on pixel p only. Conv1x1 (C → C) followed by the mean over its outputs is one
      C-vector of weights, which is how it is stored.

    The mixing weights start at zero and s = b = ``init_logit`` (default 4), so the layer starts
    at y = σ(4)·x = 0.982·x (near the identity) with non-zero gradients for every parameter.

    **Decision** (``gate``): ``"sigmoid"`` is the published gate σ(·) ∈ (0, 1). ``"normalized"``
    divides every gate by the constant σ(c), c = ``init_logit``: y = x ⊙ σ(·)/σ(c), so the layer
    is exactly the identity at init for any c, and with c = 0 it starts where the gate is most
    sensitive (d log σ/da = 1 − σ(c): 0.5 at c = 0 against 0.018 at c = 4). It is the published
    layer followed by the fixed scale 1/σ(c) (same function class; logdet − D·log σ(c)).
    Why it matters: Adamax moves each parameter by at most ~lr per step, so over the warm-up
    ramp the gate parameters move at most Σ_t lr_t; at c = 4 a move that small leaves
    log σ(a + b) all but fixed (its slope is 0.018), i.e. the layer stays a constant rescaling.
    With the published gate and c = 0 the layer starts at y = x/2, which ActNorm's data init
    undoes inside a level but not before the prior; the normalized gate has no such offset.
    Each normalized gate lies in (0, 1/σ(c)) = (0, 2) at c = 0, so the layer can expand too.
    ``AttnFlowConfig`` uses gate="normalized", c = 0; this class keeps the published σ, c = 4
    as its defaults. The measurements behind the choice are in the README ("What attention
    buys").

    **Decision** (``log_gate_bound`` c_g): the published gate has no floor (σ(a + b) → 0 as the
    gate logit a + b → −∞, and a is linear in the input), so the inverse x_U = y_U/σ(a + b)
    amplifies without bound. With c_g > 0 every log σ(·) above is soft-clipped,
    log σ ↦ −c_g·tanh(−log σ/c_g) (``core.soft_cap``; the normalized gate divides by the same
    clipped σ(c)), so each gate stays above e^−c_g (times 1/σ(c) when normalized) for any
    input and the inverse amplifies by at most e^c_g per entry (times σ(c) when normalized).
    None (the default of this class) is the published gate.

    Args:
        num_channels: C.
        height: H.
        width: W.
        parity: mask parity (0 or 1); alternate it from step to step.
        mixing: "spatial" or "channel".
        init_logit: c, the initial s_c and b.
        gate: "sigmoid" (published) or "normalized" (σ(·)/σ(c), the identity at init).
        log_gate_bound: c_g, or None for the unbounded published gate.

    Shapes: x, y: B×C×H×W; logdet: (B,).
    """

    def __init__(self, num_channels: int, height: int, width: int, parity: int = 0,
                 mixing: str = "spatial", init_logit: float = 4.0,
                 gate: str = "sigmoid", log_gate_bound: float | None = None) -> None:
        super().__init__()
        check_choice("IMap mixing", mixing, IMAP_MIXINGS)
        check_choice("IMap gate", gate, IMAP_GATES)
        check_bound("log_gate_bound", log_gate_bound)
        self.gate_kind = gate
        self.log_gate_bound = log_gate_bound
        # log σ(c): subtracted from every log-gate by the normalized gate (0: the published one).
        c = torch.tensor(float(init_logit), dtype=torch.float64, device="cpu")  # read even on meta
        self.log_gate_offset = (float(self._log_sigmoid(c)) if gate == "normalized" else 0.0)
        self.shape = (num_channels, height, width)
        self.parity = parity
        self.mixing = mixing
        mask = checkerboard_mask(num_channels, height, width, parity, device="cpu")
        self.register_buffer("mask", on_build_device(mask), persistent=False)
        # Per-pixel count of unmasked channels and per-channel count of masked pixels: the
        # logdet weights, which differ from C/2 and H·W/2 when C or H·W is odd.
        self.register_buffer("num_unmasked", on_build_device((1 - mask).sum(0)),
                             persistent=False)
        self.register_buffer("num_masked", on_build_device(mask.sum((1, 2))), persistent=False)
        num_mix = height * width if mixing == "spatial" else num_channels
        self.weight = nn.Parameter(torch.zeros((num_mix, num_mix) if mixing == "spatial"
                                               else (num_mix,)))
        self.gate_bias = nn.Parameter(torch.tensor(float(init_logit)))
        self.log_scale = nn.Parameter(torch.full((num_channels,), float(init_logit)))

    def extra_repr(self) -> str:
        c, h, w = self.shape
        return (f"{c}×{h}×{w}, parity={self.parity}, mixing={self.mixing!r}, "
                f"gate={self.gate_kind!r}, log_gate_bound={self.log_gate_bound}")

    def gate(self, x_masked: Tensor) -> Tensor:
        """a = mean_c Conv1x1(M ⊙ x), B×1×H×W, from the masked input M ⊙ x."""
        b, _, h, w = x_masked.shape
        if self.mixing == "spatial":
            a = x_masked.mean(1).flatten(1) @ self.weight.T
        else:
            a = torch.einsum("bchw,c->bhw", x_masked, self.weight)
        return a.reshape(b, 1, h, w)

    def _preactivation(self, a: Tensor) -> Tensor:
        s = self.log_scale.view(-1, 1, 1)
        return (1 - self.mask) * (a + self.gate_bias) + self.mask * s

    def _log_sigmoid(self, pre: Tensor) -> Tensor:
        """log σ(pre), soft-clipped into (−c_g, 0) when ``log_gate_bound`` is set."""
        if self.log_gate_bound is None:
            return F.logsigmoid(pre)
        return -soft_cap(-F.logsigmoid(pre), self.log_gate_bound)

    def _gate_value(self, pre: Tensor) -> Tensor:
        """σ(pre), or σ(pre)/σ(c) for the normalized gate (σ soft-clipped when bounded)."""
        if self.log_gate_offset == 0.0 and self.log_gate_bound is None:
            return torch.sigmoid(pre)
        return torch.exp(self._log_sigmoid(pre) - self.log_gate_offset)

    def gate_map(self, x: Tensor) -> Tensor:
        """The gate on the unmasked entries at every position, σ(a_p + b) (σ(a_p + b)/σ(c) for
        the normalized gate), B×1×H×W, for the input x: what the layer multiplies x_U by
        (for pictures of the attention; ``forward`` computes the same values)."""
        _check_shape(x, self.shape, "IMap")
        return self._gate_value(self.gate(x * self.mask) + self.gate_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_shape(x, self.shape, "IMap")
        # The gate stays float32 under autocast: the inverse recomputes it from M ⊙ z / σ(s),
        # equal to M ⊙ x only up to float32 rounding, which a bf16 gate would amplify to
        # ~1e-3 round-trip errors. It is one small matmul; not worth bf16.
        with full_precision(x):
            a = self.gate(x * self.mask)
        z = x * self._gate_value(self._preactivation(a))
        logdet = (self.num_unmasked * self._log_sigmoid(a + self.gate_bias).squeeze(1)
                  ).flatten(1).sum(1)
        logdet = logdet + (self.num_masked * self._log_sigmoid(self.log_scale)).sum()
        if self.log_gate_offset != 0.0:
            logdet = logdet - self.log_gate_offset * self.mask.numel()
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        _check_shape(z, self.shape, "IMap")
        # Masked part first: x_M = M ⊙ z / σ(s); the gate depends on x_M only.
        x_masked = z * self.mask / self._gate_value(self.log_scale).view(-1, 1, 1)
        with full_precision(z):
            a = self.gate(x_masked)
        return z / self._gate_value(self._preactivation(a))


def _per_matrix_on_cpu(a: Tensor) -> bool:
    # Batched LU on CPU is wrong with more than one thread for matrices of ~150 rows and more:
    # ATen calls MKL's dgetrf/dgetrs concurrently over the batch and MKL's DLASWP is not
    # thread-safe there ("Parameter 6 was incorrect on entry to DLASWP", wrong factors or a hang;
    # pytorch/pytorch PR #181570). One matrix per call keeps MKL's own threading and is correct.
    # Below that size the batched call is correct (checked up to 140 rows) and faster on an idle
    # machine (64 LU + solve, float64, 2 threads: 4 rows 0.12 vs 0.80 ms in a loop, 16 rows 0.20
    # vs 0.98 ms, 64 rows 1.6 vs 3.0 ms), so only large token counts take the loop.
    return a.device.type == "cpu" and a.dim() == 3 and a.shape[0] > 1 and a.shape[-1] > 64


def _lu_factor(a: Tensor) -> tuple[Tensor, Tensor]:
    # ``lu_factor_ex`` skips the singularity check, which on CUDA would wait for the device to
    # copy its info flags to the host; A is nonsingular by construction (α ≥ 1).
    if _per_matrix_on_cpu(a):
        factors = [torch.linalg.lu_factor_ex(m)[:2] for m in a.unbind(0)]
        return torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors])
    lu, pivots, _ = torch.linalg.lu_factor_ex(a)
    return lu, pivots


def _lu_solve(lu: Tensor, pivots: Tensor, y: Tensor, adjoint: bool = False) -> Tensor:
    if _per_matrix_on_cpu(lu):
        return torch.stack([torch.linalg.lu_solve(a, p, b, adjoint=adjoint)
                            for a, p, b in zip(lu.unbind(0), pivots.unbind(0), y.unbind(0),
                                               strict=True)])
    return torch.linalg.lu_solve(lu, pivots, y, adjoint=adjoint)


class _FactorizeAttention(torch.autograd.Function):
    """(LU, pivots, log|det A|) with the closed-form gradient ∂ log|det A| / ∂A = A⁻ᵀ.

    Differentiating through ``lu_factor`` instead costs more (N×N matrix products, triangular
    solves and masking copies per matrix; measured 2.2-3.3× slower for forward + backward of
    64 matrices of 128×128 on 2 loaded cores); A⁻ᵀ is one LU solve with N columns.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx,
                attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lu, pivots = _lu_factor(attn)
        logdet = torch.diagonal(lu, dim1=-2, dim2=-1).abs().log().sum(-1)
        ctx.save_for_backward(lu, pivots)
        ctx.mark_non_differentiable(lu, pivots)
        return lu, pivots, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, _grad_lu: Tensor, _grad_pivots: Tensor,
                 grad_logdet: Tensor) -> Tensor:
        lu, pivots = ctx.saved_tensors
        eye = torch.eye(lu.shape[-1], dtype=lu.dtype, device=lu.device).expand_as(lu)
        inv_t = _lu_solve(lu, pivots, eye, adjoint=True)  # solves Aᵀ X = I
        return grad_logdet.view(-1, 1, 1) * inv_t


def factorize_attention(attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One LU factorisation of the B×N×N attention: (LU, pivots, log det A) with log det (B,).

    A = softmax + αI (α ≥ 1) is strictly diagonally dominant with a positive diagonal, so
    det A > 0 and log det A = Σ log|U_ii|. The factorisation runs in float64 on A's device
    (float64 stays float64, lower precisions are upcast: ``lu_factor`` has no half kernels), so
    log det A is exact to float64 rounding of the given A; in float32 it would be off by up to
    ~1e-5 nats at 256 tokens, times C·P²/2 in the layer's logdet. The LU goes to
    ``solve_attention`` for the inverse, so forward and inverse share one factorisation code path.
    log det A is differentiable once (gradient A⁻ᵀ); LU and pivots are not.
    """
    lu, pivots, logdet = _FactorizeAttention.apply(attn.double())
    return lu, pivots, logdet.to(attn.dtype)


def solve_attention(lu: Tensor, pivots: Tensor, y: Tensor) -> Tensor:
    """X = A⁻¹ Y from ``factorize_attention``'s LU, B×N×D, in the dtype of y."""
    return _lu_solve(lu, pivots, y.to(lu.dtype)).to(y.dtype)


class ITrans(InvertibleModule):
    """iTrans: y1 = x1, y2 = A·X2 with A = softmax(Q Kᵀ / τ) + αI, an N_t×N_t token attention.

    **Decision** (``form``): ``"paper"`` is A exactly as above. ``"convex"`` (default) is the same
    matrix divided by the scalar 1 + α: A = (1 − β)·I + β·softmax(Q Kᵀ/τ) with β = 1/(1 + α)
    ∈ (0, ½] (α ≥ 1 as in the paper), initialised at β = ``init_mix`` = 0.05, so the layer starts
    next to the identity like every other layer. The paper form cannot: at init it maps
    X2 ↦ α·X2 + softmax·X2 (α ≈ 1.7), scaling the unmasked entries of a checkerboard that the
    next ActNorm (per channel) cannot undo, and across K steps this compounds (measured on MNIST,
    K = 8: held-out 15.7 bits/dim at init against 7.6 without attention, gradient norms ~30× the
    baseline's). The convex A is row-stochastic (token means pass unchanged) and strictly
    diagonally dominant for β < ½ (and for β = ½ since softmax has a positive diagonal), so it
    stays invertible with positive determinant.

    Tokens are the N_t = H·W/P² non-overlapping P×P patches. Per token, x1 holds the masked
    entries of its patch and x2 the unmasked ones (C·P²/2 each); X2 is N_t×(C·P²/2).
    Q = patchify(Conv1x1_q(M ⊙ x)), K = patchify(Conv1x1_k(M ⊙ x)) depend on x1 only, α =
    1 + softplus(θ) ≥ 1 (never below 1, so A stays strictly diagonally dominant) and τ = exp(log τ).
    The Jacobian on x2 is A ⊗ I, so logdet = (C·P²/2)·log det A, per sample. The inverse
    recomputes A from y1 = x1 and solves X2 = A⁻¹ Y2 with the LU that also gives log det A
    (``factorize_attention``, float64, on the input's device: no CPU round trip).

    Float32 round-trip error is at most about cond(A)·eps·|y|, and cond_∞(A) ≤ (α + 1)/(α − 1)
    since ‖softmax‖_∞ = 1: about 5 at init (θ = 0, α = 1.69), 300 at θ = −5.

    Init: Q and K are PyTorch's default conv init (a zero init would make the softmax a saddle
    with zero gradients), θ = 0, τ = √(C·P²). The convs have no bias: a key bias adds the same
    logit to a whole row of QKᵀ and the softmax ignores it. The paper's optional triangular
    "Mask (opt)" on A is not implemented.

    Args:
        num_channels: C (even when P = 1, so every token has as many masked as unmasked entries).
        height: H, divisible by P.
        width: W, divisible by P.
        parity: mask parity (0 or 1).
        patch_size: P in (1, 2, 4).

    Shapes: x, y: B×C×H×W; logdet: (B,).
    """

    def __init__(self, num_channels: int, height: int, width: int, parity: int = 0,
                 patch_size: int = 2, form: str = "convex", init_mix: float = 0.05) -> None:
        super().__init__()
        p = patch_size
        check_choice("ITrans form", form, ITRANS_FORMS)
        check_init_mix("ITrans init_mix", init_mix)
        check_choice("ITrans patch_size", p, ITRANS_PATCH_SIZES)
        if height % p or width % p:
            raise ConfigError(f"ITrans with patch_size={p} needs H and W divisible by {p}, got "
                              f"{height}×{width}; choose another patch_size or image size")
        self.shape = (num_channels, height, width)
        self.parity = parity
        self.patch_size = p
        # Built on the CPU explicitly (moved with the module later): the validity checks below
        # read values, which a model built on the meta device (parameter counting) cannot.
        mask = checkerboard_mask(num_channels, height, width, parity, device="cpu")
        token_mask = patchify(mask[None], p)[0]  # N_t × C·P²
        dim = token_mask.shape[1]
        counts = token_mask.sum(1)
        if not bool((2 * counts == dim).all()):
            raise ConfigError(
                f"ITrans with patch_size={p} and {num_channels} channels gives tokens with "
                f"unequal masked/unmasked halves; use an even number of channels or patch_size 2"
            )
        self.half_dim = dim // 2
        # Stable sort puts each token's unmasked entries (0) first, in ascending order.
        order = torch.argsort(token_mask, dim=1, stable=True)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("unmasked_index", order[:, : self.half_dim].contiguous(),
                             persistent=False)
        num_tokens = token_mask.shape[0]
        self.register_buffer("eye", on_build_device(torch.eye(num_tokens, device="cpu")),
                             persistent=False)
        self.query = nn.Conv2d(num_channels, num_channels, 1, bias=False)
        self.key = nn.Conv2d(num_channels, num_channels, 1, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(0.5 * math.log(dim)))
        self.form = form
        if form == "paper":
            self.alpha_raw = nn.Parameter(torch.tensor(0.0))
        else:
            # β = ½·sigmoid(φ): parametrised directly so it stays learnable near β ≈ 0 (through
            # α = 1/β − 1 it would need θ ≈ 18, where dβ/dθ ≈ −β² all but stops learning).
            self.mix_logit = nn.Parameter(torch.tensor(math.log(2 * init_mix / (1 - 2 * init_mix))))

    def extra_repr(self) -> str:
        c, h, w = self.shape
        return (f"{c}×{h}×{w}, parity={self.parity}, patch_size={self.patch_size}, "
                f"form={self.form}")

    @property
    def alpha(self) -> Tensor:
        """α ≥ 1: 1 + softplus(θ) in the paper form; 1/β − 1 in the convex form."""
        if self.form == "paper":
            return 1 + F.softplus(self.alpha_raw)
        return 1 / self.mix - 1

    @property
    def mix(self) -> Tensor:
        """β = 1/(1 + α) ∈ (0, ½]: the weight of the softmax in the convex form."""
        if self.form == "paper":
            return 1 / (2 + F.softplus(self.alpha_raw))
        return 0.5 * torch.sigmoid(self.mix_logit)

    def attention_weights(self, x: Tensor) -> Tensor:
        """S = softmax(Q Kᵀ/τ), B×N_t×N_t (rows = query tokens, each row sums to 1; tokens in
        row-major order of the (H/P)×(W/P) patch grid), from the masked entries of x only."""
        _check_shape(x, self.shape, "ITrans")
        x_masked = x * self.mask
        q = patchify(self.query(x_masked), self.patch_size)
        k = patchify(self.key(x_masked), self.patch_size)
        # Q, K and their logits may run in bf16 (autocast); the softmax is float32.
        logits = upcast(q @ k.transpose(1, 2))
        with full_precision(logits):
            return torch.softmax(logits * torch.exp(-self.log_temperature), dim=-1)

    def attention(self, x: Tensor) -> Tensor:
        """A (paper: S + αI; convex: (1 − β)I + β·S, S = ``attention_weights(x)``),
        B×N_t×N_t, from the masked entries of x only; float32 under autocast."""
        weights = self.attention_weights(x)
        with full_precision(weights):
            if self.form == "paper":
                return weights + self.alpha * self.eye
            mix = self.mix
            return mix * weights + (1 - mix) * self.eye

    def _unmasked_index(self, batch: int) -> Tensor:
        return self.unmasked_index.expand(batch, -1, -1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        attn = self.attention(x)
        tokens = patchify(x, self.patch_size)
        index = self._unmasked_index(x.shape[0])
        with full_precision(x):  # A·X₂ is the data path: float32 under autocast too
            y2 = attn @ tokens.gather(2, index)
        z = unpatchify(tokens.scatter(2, index, y2), self.shape, self.patch_size)
        _, _, logdet_attn = factorize_attention(attn)
        return z, self.half_dim * logdet_attn

    def inverse(self, z: Tensor) -> Tensor:
        attn = self.attention(z)  # y1 = x1, so this is the forward's A
        tokens = patchify(z, self.patch_size)
        index = self._unmasked_index(z.shape[0])
        lu, pivots, _ = factorize_attention(attn)
        x = tokens.scatter(2, index, solve_attention(lu, pivots, tokens.gather(2, index)))
        return unpatchify(x, self.shape, self.patch_size)
