"""Sampling to files: reproducible seeded draws, temperature, PNG grids and NPZ arrays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnflow_zoo as az
from attnflow_zoo.core import resolve_device
from attnflow_zoo.errors import ConfigError
from attnflow_zoo.evaluation.sampling import draw_checked_samples, draw_samples, save_samples

sys.path.insert(0, str(Path(__file__).parent))
from _toy_flow import ToyFlow, ToyFlowConfig  # noqa: E402


@pytest.fixture(scope="module")
def model() -> ToyFlow:
    return ToyFlow(ToyFlowConfig()).eval()


def test_draws_are_seeded_and_batch_invariant_in_count(model: ToyFlow) -> None:
    a = draw_samples(model, 10, temperature=0.8, seed=5, batch_size=4)
    b = draw_samples(model, 10, temperature=0.8, seed=5, batch_size=4)
    c = draw_samples(model, 10, temperature=0.8, seed=6, batch_size=4)
    assert a.shape == (10, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_scales_the_prior(model: ToyFlow) -> None:
    # At init the toy flow is close to the identity, so image spread follows the latent T.
    cold = draw_samples(model, 64, temperature=0.05, seed=0).float()
    warm = draw_samples(model, 64, temperature=1.0, seed=0).float()
    assert cold.std() < 0.25 * warm.std()
    with pytest.raises(ConfigError, match="temperature"):
        draw_samples(model, 4, temperature=0.0)
    with pytest.raises(ConfigError, match="positive"):
        draw_samples(model, 0)


def test_save_png_grid_and_npz(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 7), generator=gen, dtype=torch.uint8)
    png = save_samples(images, tmp_path / "out" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(png).convert("RGB"))
    assert grid.shape == (2 * (5 + 2) + 2, 3 * (7 + 2) + 2, 3)
    # The first image sits after the 2-pixel padding, exactly (uint8 → /255 → PNG is lossless).
    np.testing.assert_array_equal(grid[2:7, 2:9], images[0].permute(1, 2, 0).numpy())
    npz = save_samples(images, tmp_path / "s.npz")
    arr = np.load(npz)["images"]
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, images.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ConfigError, match="use .png"):
        save_samples(images, tmp_path / "s.gif")
    with pytest.raises(ConfigError, match="uint8"):
        save_samples(images.float(), tmp_path / "s.png")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu9")


def test_bf16_sampling_on_cpu_close_to_fp32() -> None:
    """``precision="bf16"`` samples on the CPU the same draws to bf16 rounding (a micro
    MaR-Flow: its conditioners and conv-LSTM prior run in bf16); fp16 off CUDA is refused."""
    torch.manual_seed(0)
    model = az.create_model("marflow_tiny", image_size=4, in_channels=1, num_levels=2,
                            num_steps=1, hidden_channels=4, prior_hidden_channels=4,
                            prior_num_layers=2, prior_cond_hidden_channels=4,
                            prior_embed_channels=2)
    g = torch.Generator().manual_seed(0)
    model.initialize_from_data(torch.randint(0, 256, (8, 1, 4, 4), generator=g,
                                             dtype=torch.uint8), g)
    fp32 = draw_samples(model, 6, temperature=0.7, seed=3, batch_size=4)
    bf16 = draw_samples(model, 6, temperature=0.7, seed=3, batch_size=4, precision="bf16")
    assert bf16.dtype == torch.uint8 and bf16.shape == fp32.shape == (6, 1, 4, 4)
    diff = (bf16.int() - fp32.int()).abs()
    assert diff.float().mean() < 0.5 and diff.max() <= 2
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        draw_samples(model, 2, precision="fp16")


def test_overflowing_draws_are_counted_and_marked(model: ToyFlow) -> None:
    """At an absurd temperature a zoo model's samples overflow: every image is counted as
    non-finite or out of range, none is drawn as a plain black tile, and ``draw_samples``
    gives the same (marked) images."""
    flow = az.create_model("marflow_tiny", prior="gaussian").eval()
    drawn = draw_checked_samples(flow, 6, temperature=1e30, seed=1, batch_size=4)
    assert drawn.num_nonfinite + drawn.num_out_of_range == 6
    assert all(int(image.max()) == 255 and int(image.min()) == 0 for image in drawn.images)
    assert torch.equal(draw_samples(flow, 6, temperature=1e30, seed=1, batch_size=4),
                       drawn.images)
    calm = draw_checked_samples(model, 6, temperature=0.5, seed=1)
    assert (calm.num_nonfinite, calm.num_out_of_range) == (0, 0)
