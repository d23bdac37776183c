"""``attnflow convert ml-tarflow``: an ml-tarflow ``Model.state_dict()`` saved with torch.save
becomes a zoo checkpoint that holds exactly its tensors. The peer's code is not imported here
(it is not in the repository): the state dict is built from the names and shapes its
``transformer_flow.Model`` has (``_ml_tarflow_state``), independently of the converter."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
import torch
from _cli import run_cli
from torch import Tensor

import attnflow_zoo as az
from attnflow_zoo.errors import CheckpointError, ConfigError
from attnflow_zoo.models.tarflow_convert import load_ml_tarflow, to_ml_tarflow


def _ml_tarflow_state(*, in_channels: int = 3, img_size: int = 8, patch_size: int = 2,
                      channels: int = 64, num_blocks: int = 2, layers_per_block: int = 2,
                      nvp: bool = True, num_classes: int = 0, expansion: int = 4,
                      seed: int = 0) -> dict[str, Tensor]:
    """A random state dict with the keys and shapes of ml-tarflow's
    ``Model(in_channels, img_size, patch_size, channels, num_blocks, layers_per_block, nvp,
    num_classes)`` (transformer_flow.py: MetaBlock, AttentionBlock, Attention, MLP)."""
    g = torch.Generator().manual_seed(seed)
    d = in_channels * patch_size ** 2
    t = (img_size // patch_size) ** 2

    def rand(*shape: int) -> Tensor:
        return 0.02 * torch.randn(*shape, generator=g)

    state: dict[str, Tensor] = {}
    for k in range(num_blocks):
        b = f"blocks.{k}."
        state[b + "pos_embed"] = rand(t, channels)
        if num_classes:
            state[b + "class_embed"] = rand(num_classes, 1, channels)
        state[b + "attn_mask"] = torch.ones(t, t).tril()
        state[b + "proj_in.weight"], state[b + "proj_in.bias"] = rand(channels, d), rand(channels)
        for i in range(layers_per_block):
            a = f"{b}attn_blocks.{i}."
            for name, (rows, cols) in {"attention.qkv": (3 * channels, channels),
                                       "attention.proj": (channels, channels),
                                       "mlp.main.0": (expansion * channels, channels),
                                       "mlp.main.2": (channels, expansion * channels)}.items():
                state[a + name + ".weight"], state[a + name + ".bias"] = rand(rows, cols), \
                    rand(rows)
            for norm in ("attention.norm", "mlp.norm"):
                state[a + norm + ".weight"] = 1 + rand(channels)
                state[a + norm + ".bias"] = rand(channels)
        out = 2 * d if nvp else d
        state[b + "proj_out.weight"], state[b + "proj_out.bias"] = rand(out, channels), rand(out)
    state["var"] = torch.ones(t, d) if nvp else 1 + rand(t, d).abs()
    return state


@pytest.mark.parametrize("kwargs", [{}, {"nvp": False}, {"num_classes": 3},
                                    {"in_channels": 1, "img_size": 8, "patch_size": 4}])
def test_convert_round_trips_every_tensor(kwargs: dict, tmp_path: Path) -> None:
    state = _ml_tarflow_state(**kwargs)
    path = tmp_path / "afhq_model_2_64_2_2_0.07.pth"
    torch.save(state, path)
    out = tmp_path / "zoo"
    code, stdout, stderr = run_cli(["convert", "ml-tarflow", path, "--out", out,
                                    "--in-channels", kwargs.get("in_channels", 3)])
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors"}
    model = az.load_model(out)
    cfg = model.config
    assert type(model) is az.TarFlow and cfg.noise_std == pytest.approx(0.035)
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.num_blocks, cfg.layers_per_block) \
        == (kwargs.get("img_size", 8), kwargs.get("patch_size", 2), 64, 2, 2)
    assert cfg.affine == kwargs.get("nvp", True)
    assert cfg.prior == ("standard" if kwargs.get("nvp", True) else "learned")
    back = to_ml_tarflow(model)
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=1e-6, atol=0, msg=key)
    with torch.no_grad():  # the converted model runs
        x = torch.rand(2, *model.input_shape) - 0.5
        y = torch.arange(2) % cfg.num_classes if cfg.num_classes else None
        assert torch.isfinite(model.log_density(x, y)).all()


def test_noise_comes_from_the_file_name_or_the_argument(tmp_path: Path) -> None:
    path = tmp_path / "imagenet64_model_2_64_2_2_uniform.pth"
    torch.save(_ml_tarflow_state(), path)
    assert load_ml_tarflow(path).config.noise_std == 0.0
    plain = tmp_path / "weights.pth"
    torch.save(_ml_tarflow_state(), plain)
    with pytest.raises(ConfigError, match="noise_std"):
        load_ml_tarflow(plain)
    assert load_ml_tarflow(plain, noise_std=0.1).config.noise_std == pytest.approx(0.05)


def test_what_is_not_an_ml_tarflow_state_dict_is_refused(tmp_path: Path) -> None:
    state = _ml_tarflow_state()
    state["blocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "x_model_2_64_2_2_uniform.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError):
        load_ml_tarflow(path)
    torch.save({"model": PurePosixPath("x")}, path)  # a class outside torch's allow-list
    code, _, stderr = run_cli(["convert", "ml-tarflow", path, "--out", tmp_path / "o"])
    assert code == 1 and "without unpickling code" in stderr and "Traceback" not in stderr
    with pytest.raises(ConfigError, match="in_channels"):
        torch.save(_ml_tarflow_state(), path)
        load_ml_tarflow(path, in_channels=2)
