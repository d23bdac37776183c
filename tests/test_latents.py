"""Latent tools (attnflow_zoo.latents) and pictures (attnflow_zoo.inspection) in the library:
per-level latents and their whitened form round trip, the whitened latents are the priors'
standard-normal noise, the attention layers' maps are what their forward passes use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnflow_zoo as az
from attnflow_zoo import metrics
from attnflow_zoo.errors import ConfigError, ShapeError
from attnflow_zoo.evaluation import inspection, latents
from attnflow_zoo.layers.masked_attention import IMap, ITrans
from attnflow_zoo.layers.residual_attention import KINDS, ResidualAttention
from attnflow_zoo.priors import GaussianPrior, MARPrior
from attnflow_zoo.testing import perturb_parameters

PRESETS = ["attnflow_imap_tiny", "attnflow_itrans_tiny", "attnflow_imap_mixlog_tiny",
           "marflow_tiny", "attnflow_imap_cond_tiny", "attnflow_itrans_cond_couplings_tiny",
           "resflow_dot_tiny"]


def _model(name: str, gen: torch.Generator, batch: int = 3):
    """A float64 tiny model, data-initialised and perturbed (no test at the zero init), with a
    batch of uint8 images and labels (None for an unconditional model)."""
    model = az.create_model(name).double().eval()
    x_u8 = torch.randint(0, 256, (batch, *model.input_shape), generator=gen, dtype=torch.uint8)
    y = torch.arange(batch) % model.num_classes if model.num_classes else None
    model.initialize_from_data(x_u8, gen, y=y)
    perturb_parameters(model, 0.05, gen)
    return model, x_u8, y


@pytest.mark.parametrize("name", PRESETS)
def test_latents_round_trip_and_layout(name, gen):
    model, x_u8, y = _model(name, gen)
    x = latents.centred(model, x_u8)
    zs = model.encode_latents(x, y)
    assert [tuple(z.shape) for z in zs] == [(3, *s) for s in model.latent_shapes]
    z_flat = model(x, y)[0] if model.num_classes else model(x)[0]
    torch.testing.assert_close(latents.flatten(zs), z_flat, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.decode_latents(zs, y), x, rtol=0, atol=1e-10)
    eps = latents.whiten(model, zs, y)
    assert [e.shape for e in eps] == [z.shape for z in zs]
    back = latents.unwhiten(model, eps, y)
    for z, z_back in zip(zs, back, strict=True):
        torch.testing.assert_close(z_back, z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", PRESETS)
def test_whitened_latents_are_the_priors_noise(name, gen):
    """log p(z) = Σ_l Σ [log N(ε_l; 0, 1) − log σ_l]: ε is the standardised latent under the
    model's own prior (and a wrong μ or σ anywhere would break the equality)."""
    model, x_u8, y = _model(name, gen)
    x = latents.centred(model, x_u8)
    zs = model.encode_latents(x, y)
    eps = latents.whiten(model, zs, y)
    log_std = [ls for _, ls in model.latent_priors(zs, y)]
    from_eps = sum((-0.5 * e**2 - ls - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
                   for e, ls in zip(eps, log_std, strict=True))
    logdet = model(x, y)[1] if model.num_classes else model(x)[1]
    torch.testing.assert_close(from_eps, model.log_density(x, y) - logdet, rtol=1e-9, atol=1e-8)


def test_latent_shape_errors(gen):
    model, x_u8, _ = _model("attnflow_imap_tiny", gen)
    zs = model.encode_latents(latents.centred(model, x_u8))
    with pytest.raises(ShapeError, match="latents of shapes"):
        model.decode_latents(zs[:1])
    with pytest.raises(ShapeError, match="latents of shapes"):
        latents.unwhiten(model, [zs[0], zs[1][:, :2]])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_mar_unwhiten_is_sampling_with_that_noise(temperature):
    """MARPrior.sample draws ε channel by channel; unwhiten(T·ε) re-runs the same recurrence."""
    torch.manual_seed(0)  # test-only: the prior's initial weights
    prior = MARPrior(4, cond_channels=3, hidden_channels=8, num_layers=2, kernel_size=3,
                     cond_hidden_channels=8, embed_channels=2).double()
    cond = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    z = prior.sample(2, 5, 5, cond, temperature, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    eps = torch.cat([torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
                     for _ in range(4)], 1)
    torch.testing.assert_close(prior.unwhiten(temperature * eps, cond), z, rtol=0, atol=1e-12)
    if temperature:
        torch.testing.assert_close(prior.whiten(z, cond), temperature * eps, rtol=0, atol=1e-10)


def test_gaussian_unwhiten_inverts_whiten():
    torch.manual_seed(0)
    prior = GaussianPrior(4, cond_channels=3).double()
    perturb_parameters(prior, 0.3)
    z, cond = torch.randn(2, 4, 3, 3).double(), torch.randn(2, 3, 3, 3).double()
    eps = prior.whiten(z, cond)
    assert (eps - z).abs().max() > 1e-3  # the prior is not N(0, I) here
    torch.testing.assert_close(prior.unwhiten(eps, cond), z, rtol=0, atol=1e-12)


def test_slerp():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0]], dtype=torch.float64)  # row 2: parallel
    torch.testing.assert_close(latents.slerp(a, b, 0.0), a)
    torch.testing.assert_close(latents.slerp(a, b, 1.0), b)
    mid = latents.slerp(a, b, 0.5)
    s = 3 / math.sqrt(2)
    torch.testing.assert_close(mid[0], torch.tensor([s, s], dtype=torch.float64))  # on the arc
    torch.testing.assert_close(mid[1], torch.tensor([1.5, 1.5], dtype=torch.float64))  # line


def test_interpolation_ends_are_the_inputs(gen):
    model, x_u8, _ = _model("attnflow_imap_tiny", gen)
    result = latents.interpolate(model, x_u8[0], x_u8[1], 5)
    path = result.images
    assert result.num_nonfinite == 0
    assert path.shape == (5, *model.input_shape) and path.dtype == torch.uint8
    assert torch.equal(path[0], x_u8[0]) and torch.equal(path[-1], x_u8[1])
    assert not torch.equal(path[2], x_u8[0]) and not torch.equal(path[2], x_u8[1])
    with pytest.raises(ConfigError, match="≥ 2"):
        latents.interpolate(model, x_u8[0], x_u8[1], 1)


def test_reconstruct_reports_the_error(gen):
    model, x_u8, _ = _model("attnflow_itrans_tiny", gen)
    result = latents.reconstruct(model, x_u8)
    assert torch.equal(result.images, x_u8) and result.num_changed == 0
    assert 0 <= result.max_error < 1e-10


def test_unsupported_model_is_a_clear_error():
    validator = az.create_model("validator_dot_tiny")  # a zoo model, not a density model
    with pytest.raises(ConfigError, match="no per-level latents"):
        latents.whiten(validator, [])


# --- the attention layers' maps --------------------------------------------------------------

def test_imap_gate_map_is_the_forward_multiplier(gen):
    layer = perturb_parameters(IMap(4, 6, 6, parity=1).double(), 0.3, gen)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    gate = layer.gate_map(x)
    assert gate.shape == (2, 1, 6, 6) and gate.std() > 1e-3  # spatial mixing: not constant
    z, _ = layer(x)
    unmasked = layer.mask == 0
    torch.testing.assert_close((z / x)[:, unmasked], gate.expand_as(x)[:, unmasked])


@pytest.mark.parametrize("form", ["convex", "paper"])
def test_itrans_attention_is_built_from_its_weights(form, gen):
    layer = perturb_parameters(ITrans(4, 4, 4, patch_size=1, form=form).double(), 0.3, gen)
    x = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    s = layer.attention_weights(x)
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 16, dtype=torch.float64))
    eye = torch.eye(16, dtype=torch.float64)
    expected = s + layer.alpha * eye if form == "paper" else layer.mix * s + (1 - layer.mix) * eye
    torch.testing.assert_close(layer.attention(x), expected)


@pytest.mark.parametrize("lipschitz", ["faithful", "certified"])
@pytest.mark.parametrize("kind", KINDS)
def test_residual_attention_map_is_what_the_branch_averages_with(kind, lipschitz, gen):
    """g(x) = tanh(γ)·(2/3)·V P (gate "gamma"), P = attention_map(x): the map is the layer's."""
    # eval(): in training mode every call advances the spectral norms' power iteration.
    layer = ResidualAttention(8, kind, lipschitz=lipschitz, gate="gamma").double().eval()
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    x = torch.randn(2, 8, 3, 4, generator=gen, dtype=torch.float64)
    p = layer.attention_map(x)
    assert p.shape == (2, 12, 12)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 12, dtype=torch.float64))
    weights = layer._weights()
    tokens = x.flatten(2)
    if lipschitz == "certified":
        tokens = torch.tanh(tokens) / math.sqrt(8)
    out = torch.tanh(layer.gamma) * (2 / 3) * (layer.value(tokens, weights["value"]) @ p)
    if lipschitz == "certified":
        out = out * torch.clamp(layer.certified_coeff / layer.lipschitz_bound(weights), max=1.0)
    torch.testing.assert_close(layer.branch(x), out.reshape(x.shape))


@pytest.mark.parametrize(("name", "expected"), [
    ("attnflow_imap_tiny", [(1, 1, "imap_gate"), (1, 2, "imap_gate"), (2, 1, "imap_gate"),
                            (2, 2, "imap_gate")]),
    ("attnflow_itrans_tiny", [(1, 1, "itrans"), (1, 2, "itrans")]),
    ("resflow_dot_tiny", [(1, 1, "residual")]),
])
def test_attention_maps_of_a_model(name, expected, gen):
    model, x_u8, y = _model(name, gen, batch=2)
    x = latents.centred(model, x_u8)
    maps = inspection.attention_maps(model, x, y)
    assert [(m.level, m.step, m.kind) for m in maps] == expected
    layers = [m for m in model.modules() if isinstance(m, inspection.ATTENTION_LAYERS)]
    first = maps[0]
    if first.kind == "imap_gate":
        assert first.values.shape == (2, 4, 4)
    elif first.kind == "itrans":  # 2×2 patches of a 4×4 level: 2×2 tokens
        assert first.grid == (2, 2) and first.values.shape == (2, 4, 4)
    else:
        assert first.grid == (4, 4) and first.values.shape == (2, 16, 16)
        # the recorded input is the layer's real input: recompute it by hand (squeeze, blocks)
        h, _ = model.squeeze(x)
        for layer in model.scales[0]:
            h = layer(h)[0] if not hasattr(layer, "residual") else layer.residual(h)
        torch.testing.assert_close(first.values, layers[0].attention_map(h).float())


def test_attention_maps_need_attention(gen):
    model, x_u8, _ = _model("marflow_tiny", gen)
    with pytest.raises(ConfigError, match="no attention layers"):
        inspection.attention_maps(model, latents.centred(model, x_u8))


@pytest.mark.parametrize("name", ["attnflow_imap_tiny", "attnflow_imap_cond_tiny",
                                  "resflow_dot_tiny"])
def test_bits_per_dim_split_adds_up(name, gen):
    model, x_u8, y = _model(name, gen)
    x = latents.centred(model, x_u8)
    split = inspection.bits_per_dim_split(model, x, y)
    dims = math.prod(model.input_shape)
    expected = metrics.bits_per_dim(model.log_density(x, y), dims)
    torch.testing.assert_close(split.total, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(sum(split.levels) + split.flow + 8.0, split.total, rtol=0,
                               atol=1e-9)
    for heat, level, shape in zip(split.maps, split.levels, model.latent_shapes, strict=True):
        assert heat.shape == (3, *shape[1:])
        torch.testing.assert_close(heat.mean((1, 2)) * math.prod(shape) / dims, level)


def test_inspect_image_writes_the_figures(gen, tmp_path):
    model, x_u8, _ = _model("attnflow_itrans_tiny", gen)
    out = inspection.inspect_image(model.float(), x_u8[0], tmp_path, position=(1, 6))
    names = sorted(p.rsplit("/", 1)[-1] for p in out["files"])
    assert names == ["attention_level1.png", "bits_per_dim.png"]
    with pytest.raises(ConfigError, match="outside the model's 8×8 image"):
        inspection.inspect_image(model, x_u8[0], tmp_path, position=(8, 0))


@pytest.mark.parametrize(("mode", "size", "shape"), [
    ("RGB", 20, (1, 16, 16)),  # colour to grey, centre-cropped and resized
    ("L", 8, (3, 16, 16)),  # grey to RGB by repetition, zero-padded
    ("L", 16, (1, 16, 16)),  # as it is
])
def test_read_image_fits_a_file_to_the_model(mode, size, shape, tmp_path):
    from PIL import Image

    from attnflow_zoo.data.images import read_image
    from attnflow_zoo.errors import DataError

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size),
                         dtype=np.uint8)
    Image.fromarray(array, mode).save(tmp_path / "x.png")
    x = read_image(tmp_path / "x.png", shape)
    assert x.shape == shape and x.dtype == torch.uint8
    if size == 16 and shape[0] == 1:
        assert np.array_equal(x[0].numpy(), array)
    if size == 8:
        assert torch.equal(x[0], x[2]) and x[0, :4].sum() == 0  # repeated; 4 rows of padding
        assert np.array_equal(x[0, 4:12, 4:12].numpy(), array)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read"):
        read_image(tmp_path / "bad.png", shape)
