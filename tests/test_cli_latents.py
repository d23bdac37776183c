"""`attnflow reconstruct`, `interpolate` and `inspect` from the CLI on tiny checkpoints: one
trained by `attnflow train` on the embedded digits, others saved from data-initialised presets.
The PNGs are read back: their sizes and the pixels the commands promise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli as run
from PIL import Image

import attnflow_zoo as az
from attnflow_zoo.data.images import read_image
from attnflow_zoo.evaluation import inspection, latents

SIZE = 16  # the checkpoints' image size: 28×28 digits resized to 16×16
CELL = SIZE + 2  # save_image's grid: 2 px padding around every image


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[Path]:
    """Three test digits of the embedded dataset as PNG files (28×28 grey)."""
    folder = tmp_path_factory.mktemp("digits")
    arrays = np.load(Path(az.__file__).parent / "assets" / "digits.npz")["test_images"]
    paths = []
    for i in (0, 1, 2):
        Image.fromarray(arrays[i].reshape(28, 28)).save(folder / f"d{i}.png")
        paths.append(folder / f"d{i}.png")
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """AttnFlow-iMap tiny (1×16×16) trained for 3 steps on the digits: a real run folder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "run"
    try:
        code, _, err = run(["train", "--model", "attnflow_imap_tiny", "--dataset", "digits",
                            "--in-channels", 1, "--image-size", SIZE, "--out", out, "--device",
                            "cpu", "--steps", 3, "--batch-size", 16, "--limit", 64,
                            "--eval-limit", 32, "--warmup-steps", 1])
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    return out


def _saved(name: str, folder: Path, **overrides: object) -> Path:
    """A data-initialised preset saved as a checkpoint folder (no training)."""
    model = az.create_model(name, in_channels=1, **overrides)
    g = torch.Generator().manual_seed(0)
    model.initialize_from_data(torch.randint(0, 256, (8, *model.input_shape), generator=g,
                                             dtype=torch.uint8), g)
    model.save_pretrained(folder)
    return folder


def _cell(png: Path, row: int, col: int) -> np.ndarray:
    """Grid cell (row, col) of a save_image PNG as a grey uint8 SIZE×SIZE array."""
    a = np.asarray(Image.open(png).convert("RGB"))
    top, left = 2 + row * CELL, 2 + col * CELL
    return a[top:top + SIZE, left:left + SIZE, 0]


def test_reconstruct(trained, digits, tmp_path):
    out = tmp_path / "rec.png"
    code, stdout, err = run(["reconstruct", "--checkpoint", trained, *sum(
        (["--image", p] for p in digits), []), "-o", out, "--device", "cpu"])
    assert code == 0, err
    max_error = float(re.search(r"max error (\S+),", stdout).group(1))
    assert max_error < 1e-5, stdout
    assert "3 images" in stdout and " 0 of the 8-bit values changed" in stdout
    assert Image.open(out).size == (3 * CELL + 2, 2 * CELL + 2)
    for col, path in enumerate(digits):
        image = read_image(path, (1, SIZE, SIZE))[0].numpy()
        assert image.std() > 20  # a digit, not a blank
        assert np.array_equal(_cell(out, 0, col), image)  # the input row
        assert np.array_equal(_cell(out, 1, col), image)  # its reconstruction


def test_interpolate(trained, digits, tmp_path):
    out = tmp_path / "strip.png"
    code, stdout, err = run(["interpolate", "--checkpoint", trained, "--a", digits[0], "--b",
                             digits[1], "--steps", 6, "-o", out, "--device", "cpu"])
    assert code == 0, err
    assert "wrote 6 images" in stdout and "0 of 6 images non-finite" in stdout
    assert "0 out of range" in stdout and "warning" not in stdout
    assert Image.open(out).size == (6 * CELL + 2, CELL + 2)
    a, b = (read_image(p, (1, SIZE, SIZE))[0].numpy() for p in digits[:2])
    assert np.array_equal(_cell(out, 0, 0), a) and np.array_equal(_cell(out, 0, 5), b)
    middle = _cell(out, 0, 2).astype(int)
    assert np.abs(middle - a).mean() > 1 and np.abs(middle - b).mean() > 1
    assert middle.std() > 10  # an image, not an overflow drawn black


@pytest.mark.parametrize("command", ["reconstruct", "interpolate"])
def test_json_reports_what_the_uint8_conversion_hid(command, trained, digits, tmp_path):
    args = (["--image", digits[0], "--image", digits[1]] if command == "reconstruct"
            else ["--a", digits[0], "--b", digits[1], "--steps", 4])
    code, stdout, err = run([command, "--checkpoint", trained, *args, "-o",
                             tmp_path / "out.png", "--device", "cpu", "--json"])
    assert code == 0, err
    result = json.loads(stdout)
    assert result["num_nonfinite"] == 0 and result["num_out_of_range"] == 0
    assert result["path"] == str(tmp_path / "out.png")


def test_sample_reports_and_marks_overflowing_images(trained, tmp_path):
    """At an absurd temperature every sample is non-finite or out of range: the command says
    how many (text and JSON) and draws none of them as a plain black tile."""
    out = tmp_path / "grid.png"
    base = ["sample", "--checkpoint", trained, "-n", 4, "--nrow", 4, "--seed", 1, "-o", out,
            "--device", "cpu"]
    code, stdout, err = run([*base, "--temperature", 1e30, "--json"])
    assert code == 0, err
    result = json.loads(stdout)
    assert result["num_images"] == 4
    assert result["num_nonfinite"] + result["num_out_of_range"] == 4
    for col in range(4):
        cell = _cell(out, 0, col)
        assert cell.min() == 0 and cell.max() == 255  # marked, not a silent black tile
    code, stdout, err = run([*base, "--temperature", 1e30])
    assert code == 0, err
    assert "warning: " in stdout and "of 4 images non-finite" in stdout
    code, stdout, err = run([*base, "--temperature", 0.5])
    assert code == 0, err
    assert "warning" not in stdout and "0 of 4 images non-finite" in stdout


def test_inspect_trained_imap(trained, digits, tmp_path):
    out = tmp_path / "inspect"
    code, stdout, err = run(["inspect", "--checkpoint", trained, "--image", digits[0],
                             "--position", "3,12", "--out", out, "--device", "cpu"])
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["attention_level1.png", "attention_level2.png", "bits_per_dim.png"]
    # attnflow_imap_tiny: K = 2 steps per level, one figure row (3 inches at 100 dpi) each
    assert Image.open(out / "attention_level1.png").size == (700, 600)
    pixels = np.asarray(Image.open(out / "bits_per_dim.png").convert("RGB"))
    assert pixels.std() > 10
    # the printed bits/dim is the model's on that image
    bpd = float(re.search(r"([\d.]+) bits/dim", stdout).group(1))
    model = az.load_model(trained)
    x = latents.centred(model, read_image(digits[0], model.input_shape)[None])
    expected = inspection.bits_per_dim_split(model, x).total[0]
    assert bpd == pytest.approx(float(expected), abs=1e-4)
    assert 1 < bpd < 12


@pytest.mark.parametrize(("name", "overrides", "rows"), [
    ("attnflow_itrans_tiny", {"image_size": SIZE}, 2),  # level 1 only, K = 2
    ("resflow_dot_tiny", {}, 1),  # one residual attention layer after the first scale
])
def test_inspect_other_attentions(name, overrides, rows, digits, tmp_path):
    checkpoint = _saved(name, tmp_path / "ckpt", **overrides)
    out = tmp_path / "inspect"
    code, stdout, err = run(["inspect", "--checkpoint", checkpoint, "--image", digits[1],
                             "--out", out, "--device", "cpu"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["attention_level1.png", "bits_per_dim.png"]
    assert Image.open(out / "attention_level1.png").size == (700, 300 * rows)


@pytest.mark.parametrize(("args", "cause"), [
    (["inspect", "--image", "{d0}", "--position", "3;4"], "ROW,COL"),
    (["inspect", "--image", "{d0}", "--position", "3,16"], "outside the model's 16×16"),
    (["inspect", "--image", "{missing}"], "no image file"),
    (["interpolate", "--a", "{d0}", "--b", "{d0}", "--steps", 1], "≥ 2"),
    (["reconstruct", "--image", "{d0}", "-o", "{out}.gif"], ".png"),
])
def test_errors_are_one_line(args, cause, trained, digits, tmp_path):
    fill = {"d0": digits[0], "missing": tmp_path / "missing.png", "out": tmp_path / "x"}
    args = [str(a).format(**fill) for a in args]
    code, stdout, err = run([args[0], "--checkpoint", trained, "--device", "cpu", *args[1:]])
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert cause in err, err
    assert "Traceback" not in stdout + err


def test_a_source_is_required(digits):
    code, _, err = run(["reconstruct", "--image", digits[0]])
    assert code == 1 and "exactly one of --checkpoint" in err
