"""The TarFlow block (SPEC §6): round trip, brute-force log-det, a block-triangular Jacobian in
token order, the cached inverse equal to the cache-free one (guidance included), any batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnflow_zoo.core import soft_cap
from attnflow_zoo.errors import ConfigError, ShapeError
from attnflow_zoo.layers.tarflow import Guidance, TarFlowBlock
from attnflow_zoo.precision import autocast_for
from attnflow_zoo.testing import (
    check_batch_independence,
    check_gradients,
    check_invertible,
    check_logdet,
    perturb_parameters,
)

T, D, W = 5, 3, 16


def _block(reverse: bool = False, affine: bool = True, dtype: torch.dtype = torch.float64,
           seed: int = 0, bound: float | None = None) -> TarFlowBlock:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = TarFlowBlock(D, T, W, num_layers=2, head_dim=8, expansion=2, reverse=reverse,
                             affine=affine, log_scale_bound=bound)
    perturb_parameters(block, 0.05, torch.Generator().manual_seed(seed + 1))
    return block.to(dtype).eval()


#: A bound small enough that the soft cap bends the perturbed blocks' log-scales (a raw a
#: of 0.05 is capped to 0.0381): the checks below then test the bounded map, not the identity
#: of the cap on a ≤ 0.
BOUND = 0.05


def _tokens(b: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    return torch.randn(b, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class _Flat(nn.Module):
    """The block on flattened tokens B×(T·d), with one fixed context vector (1×W) for every
    sample (for the brute-force checks, which differentiate a B×D map one sample at a time)."""

    def __init__(self, block: TarFlowBlock, context: Tensor | None = None) -> None:
        super().__init__()
        self.block = block
        self.context = context

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx = None if self.context is None else self.context.expand(x.shape[0], -1)
        z, logdet = self.block(x.view(-1, T, D), ctx)
        return z.flatten(1), logdet


CASES = [(False, True), (True, True), (False, False)]


def _raw_scale_shift(block: TarFlowBlock, x: Tensor) -> tuple[Tensor, Tensor]:
    """(raw a, b) of the head, shifted one token, computed here without ``scale_shift``: the
    unbounded map as ml-tarflow writes it."""
    h = block.proj_in(block.permute(x)) + block.positions()
    for layer in block.layers:
        h = layer(h)
    out = F.pad(block.proj_out(h)[:, :-1], (0, 0, 1, 0))
    return out[..., :D], out[..., D:]


@pytest.mark.parametrize(("reverse", "affine"), CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bound", [None, BOUND])
def test_round_trip_and_logdet(reverse: bool, affine: bool, batch: int,
                               bound: float | None) -> None:
    block = _block(reverse, affine, bound=bound)
    x = _tokens(batch)
    if bound is not None and affine:  # the cap is active: some raw a lies well above c/2
        assert _raw_scale_shift(block, x)[0].max() > bound
    check_invertible(block, x)
    check_invertible(block.float(), x.float(), atol=1e-5)
    block.double()
    check_logdet(_Flat(block), x.flatten(1), rtol=1e-10, atol=1e-10)
    context = torch.randn(1, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check_logdet(_Flat(block, context), x.flatten(1), rtol=1e-10, atol=1e-10)
    context = context.expand(batch, -1)
    z, _ = block(x, context)
    torch.testing.assert_close(block.inverse(z, context), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
def test_jacobian_is_block_triangular_in_token_order(reverse: bool) -> None:
    """∂z_t/∂x_s = 0 for every token s after t in the block's order (before t for a reversed
    block), and each diagonal block ∂z_t/∂x_t is diagonal; the later-token blocks are not
    zero (the map is autoregressive, not token-wise)."""
    block = _block(reverse)
    x = _tokens(1, seed=4)[0]
    jac = torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], x)  # T×d×T×d
    order = list(range(T))[::-1] if reverse else list(range(T))
    rank = {tok: i for i, tok in enumerate(order)}
    for t in range(T):
        for s in range(T):
            blk = jac[t, :, s, :]
            if rank[s] > rank[t]:
                assert blk.abs().max() == 0, (t, s)
            elif s == t:
                assert (blk - torch.diag(torch.diagonal(blk))).abs().max() == 0
            elif rank[s] == rank[t] - 1:
                assert blk.abs().max() > 1e-6, (t, s)


@pytest.mark.parametrize(("reverse", "affine"), CASES)
@pytest.mark.parametrize("bound", [None, BOUND])
def test_cached_inverse_equals_cache_free_inverse(reverse: bool, affine: bool,
                                                  bound: float | None) -> None:
    block = _block(reverse, affine, bound=bound)
    z = _tokens(3, seed=5)
    context = torch.randn(3, W, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    null = torch.randn(3, W, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for ctx, guidance in [(None, None), (context, None),
                          (context, Guidance(2.0, context=null)),
                          (context, Guidance(1.5, context=null, annealed=True)),
                          (None, Guidance(0.7, attention_temperature=1.4))]:
        cached = block.inverse(z, ctx, guidance)
        reference = block.inverse_uncached(z, ctx, guidance)
        torch.testing.assert_close(cached, reference, rtol=0, atol=1e-12)
    # Guidance changes the result; a weight of 0 is no guidance.
    plain = block.inverse(z, context)
    assert (block.inverse(z, context, Guidance(2.0, context=null)) - plain).abs().max() > 1e-6
    torch.testing.assert_close(block.inverse(z, context, Guidance(0.0, context=null)), plain,
                               rtol=0, atol=0)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_cached_inverse_at_other_depths_returns_a_plain_tensor(num_layers: int) -> None:
    """The step folds the last layer's MLP output into the head (no earlier layer at depth 1,
    two at depth 3); the loop runs in inference mode, its result is an ordinary tensor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        block = TarFlowBlock(D, T, W, num_layers=num_layers, head_dim=4, expansion=3)
    perturb_parameters(block, 0.05, torch.Generator().manual_seed(4))
    block = block.double().eval()
    z = _tokens(2, seed=11)
    x = block.inverse(z)
    torch.testing.assert_close(x, block.inverse_uncached(z), rtol=0, atol=1e-12)
    assert not x.is_inference()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(block(x)[1].sum(), [x])
    assert torch.isfinite(grad).all()


def test_one_cache_serves_every_call_and_a_wrong_one_is_refused() -> None:
    block = _block()
    z = _tokens(2, seed=8)
    cache = block.new_cache(2, z)
    first = block.inverse(z, cache=cache)
    torch.testing.assert_close(block.inverse(_tokens(2, seed=9), cache=cache),
                               block.inverse(_tokens(2, seed=9)), rtol=0, atol=0)
    torch.testing.assert_close(block.inverse(z, cache=cache), first, rtol=0, atol=0)
    with pytest.raises(ShapeError):
        block.inverse(_tokens(3), cache=cache)


def test_identity_at_init_and_batch_independence() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = TarFlowBlock(D, T, W, num_layers=1, head_dim=8).double()
    x = _tokens(4)
    z, logdet = block(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(4, dtype=torch.float64))
    check_batch_independence(_block(True), _tokens(4, seed=2))


def test_gradients_reach_every_parameter() -> None:
    block = _block(dtype=torch.float32)
    context = torch.randn(1, W)
    check_gradients(_Flat(block, context), _tokens(3, torch.float32).flatten(1))


def test_wrong_shape_is_refused() -> None:
    with pytest.raises(ShapeError):
        _block()(torch.zeros(2, T + 1, D, dtype=torch.float64))


def test_bf16_keeps_the_affine_map_and_logdet_in_float32() -> None:
    block = _block(dtype=torch.float32)
    x = _tokens(2, torch.float32)
    with autocast_for("cpu", "bf16"):
        z, logdet = block(x)
        x_rec = block.inverse(z)
    assert z.dtype == logdet.dtype == x_rec.dtype == torch.float32
    assert (x_rec - x).abs().max() < 1e-2


def test_attention_maps_are_causal_in_the_block_order() -> None:
    for reverse in (False, True):
        maps = list(_block(reverse).attention_maps(_tokens(2)))
        assert len(maps) == 2 and maps[0].shape == (2, T, T)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, T, dtype=maps[0].dtype))
        upper = torch.ones(T, T, dtype=torch.bool).triu(1)
        future = upper.T if reverse else upper
        assert maps[0][:, future].abs().max() == 0


def test_unbounded_block_is_ml_tarflows_map_bit_for_bit() -> None:
    """``log_scale_bound`` None: (a, b) are the head's raw output and z = (u − b)·exp(−a),
    logdet = −Σa exactly (torch.equal); the bound changes a (so the comparison can fail)."""
    x = _tokens(3, seed=12)
    for reverse in (False, True):
        block = _block(reverse)
        a, b = _raw_scale_shift(block, x)
        got_a, got_b = block.conditioner(block.permute(x))
        assert torch.equal(got_a, a) and torch.equal(got_b, b)
        z, logdet = block(x)
        assert torch.equal(z, block.permute((block.permute(x) - b) * torch.exp(-a)))
        assert torch.equal(logdet, -a.contiguous().sum((1, 2)))
        bounded = _block(reverse, bound=BOUND)
        capped, _ = bounded.conditioner(bounded.permute(x))
        assert torch.equal(capped, soft_cap(a, BOUND)) and not torch.equal(capped, a)


@pytest.mark.parametrize("reverse", [False, True])
def test_bounded_inverse_stays_finite_for_an_adversarial_head(reverse: bool) -> None:
    """A head whose log-scale output is huge (bias +200, weights ×100): the unbounded inverse
    overflows in float32 (exp(a) > 3.4e38, and a grows with the tokens it produced), while every
    bounded step amplifies z by at most e^c: the result is finite and each token's
    |u_t − b_t| ≤ e^c·|z_t|."""
    z = _tokens(64, torch.float32, seed=13) * 3
    results = {}
    for bound in (None, 4.0):
        block = _block(reverse, dtype=torch.float32, bound=bound)
        with torch.no_grad():
            block.proj_out.weight[:D].mul_(100.0)
            block.proj_out.bias[:D].fill_(200.0)
        results[bound] = block.inverse(z), block
    assert not torch.isfinite(results[None][0]).all()
    x, block = results[4.0]
    assert torch.isfinite(x).all()
    u = block.permute(x)
    a, b = block.conditioner(u)
    assert a.max() <= 4.0  # = c where tanh rounds to 1 in float32
    assert ((u - b).abs() <= math.exp(4.0) * block.permute(z).abs() * (1 + 1e-5)).all()


@pytest.mark.parametrize("cached", [True, False])
def test_a_guided_bounded_inverse_multiplies_by_at_most_e_to_the_bound(cached: bool) -> None:
    """Guidance mixes a + w(a − a_u): each pass's a is below c, their mix need not be. The
    guided step caps the mix as well, so every token still has |u_t − b_t| ≤ e^c·|z_t| with
    (a_t, b_t) the mixed pair (recomputed here from the tokens the inverse produced)."""
    bound, weight = 0.3, 8.0
    block = _block(True, bound=bound)
    with torch.no_grad():
        block.proj_out.weight[:D].mul_(20.0)
    z = _tokens(4, seed=14) * 3
    guidance = Guidance(weight, attention_temperature=3.0)
    inverse = block.inverse if cached else block.inverse_uncached
    x = inverse(z, guidance=guidance)
    u = block.permute(x)
    a_g, b_g = block.conditioner(u)
    a_u, b_u = block.conditioner(u, None, 3.0)
    mixed_a = soft_cap(a_g + weight * (a_g - a_u), bound)
    mixed_b = b_g + weight * (b_g - b_u)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(u[:, 1:], block.permute(z)[:, 1:] * torch.exp(mixed_a[:, 1:])
                               + mixed_b[:, 1:], rtol=1e-9, atol=1e-9)
    assert ((u - mixed_b)[:, 1:].abs()
            <= math.exp(bound) * block.permute(z)[:, 1:].abs() * (1 + 1e-9)).all()


def test_bound_and_head_bias_init_are_checked_and_the_init_draws_with_the_weights() -> None:
    """Both head-bias inits draw the same weights from one seed (the bias is drawn by
    nn.Linear either way): they differ in the head bias only, zero or U(±1/√W)."""
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="log_scale_bound"):
            TarFlowBlock(D, T, W, num_layers=1, head_dim=8, log_scale_bound=bad)
    with pytest.raises(ConfigError, match="head_bias_init"):
        TarFlowBlock(D, T, W, num_layers=1, head_dim=8, head_bias_init="normal")
    blocks = {}
    for init in ("zero", "uniform"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            blocks[init] = TarFlowBlock(D, T, W, num_layers=1, head_dim=8, head_bias_init=init)
    zero, uniform = (blocks[k].state_dict() for k in ("zero", "uniform"))
    assert [k for k in zero if not torch.equal(zero[k], uniform[k])] == ["proj_out.bias"]
    bias = uniform["proj_out.bias"]
    assert torch.equal(zero["proj_out.bias"], torch.zeros_like(bias))
    assert 0 < bias.abs().max() <= W ** -0.5 and bias.abs().min() > 0
