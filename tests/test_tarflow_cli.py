"""TarFlow through the commands: `train` with its AdamW recipe and Gaussian noise (the
checkpoint records σ), `evaluate` saying a noise-trained bits/dim is not comparable, `sample
--guidance --denoise`, `inspect` drawing the causal blocks' attention, and the one-line
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import run_cli as run

import attnflow_zoo as az


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """tarflow_tiny trained 6 steps on digits (1 channel) with σ = 0.03."""
    out = tmp_path_factory.mktemp("tarflow") / "run"
    code, _, err = run(["train", "--model", "tarflow_tiny", "--dataset", "digits",
                        "--in-channels", 1, "--out", out, "--device", "cpu", "--steps", 6,
                        "--batch-size", 16, "--limit", 128, "--eval-limit", 64,
                        "--validation", 0, "--noise-std", 0.03, "--log-every", 3])
    assert code == 0, err
    return out


def test_train_records_the_recipe_and_the_noise(trained: Path) -> None:
    run_record = json.loads((trained / "run.json").read_text())
    tc = run_record["train_config"]
    assert (tc["optimizer"], tc["betas"], tc["weight_decay"]) == ("adamw", [0.9, 0.95], 1e-4)
    assert tc["noise_std"] == 0.03 and tc["schedule"] == "cosine"
    model = az.load_model(trained)
    assert type(model) is az.TarFlow and model.noise_std == pytest.approx(0.03)


def test_evaluate_says_a_noise_trained_bpd_is_not_comparable(trained: Path) -> None:
    code, out, err = run(["evaluate", "--checkpoint", trained, "--dataset", "digits",
                          "--limit", 32, "--device", "cpu", "--json"])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["bpd_noise_std"] == pytest.approx(0.03)


def test_sample_with_guidance_and_denoising(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    code, stdout, err = run(["sample", "--checkpoint", trained, "-n", 3, "--guidance", 1.5,
                             "--attention-temperature", 1.3, "--annealed-guidance",
                             "--denoise", "--device", "cpu", "-o", out])
    assert code == 0, err
    assert "guidance 1.5, denoised" in stdout
    import numpy as np

    assert np.load(out)["images"].shape == (3, 8, 8, 1)
    code, _, err = run(["sample", "--checkpoint", trained, "-n", 2, "--guidance", 1.0,
                        "--device", "cpu", "-o", tmp_path / "t.png"])
    assert code == 1 and "attention_temperature" in err and "Traceback" not in err


def test_denoise_refuses_a_likelihood_checkpoint(tmp_path: Path) -> None:
    model = az.create_model("marflow_tiny")
    model.save_pretrained(tmp_path / "ckpt")
    code, _, err = run(["sample", "--checkpoint", tmp_path / "ckpt", "-n", 2, "--denoise",
                        "--device", "cpu", "-o", tmp_path / "s.png"])
    assert code == 1 and "uniform dequantisation" in err and "Traceback" not in err
    assert not (tmp_path / "s.png").exists()


def test_inspect_draws_every_block(trained: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray((torch.rand(8, 8) * 255).byte().numpy(), mode="L").save(tmp_path / "a.png")
    code, _, err = run(["inspect", "--checkpoint", trained, "--image", tmp_path / "a.png",
                        "--out", tmp_path / "insp", "--device", "cpu"])
    assert code == 0, err
    names = {p.name for p in (tmp_path / "insp").iterdir()}
    assert names == {"attention_block1.png", "attention_block2.png", "bits_per_dim.png"}


def test_push_dry_run_of_a_class_conditional_checkpoint(tmp_path: Path) -> None:
    """push checks the round trip before uploading; a class-conditional model gets labels."""
    model = az.create_model("tarflow_cond_tiny")
    model.save_pretrained(tmp_path / "ckpt")
    code, out, err = run(["push", "--checkpoint", tmp_path / "ckpt", "--repo", "user/x",
                          "--dry-run"])
    assert code == 0, err
    assert "passed every check" in out.replace("\n", " ")
