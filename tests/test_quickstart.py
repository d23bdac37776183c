"""`attnflow quickstart` as a new user runs it: a fresh folder, no network, no cache, a
seconds-long budget, and one run folder holding everything the command promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

import attnflow_zoo as az
from attnflow_zoo import checkpoint
from attnflow_zoo.data import datasets
from attnflow_zoo.evaluation import results
from attnflow_zoo.workflows import quickstart


def _fresh_env(home: Path) -> dict[str, str]:
    """Offline, with empty Hugging Face and dataset caches: nothing comes from an earlier run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"})
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`attnflow quickstart --minutes 0.05` (3 s of training) in an empty folder: (cwd, stdout)."""
    cwd = tmp_path_factory.mktemp("fresh")
    proc = subprocess.run(
        [sys.executable, "-c", "from attnflow_cli.main import main; main()", "quickstart",
         "--minutes", "0.05", "--device", "cpu"],
        cwd=cwd, env=_fresh_env(cwd / "hf-home"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc.stdout


def test_the_run_folder_holds_a_loadable_checkpoint(quick_run: tuple[Path, str]) -> None:
    run = quick_run[0] / quickstart.DEFAULT_OUT
    ckpt = checkpoint.resolve_local(run)  # the `latest` rule: the newest step-N/
    assert ckpt.parent == run and ckpt.name.startswith("step-")
    model = az.load_model(run)
    assert type(model).__name__ == "AttnFlow" and tuple(model.input_shape) == (1, 32, 32)
    record = checkpoint.read_run_record(ckpt)
    assert record["preset"] == quickstart.DEFAULT_PRESET and record["status"] == "finished"
    # 3 s cannot reach the recipe's 3,000 steps: the time budget ended the run, as recorded.
    assert record["stop_reason"] == "max_seconds" and 0 < record["step"] < 3000


def test_the_heldout_bits_per_dim_beat_the_uniform_baseline(quick_run: tuple[Path, str]
                                                            ) -> None:
    cwd, stdout = quick_run
    run = cwd / quickstart.DEFAULT_OUT
    metrics = results.load_metrics(run / "metrics.json")
    assert metrics["dataset"] == "digits" and metrics["split"] == "test"
    assert metrics["bpd_num_images"] == 1000  # the whole embedded test split
    assert 0 < metrics["bpd"] < quickstart.UNIFORM_BPD == 8.0
    # The same number in run.json (what training measured) and in what the command printed.
    record = checkpoint.read_run_record(checkpoint.resolve_local(run))
    test = [m for m in record["metrics"] if m["split"] == "test"]
    assert [m["value"] for m in test] == [metrics["bpd"]]
    assert f"held-out bits/dim: {metrics['bpd']:.3f} on 1000 test digits" in stdout
    assert any(json.loads(line).get("split") == "test"
               for line in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("name", ["samples.png", quickstart.SAMPLES_T_NAME])
def test_the_sample_grids_are_8x8_digit_images(quick_run: tuple[Path, str], name: str) -> None:
    grid = np.asarray(Image.open(quick_run[0] / quickstart.DEFAULT_OUT / name).convert("L"))
    # 64 samples of 32×32 enlarged ×2 to 64×64, 8 per row, 2 px white lines between them.
    assert grid.shape == (8 * 66 + 2, 8 * 66 + 2)
    tiles = [grid[2 + i * 66:2 + i * 66 + 64, 2 + j * 66:2 + j * 66 + 64]
             for i in range(8) for j in range(8)]
    assert all(t.std() > 0 for t in tiles)  # every tile is an image, not a blank
    assert len({t.tobytes() for t in tiles}) == 64  # 64 different samples


def test_the_curve_is_a_png(quick_run: tuple[Path, str]) -> None:
    with Image.open(quick_run[0] / quickstart.DEFAULT_OUT / "curves.png") as image:
        assert image.format == "PNG" and min(image.size) >= 200


def test_the_card_names_the_embedded_dataset_and_the_score(quick_run: tuple[Path, str]
                                                           ) -> None:
    cwd, stdout = quick_run
    run = cwd / quickstart.DEFAULT_OUT
    card = ModelCard.load(run / "README.md")
    assert datasets.DATASETS["digits"].name in card.text  # "digits (5,000 MNIST digits embedded …)"
    (result,) = card.data.eval_results
    metrics = results.load_metrics(run / "metrics.json")
    assert result.metric_type == "bits_per_dim" and result.metric_value == metrics["bpd"]
    assert quickstart.DEFAULT_PRESET in card.text
    assert f"card:       {quickstart.DEFAULT_OUT / 'README.md'}" in stdout


def test_it_ends_with_the_next_commands(quick_run: tuple[Path, str]) -> None:
    stdout = quick_run[1]
    tail = stdout[stdout.index("next:"):]
    for command in ("attnflow sample --checkpoint runs/quickstart",
                    "attnflow evaluate --checkpoint runs/quickstart --dataset digits",
                    "attnflow train --model", "--dataset cifar10",
                    f"attnflow reproduce {quickstart.DEFAULT_PRESET}"):
        assert command in tail, command


def test_the_cli_defaults_are_the_library_defaults() -> None:
    import inspect

    from attnflow_cli import quickstart as cli

    params = inspect.signature(cli.quickstart).parameters
    assert params["model"].default == quickstart.DEFAULT_PRESET
    assert params["minutes"].default == quickstart.DEFAULT_MINUTES


def test_a_second_run_goes_to_a_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.chdir(tmp_path)
    assert quickstart.run_folder(None) == quickstart.DEFAULT_OUT
    (quickstart.DEFAULT_OUT / "step-0000001").mkdir(parents=True)
    assert quickstart.run_folder(None) == Path("runs") / "quickstart-2"
    assert quickstart.run_folder(None, resume=True) == quickstart.DEFAULT_OUT


@pytest.mark.parametrize("minutes", [0, -1.0, float("inf"), float("nan")])
def test_a_budget_that_is_not_a_positive_time_is_refused(minutes: float, tmp_path: Path) -> None:
    from attnflow_zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="--minutes must be a positive number"):
        quickstart.quickstart(minutes=minutes, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
