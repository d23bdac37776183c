"""Commands whose work grows with a number the user gives (`interpolate --steps`, `sample -n`,
grid sizes, `validate --epochs`, `train --steps`): refused up front, with what they would need,
when the result cannot be held or viewed; otherwise in batches with progress, and stopped by
Ctrl-C within seconds (issue 23, item 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli as run
from PIL import Image

import attnflow_zoo as az


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data-initialised 1×8×8 AttnFlow-iMap tiny checkpoint, and two digit PNGs beside it."""
    folder = tmp_path_factory.mktemp("tiny")
    model = az.create_model("attnflow_imap_tiny", in_channels=1)
    g = torch.Generator().manual_seed(0)
    model.initialize_from_data(torch.randint(0, 256, (8, *model.input_shape), generator=g,
                                             dtype=torch.uint8), g)
    model.save_pretrained(folder / "ckpt")
    arrays = np.load(Path(az.__file__).parent / "assets" / "digits.npz")["test_images"]
    for i in (0, 1):
        Image.fromarray(arrays[i].reshape(28, 28)).save(folder / f"d{i}.png")
    return folder


#: The CLI in a fresh interpreter whose address space is capped at 8 GiB: a command that tried
#: to hold what it should refuse fails here instead of taking the machine's memory.
CAPPED = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
          "from attnflow_cli.main import main; main()")


def _capped(args: list[object]) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _one_line(code: int, err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def test_a_strip_no_viewer_could_open_is_refused_before_any_decoding(tiny: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "strip.png"
    code, err = _capped(["interpolate", "--checkpoint", tiny / "ckpt", "--a", tiny / "d0.png",
                         "--b", tiny / "d1.png", "--steps", 10_000_000, "-o", out])
    line = _one_line(code, err)
    assert "a grid of 10,000,000 images of 1×8×8 is 100,000,002×12 pixels, more than the " \
           "89,478,485 an image viewer opens" in line, line
    assert not out.exists()


def test_a_sample_grid_or_array_that_cannot_be_held_is_refused(tiny: Path,
                                                               tmp_path: Path) -> None:
    code, err = _capped(["sample", "--checkpoint", tiny / "ckpt", "-n", 2_000_000, "-o",
                         tmp_path / "grid.png"])
    assert "a grid of 2,000,000 images of 1×8×8 is" in _one_line(code, err)
    code, err = _capped(["sample", "--checkpoint", tiny / "ckpt", "-n", 10**13, "-o",
                         tmp_path / "all.npz"])
    line = _one_line(code, err)
    assert "an array of 10,000,000,000,000 images would need about 1.92e+06 GB of memory, " \
           "more than the" in line and "ask for fewer images" in line, line
    assert not list(tmp_path.iterdir())


def test_a_long_interpolation_runs_in_batches(tiny: Path, tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from attnflow_zoo import progress

    monkeypatch.setattr(progress, "FIRST", 0.0)  # a line at the first batch, however quick
    out = tmp_path / "strip.png"
    code, stdout, err = run(["interpolate", "--checkpoint", tiny / "ckpt", "--a", tiny / "d0.png",
                             "--b", tiny / "d1.png", "--steps", 300, "-o", out], capsys)
    assert code == 0, err
    assert "interpolate 64/300" in err and "interpolate 300/300" in err  # batch by batch
    assert Image.open(out).size == (300 * 10 + 2, 12)


def test_fid_statistics_stream_in_constant_memory() -> None:
    """The running moments equal the statistics of all the features at once (float64
    rounding), whatever the batches."""
    from attnflow_zoo.evaluation.fid import _Moments, feature_statistics, streaming_statistics

    g = torch.Generator().manual_seed(0)
    features = (torch.randn(1000, 16, generator=g, dtype=torch.float64) * 3 + 7).numpy()
    whole = feature_statistics(features)
    moments = _Moments()
    for start, stop in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        moments.add(features[start:stop])
    streamed = moments.statistics("unknown")
    np.testing.assert_allclose(streamed.mu, whole.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.sigma, whole.sigma, rtol=1e-10, atol=1e-10)

    class Identity:
        weights_id = "identity"

        def __call__(self, batch: torch.Tensor) -> torch.Tensor:
            return batch.flatten(1).double()

    images = torch.randint(0, 256, (50, 1, 2, 2), generator=g, dtype=torch.uint8)
    stats = streaming_statistics(images, Identity(), batch_size=7)
    reference = feature_statistics(images.flatten(1).double().numpy())
    np.testing.assert_allclose(stats.sigma, reference.sigma, rtol=1e-10, atol=1e-10)
    assert stats.num_images == 50


# --- Ctrl-C ---------------------------------------------------------------------------------
def _commands(tiny: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    ckpt = str(tiny / "ckpt")
    return {
        "interpolate": (["interpolate", "--checkpoint", ckpt, "--a", str(tiny / "d0.png"),
                         "--b", str(tiny / "d1.png"), "--steps", "50000", "-o",
                         str(tmp_path / "s.png")], "/50000 ("),
        "sample": (["sample", "--checkpoint", ckpt, "-n", "500000", "--batch-size", "64",
                    "-o", str(tmp_path / "s.npz")], "/500000 ("),
        "validate": (["validate", "--dataset", "digits", "--limit", "1000", "--epochs", "100",
                      "--out", str(tmp_path / "v")], "validate: train "),
        "train": (["train", "--model", "attnflow_imap_tiny", "--in-channels", "1", "--dataset",
                   "digits", "--steps", "100000", "--batch-size", "8", "--limit", "64",
                   "--eval-limit", "8", "--out", str(tmp_path / "t")], "train 1/"),
    }


@pytest.mark.parametrize("command", ["interpolate", "sample", "validate", "train"])
def test_ctrl_c_stops_a_long_command_within_seconds(tiny: Path, tmp_path: Path,
                                                    command: str) -> None:
    args, started = _commands(tiny, tmp_path)[command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The command as a terminal starts it: with Ctrl-C's default action. A suite started in
    # the background (`pytest ... &` in a script) has SIGINT ignored, and a child inherits
    # that; Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-c", "from attnflow_cli.main import main; main()",
                             *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(240, proc.kill)  # a command that never says it started
    watchdog.start()
    seen = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if started in line:
                break
        assert any(started in x for x in seen), "".join(seen)[-2000:]
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
        stopped = time.monotonic() - interrupted
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert stopped < 10, stopped
    assert "Traceback" not in rest
