"""AttnFlow's masked attention (SPEC §1): the checkerboard mask, iMap and iTrans.

Each test is aimed at one of the bugs of SPEC §1.5: a logdet summed over the batch, stripe masks,
masks that break on odd batch sizes, values taken from the masked part, a logdet that ignores
which entries are masked, an iTrans whose y2 does not depend on x2, and C×C channel attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from attnflow_zoo import FlowSequential
from attnflow_zoo.errors import ConfigError, ShapeError
from attnflow_zoo.layers import (
    ActNorm,
    AffineCoupling,
    IMap,
    InvConv1x1,
    ITrans,
    checkerboard_mask,
)
from attnflow_zoo.layers.masked_attention import factorize_attention, solve_attention
from attnflow_zoo.layers.reshape import patchify
from attnflow_zoo.testing import (
    check_batch_independence,
    check_gradients,
    check_invertible,
    check_logdet,
    perturb_parameters,
)

# name -> (constructor(C, H, W, parity), (C, H, W) used for the brute-force checks)
LAYERS: dict[str, tuple[Callable[[int, int, int, int], nn.Module], tuple[int, int, int]]] = {
    "imap_spatial": (lambda c, h, w, p: IMap(c, h, w, p, "spatial"), (4, 4, 4)),
    "imap_channel": (lambda c, h, w, p: IMap(c, h, w, p, "channel"), (4, 4, 4)),
    "imap_spatial_odd_c": (lambda c, h, w, p: IMap(c, h, w, p, "spatial"), (3, 3, 5)),
    "imap_channel_odd_c": (lambda c, h, w, p: IMap(c, h, w, p, "channel"), (3, 3, 5)),
    "imap_spatial_normalized": (
        lambda c, h, w, p: IMap(c, h, w, p, "spatial", init_logit=0.0, gate="normalized"),
        (4, 4, 4)),
    "imap_channel_normalized_odd_c": (
        lambda c, h, w, p: IMap(c, h, w, p, "channel", init_logit=1.5, gate="normalized"),
        (3, 3, 5)),
    "imap_spatial_bounded": (
        lambda c, h, w, p: IMap(c, h, w, p, "spatial", log_gate_bound=1.0), (4, 4, 4)),
    "imap_channel_normalized_bounded_odd_c": (
        lambda c, h, w, p: IMap(c, h, w, p, "channel", init_logit=0.0, gate="normalized",
                                log_gate_bound=0.5), (3, 3, 5)),
    "itrans_p1": (lambda c, h, w, p: ITrans(c, h, w, p, patch_size=1), (4, 4, 4)),
    "itrans_p2": (lambda c, h, w, p: ITrans(c, h, w, p, patch_size=2), (4, 4, 4)),
    "itrans_p2_odd_c": (lambda c, h, w, p: ITrans(c, h, w, p, patch_size=2), (3, 4, 6)),
    "itrans_p4": (lambda c, h, w, p: ITrans(c, h, w, p, patch_size=4), (2, 4, 8)),
    "itrans_p1_paper": (lambda c, h, w, p: ITrans(c, h, w, p, patch_size=1, form="paper"),
                        (4, 4, 4)),
    "itrans_p2_paper": (lambda c, h, w, p: ITrans(c, h, w, p, patch_size=2, form="paper"),
                        (4, 4, 4)),
}


def _layer(name: str, parity: int = 0, seed: int = 0, scale: float = 0.5,
           shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The layer in float64, eval mode, with every parameter moved well away from its init."""
    make, default = LAYERS[name]
    layer = make(*(shape or default), parity)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a seeded stand-in for the default (global-RNG) init of Q and K
        for module in (getattr(layer, "query", None), getattr(layer, "key", None)):
            if module is not None:
                w = module.weight
                w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1]))
    return perturb_parameters(layer, scale, gen).double().eval()


def _input(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype)


def _jacobian(layer: nn.Module, x: Tensor) -> Tensor:
    """Full Jacobian ∂y/∂x of one sample, (C·H·W)×(C·H·W), in the flattened C×H×W order."""
    return torch.autograd.functional.jacobian(
        lambda v: layer(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1), vectorize=True)


# --- the mask --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 4, 4), (3, 5, 4), (4, 3, 3), (6, 2, 8)])
@pytest.mark.parametrize("parity", [0, 1])
def test_mask_is_a_3d_checkerboard(shape: tuple[int, int, int], parity: int) -> None:
    c, h, w = shape
    mask = checkerboard_mask(c, h, w, parity, dtype=torch.float64)
    assert mask.shape == shape and mask.dtype == torch.float64
    for ci in range(c):
        for i in range(h):
            for j in range(w):
                assert mask[ci, i, j] == (ci + i + j + parity) % 2
    # Every neighbour along every axis differs: a stripe pattern fails at least one axis.
    assert (mask[1:] != mask[:-1]).all()
    assert (mask[:, 1:] != mask[:, :-1]).all()
    assert (mask[:, :, 1:] != mask[:, :, :-1]).all()
    assert torch.equal(checkerboard_mask(c, h, w, 1 - parity, dtype=torch.float64), 1 - mask)
    if c % 2 == 0:
        assert (mask.sum(0) == c // 2).all()


def test_mask_is_not_a_stripe_on_the_flattened_positions() -> None:
    # The known re-implementation bug: M[c, n] = (c + n) mod 2 with n = i·W + j, which with
    # even W repeats the same channel pattern along each image column.
    c, h, w = 4, 4, 4
    stripe = (torch.arange(c).view(-1, 1) + torch.arange(h * w)).remainder(2).view(c, h, w)
    mask = checkerboard_mask(c, h, w)
    assert not torch.equal(mask, stripe.float())
    assert (mask[:, 1:] != mask[:, :-1]).all()
    assert (stripe[:, 1:] == stripe[:, :-1]).all()


def test_mask_device_dtype_and_bad_parity() -> None:
    mask = checkerboard_mask(2, 2, 2, device="cpu", dtype=torch.float32)
    assert mask.device.type == "cpu" and mask.dtype == torch.float32
    with pytest.raises(ConfigError, match="parity"):
        checkerboard_mask(2, 2, 2, parity=2)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("parity", [0, 1])
def test_layer_keeps_the_checkerboard_as_a_buffer(name: str, parity: int) -> None:
    layer = _layer(name, parity)
    c, h, w = LAYERS[name][1]
    assert torch.equal(layer.mask, checkerboard_mask(c, h, w, parity, dtype=torch.float64))
    assert "mask" not in layer.state_dict()  # rebuilt from the shape, never loaded


# --- the layer contract ----------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_logdet_matches_brute_force_per_sample(name: str, parity: int, batch: int,
                                               seed: int) -> None:
    layer = _layer(name, parity, seed)
    x = _input((batch, *LAYERS[name][1]), seed)
    ref = check_logdet(layer, x, rtol=1e-9, atol=1e-9)
    if batch > 1:  # different samples have different logdets: a batch sum would not match
        assert ref.std() > 1e-6


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_round_trip_float64(name: str, parity: int, batch: int) -> None:
    layer = _layer(name, parity, seed=3, scale=1.0)
    check_invertible(layer, _input((batch, *LAYERS[name][1]), 3), atol=1e-12)


@pytest.mark.parametrize("name", LAYERS)
def test_batch_independence(name: str) -> None:
    check_batch_independence(_layer(name, 1, 2), _input((5, *LAYERS[name][1]), 2), atol=1e-12)


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_reach_every_parameter(name: str) -> None:
    make, shape = LAYERS[name]
    check_gradients(make(*shape, 0).double(), _input((3, *shape)))


@pytest.mark.parametrize("name", [n for n in LAYERS if n.startswith("imap")])
def test_imap_starts_near_the_identity(name: str) -> None:
    """Published gate: y = σ(4)·x = 0.982·x (with a bound c_g: exp(−c_g·tanh(−log σ(4)/c_g))·x);
    normalized gate: y = x exactly, for any c and any bound."""
    make, shape = LAYERS[name]
    x = _input((2, *shape))
    layer = make(*shape, 0).double()
    z, logdet = layer(x)
    log_sigma = math.log(torch.sigmoid(torch.tensor(4.0).double()).item())
    if layer.log_gate_bound is not None:
        log_sigma = -layer.log_gate_bound * math.tanh(-log_sigma / layer.log_gate_bound)
    sigma = 1.0 if "normalized" in name else math.exp(log_sigma)
    torch.testing.assert_close(z, x * sigma, rtol=1e-15, atol=1e-15)
    expected = torch.full((2,), x[0].numel() * math.log(sigma), dtype=x.dtype)
    torch.testing.assert_close(logdet, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [0.0, 2.0, 4.0])
def test_imap_normalized_gate_is_the_published_layer_times_a_constant(c: float) -> None:
    """σ(·)/σ(c): the published layer's output divided by σ(c), its logdet minus D·log σ(c),
    for the same (trained) parameters; d log(gate)/da = 1 − σ(c) at init."""
    gen = torch.Generator().manual_seed(3)
    published = IMap(4, 4, 4, 1, "spatial", init_logit=c).double()
    normalized = IMap(4, 4, 4, 1, "spatial", init_logit=c, gate="normalized").double()
    perturb_parameters(published, 0.5, gen)
    normalized.load_state_dict(published.state_dict())
    x = _input((3, 4, 4, 4), seed=2)
    (zp, ldp), (zn, ldn) = published(x), normalized(x)
    log_sc = math.log(torch.sigmoid(torch.tensor(c, dtype=torch.float64)).item())
    torch.testing.assert_close(zn, zp / math.exp(log_sc))
    torch.testing.assert_close(ldn, ldp - x[0].numel() * log_sc)


@pytest.mark.parametrize("name", ["imap_spatial", "itrans_p2"])
def test_wrong_input_shape_is_a_shape_error(name: str) -> None:
    layer = _layer(name)
    with pytest.raises(ShapeError, match="built for inputs"):
        layer(_input((2, 4, 4, 6)))
    with pytest.raises(ShapeError, match="built for inputs"):
        layer.inverse(_input((2, 2, 4, 4)))


def test_bad_configurations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="even number of channels"):
        ITrans(3, 4, 4, patch_size=1)
    with pytest.raises(ConfigError, match="divisible"):
        ITrans(4, 6, 4, patch_size=4)
    with pytest.raises(ConfigError, match="patch_size"):
        ITrans(4, 6, 6, patch_size=3)
    with pytest.raises(ConfigError, match="mixing"):
        IMap(4, 4, 4, mixing="pixel")
    with pytest.raises(ConfigError, match="gate"):
        IMap(4, 4, 4, gate="tanh")
    with pytest.raises(ConfigError, match="parity"):
        IMap(4, 4, 4, parity=-1)


def test_usable_inside_a_flow_step() -> None:
    c, h, w = 4, 4, 4
    flow = FlowSequential(
        ActNorm(c), InvConv1x1(c, generator=torch.Generator().manual_seed(0)),
        AffineCoupling(c, 8), IMap(c, h, w, 0), ActNorm(c), InvConv1x1(c),
        AffineCoupling(c, 8), ITrans(c, h, w, 1, patch_size=2), IMap(c, h, w, 1, "channel"),
    )
    x = _input((3, c, h, w))
    flow.train()
    with torch.no_grad():
        flow(x.float())
    gen = torch.Generator().manual_seed(4)
    perturb_parameters(flow, 0.02, gen)  # more would make the couplings' scales blow up
    for layer in flow:
        if isinstance(layer, (IMap, ITrans)):
            perturb_parameters(layer, 0.5, gen)
    flow = flow.double().eval()
    check_invertible(flow, x, atol=1e-11)
    check_logdet(flow, x, rtol=1e-9, atol=1e-9)


# --- structure of the Jacobian: what depends on what ------------------------------------------

def _split(layer: nn.Module) -> tuple[Tensor, Tensor]:
    flat = layer.mask.reshape(-1).bool()
    return flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)


@pytest.mark.parametrize("name", [n for n in LAYERS if n.startswith("imap")])
@pytest.mark.parametrize("parity", [0, 1])
def test_imap_jacobian_is_triangular_with_diagonal_blocks(name: str, parity: int) -> None:
    layer = _layer(name, parity, seed=5)
    x = _input((1, *LAYERS[name][1]), 5)
    jac = _jacobian(layer, x)
    masked, unmasked = _split(layer)
    c, h, w = LAYERS[name][1]
    # y_M = σ(s_c)·x_M (normalized gate: σ(s_c)/σ(c)·x_M; σ soft-clipped when bounded): a
    # fixed diagonal map of x_M alone.
    log_sigma = torch.nn.functional.logsigmoid(layer.log_scale)
    if layer.log_gate_bound is not None:
        log_sigma = -layer.log_gate_bound * torch.tanh(-log_sigma / layer.log_gate_bound)
    scale = torch.exp(log_sigma - layer.log_gate_offset).view(-1, 1, 1).expand(c, h, w).reshape(-1)
    torch.testing.assert_close(jac[masked][:, masked], torch.diag(scale[masked]))
    assert (jac[masked][:, unmasked] == 0).all()
    # y_U = x_U ⊙ σ(a(x_M) + b): diagonal in x_U (nothing is taken from other unmasked values).
    block = jac[unmasked][:, unmasked]
    assert (block - torch.diag(torch.diagonal(block)) == 0).all()
    assert (torch.diagonal(block) > 0).all()


@pytest.mark.parametrize("mixing", ["spatial", "channel"])
def test_imap_gate_sees_the_whole_image_only_when_spatial(mixing: str) -> None:
    c, h, w = 4, 4, 4
    layer = perturb_parameters(IMap(c, h, w, 0, mixing), 0.5,
                               torch.Generator().manual_seed(6)).double()
    x = _input((1, c, h, w), 6)
    jac = _jacobian(layer, x).reshape(c, h * w, c, h * w)
    mask = layer.mask.reshape(c, h * w).bool()
    # reach[p, n]: does any unmasked output at pixel p depend on a masked input at pixel n?
    reach = torch.zeros(h * w, h * w, dtype=torch.bool)
    for p in range(h * w):
        for n in range(h * w):
            rows = (~mask[:, p]).nonzero().squeeze(1)
            cols = mask[:, n].nonzero().squeeze(1)
            reach[p, n] = (jac[rows, p][:, cols, n] != 0).any()
    if mixing == "spatial":
        assert reach.all()
    else:
        assert torch.equal(reach, torch.eye(h * w, dtype=torch.bool))


def _unmasked_flat_index(layer: ITrans) -> Tensor:
    """Flattened C×H×W index of X2[t, k] (token t, k-th unmasked entry), N_t × C·P²/2."""
    positions = torch.arange(layer.mask.numel()).view(1, *layer.mask.shape).double()
    tokens = patchify(positions, layer.patch_size)[0].long()
    return tokens.gather(1, layer.unmasked_index)


@pytest.mark.parametrize("name", [n for n in LAYERS if n.startswith("itrans")])
@pytest.mark.parametrize("parity", [0, 1])
def test_itrans_jacobian_is_block_triangular_with_token_attention(name: str,
                                                                   parity: int) -> None:
    layer = _layer(name, parity, seed=7)
    x = _input((1, *LAYERS[name][1]), 7)
    z, _ = layer(x)
    masked, unmasked = _split(layer)
    flat_x, flat_z = x.reshape(-1), z.reshape(-1)
    assert torch.equal(flat_z[masked], flat_x[masked])  # y1 == x1, bit for bit
    jac = _jacobian(layer, x)
    torch.testing.assert_close(jac[masked][:, masked], torch.eye(len(masked), dtype=x.dtype))
    assert (jac[masked][:, unmasked] == 0).all()
    # ∂y2/∂x2 = A ⊗ I: an N_t×N_t attention over tokens, applied to every unmasked entry of a
    # token alike. Channel attention (C×C) or y2 built from x1 would not have this block.
    attn = layer.attention(x)[0]
    index = _unmasked_flat_index(layer).reshape(-1)
    block = jac[index][:, index]
    expected = torch.kron(attn, torch.eye(layer.half_dim, dtype=x.dtype))
    torch.testing.assert_close(block, expected)
    assert attn.shape == (index.numel() // layer.half_dim,) * 2
    assert torch.linalg.slogdet(block)[1] > -math.inf


def test_itrans_attention_depends_on_the_masked_entries_only() -> None:
    layer = _layer("itrans_p2", seed=8)
    x = _input((2, 4, 4, 4), 8)
    noise = _input((2, 4, 4, 4), 9) * (1 - layer.mask)
    torch.testing.assert_close(layer.attention(x + noise), layer.attention(x), rtol=0, atol=0)
    assert (layer.alpha >= 1).all()


# --- float32 on realistic shapes --------------------------------------------------------------

REALISTIC = [(12, 16, 16), (24, 8, 8), (48, 4, 4)]
FLOAT32_LAYERS = {
    "imap_spatial": lambda c, h, w: IMap(c, h, w, 1, "spatial"),
    "imap_channel": lambda c, h, w: IMap(c, h, w, 1, "channel"),
    "imap_spatial_normalized": lambda c, h, w: IMap(c, h, w, 1, "spatial", init_logit=0.0,
                                                    gate="normalized"),
    "imap_spatial_normalized_bounded": lambda c, h, w: IMap(c, h, w, 1, "spatial", init_logit=0.0,
                                                            gate="normalized", log_gate_bound=4.0),
    "itrans_p1": lambda c, h, w: ITrans(c, h, w, 1, patch_size=1),
    "itrans_p2": lambda c, h, w: ITrans(c, h, w, 1, patch_size=2),
    "itrans_p4": lambda c, h, w: ITrans(c, h, w, 1, patch_size=4),
    "itrans_p2_paper": lambda c, h, w: ITrans(c, h, w, 1, patch_size=2, form="paper"),
}


def _far_from_init(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """Large random weights, α near 1 (paper: 1 + softplus(−5) ≈ 1.0067; convex: β = ½σ(5),
    α = 1/β − 1 ≈ 1.013) and a sharp softmax (τ = 0.05)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "alpha_raw":
                p.fill_(-5.0)
            elif name == "mix_logit":
                p.fill_(5.0)
            elif name == "log_temperature":
                p.fill_(math.log(0.05))
            elif name in ("log_scale", "gate_bias"):
                p.copy_(3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
    return layer


@pytest.mark.parametrize("shape", REALISTIC, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", FLOAT32_LAYERS)
@pytest.mark.parametrize("far", [False, True], ids=["init", "far"])
def test_round_trip_float32_realistic(name: str, shape: tuple[int, int, int], far: bool,
                                      gen: torch.Generator) -> None:
    layer = FLOAT32_LAYERS[name](*shape).eval()
    if far:
        _far_from_init(layer, gen)
    x = torch.randn((64, *shape), generator=gen)
    check_invertible(layer, x, atol=1e-4)
    if isinstance(layer, ITrans):  # y1 == x1 exactly in float32 too
        z, _ = layer(x)
        keep = layer.mask.bool().expand_as(x)
        assert torch.equal(z[keep], x[keep])


def test_factorisation_is_right_for_a_large_batch_on_cpu() -> None:
    # Batched CPU LU with >1 thread gives wrong factors from ~150 rows (pytorch PR #181570);
    # the layer factorises one matrix per call there. 256 tokens = a 16×16 image with P = 1.
    gen = torch.Generator().manual_seed(10)
    n = 256
    attn = torch.softmax(torch.randn(3, n, n, generator=gen), -1) + 1.5 * torch.eye(n)
    lu, pivots, logdet = factorize_attention(attn)
    ref = torch.stack([torch.linalg.slogdet(a.double())[1] for a in attn])
    torch.testing.assert_close(logdet.double(), ref, rtol=1e-6, atol=1e-6)
    y = torch.randn(3, n, 5, generator=gen)
    torch.testing.assert_close(attn @ solve_attention(lu, pivots, y), y, rtol=0, atol=1e-5)


def test_logdet_gradient_is_the_inverse_transpose() -> None:
    gen = torch.Generator().manual_seed(11)
    attn = torch.softmax(torch.randn(3, 5, 5, generator=gen, dtype=torch.float64), -1)
    attn = (attn + 1.2 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: factorize_attention(a)[2], (attn,))


@pytest.mark.parametrize("form", ["convex", "paper"])
def test_itrans_alpha_never_below_one(form: str) -> None:
    layer = ITrans(4, 4, 4, patch_size=2, form=form)
    for raw in (-30.0, -5.0, 0.0, 5.0, 30.0):
        with torch.no_grad():
            getattr(layer, "alpha_raw" if form == "paper" else "mix_logit").fill_(raw)
        assert layer.alpha.item() >= 1.0
        assert 0.0 < layer.mix.item() <= 0.5


def test_itrans_convex_form_starts_next_to_the_identity(gen: torch.Generator) -> None:
    """The default form is the paper's A divided by 1 + α; at init it is (1 − β)I + β·softmax
    with β = 0.05: row-stochastic, and the layer moves x by at most about 2β·|x2|."""
    layer = ITrans(12, 8, 8, patch_size=2).eval()
    x = torch.randn(5, 12, 8, 8, generator=gen)
    attn = layer.attention(x)
    torch.testing.assert_close(attn.sum(-1), torch.ones(5, 16), rtol=0, atol=1e-6)
    assert torch.allclose(torch.diagonal(attn, dim1=1, dim2=2), torch.full((5, 16), 0.95),
                          atol=0.05 + 1e-6)
    y, logdet = layer(x)
    assert (y - x).abs().max() <= 2 * 0.05 * x.abs().max() + 1e-6
    assert logdet.abs().max() < 0.1 * 16 * layer.half_dim
    paper = ITrans(12, 8, 8, patch_size=2, form="paper").eval()
    assert (paper(x)[0] - x).abs().max() > 0.5 * x.abs().max(), "paper form is far from I"
