"""`attnflow quickstart` as a new user runs it: a fresh folder, no network, no cache, a
seconds-long budget, and one run folder holding everything the command promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
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
    """Offline, with empty Hugging Face and dataset caches: nothing comes from an earlier run.
    No OMP_NUM_THREADS: the command chooses its threads, as for a new user."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k != "OMP_NUM_THREADS"}
    env.update({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1"})
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, datetime]:
    """`attnflow quickstart --minutes 0.05` (3 s of training) in an empty folder, off a
    terminal: (cwd, stdout, stderr, when it was started)."""
    cwd = tmp_path_factory.mktemp("fresh")
    started = datetime.now().replace(microsecond=0)
    proc = subprocess.run(
        [sys.executable, "-c", "from attnflow_cli.main import main; main()", "quickstart",
         "--minutes", "0.05", "--device", "cpu"],
        cwd=cwd, env=_fresh_env(cwd / "hf-home"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc.stdout, proc.stderr, started


def test_off_a_terminal_it_says_its_threads_first_and_shows_progress_within_30_s(
        quick_run: tuple[Path, str, str, datetime]) -> None:
    lines = quick_run[2].splitlines()
    # The first line says what the command chose, measured on this machine (issue 23).
    assert re.fullmatch(r"\S+ \S+ threads: \d+ \(load \d+\.\d of \d+ cores from other "
                        r"processes\)", lines[0]), lines[0]
    first = next(x for x in lines if re.match(r"\S+ \S+ train 1\b", x))
    when = datetime.strptime(first[:19], "%Y-%m-%d %H:%M:%S")
    assert (when - quick_run[3]).total_seconds() <= 30, (first, quick_run[3])


def test_the_run_folder_holds_a_loadable_checkpoint(quick_run: tuple) -> None:
    run = quick_run[0] / quickstart.DEFAULT_OUT
    ckpt = checkpoint.resolve_local(run)  # the `latest` rule: the newest step-N/
    assert ckpt.parent == run and ckpt.name.startswith("step-")
    model = az.load_model(run)
    assert type(model).__name__ == "AttnFlow" and tuple(model.input_shape) == (1, 32, 32)
    record = checkpoint.read_run_record(ckpt)
    assert record["preset"] == quickstart.DEFAULT_PRESET and record["status"] == "finished"
    # 3 s cannot reach the recipe's 3,000 steps: the time budget ended the run, as recorded.
    assert record["stop_reason"] == "max_seconds" and 0 < record["step"] < 3000


def test_the_heldout_bits_per_dim_beat_the_uniform_baseline(quick_run: tuple
                                                            ) -> None:
    cwd, stdout = quick_run[:2]
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
def test_the_sample_grids_are_8x8_digit_images(quick_run: tuple, name: str) -> None:
    grid = np.asarray(Image.open(quick_run[0] / quickstart.DEFAULT_OUT / name).convert("L"))
    # 64 samples of 32×32 enlarged ×2 to 64×64, 8 per row, 2 px white lines between them.
    assert grid.shape == (8 * 66 + 2, 8 * 66 + 2)
    tiles = [grid[2 + i * 66:2 + i * 66 + 64, 2 + j * 66:2 + j * 66 + 64]
             for i in range(8) for j in range(8)]
    assert all(t.std() > 0 for t in tiles)  # every tile is an image, not a blank
    assert len({t.tobytes() for t in tiles}) == 64  # 64 different samples


def test_the_curve_is_a_png(quick_run: tuple) -> None:
    with Image.open(quick_run[0] / quickstart.DEFAULT_OUT / "curves.png") as image:
        assert image.format == "PNG" and min(image.size) >= 200


def test_the_card_names_the_embedded_dataset_and_the_score(quick_run: tuple
                                                           ) -> None:
    cwd, stdout = quick_run[:2]
    run = cwd / quickstart.DEFAULT_OUT
    card = ModelCard.load(run / "README.md")
    assert datasets.DATASETS["digits"].name in card.text  # "digits (5,000 MNIST digits embedded …)"
    (result,) = card.data.eval_results
    metrics = results.load_metrics(run / "metrics.json")
    assert result.metric_type == "bits_per_dim" and result.metric_value == metrics["bpd"]
    assert quickstart.DEFAULT_PRESET in card.text
    assert f"card:       {quickstart.DEFAULT_OUT / 'README.md'}" in stdout


def test_it_ends_with_the_next_commands(quick_run: tuple) -> None:
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

    with pytest.raises(ConfigError, match="`minutes` must be a positive number"):
        quickstart.quickstart(minutes=minutes, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_command_says_the_budget_in_its_flag(tmp_path: Path) -> None:
    """The library names its argument (`minutes`); the command says its flag."""
    from _cli import run_cli

    code, _, err = run_cli(["quickstart", "--minutes", 0, "--out", tmp_path / "run",
                            "--device", "cpu"])
    assert code == 1 and "--minutes must be a positive number" in err, err
    assert not (tmp_path / "run").exists()


_EPOCH_ENTRY = '''
import dataclasses, sys
from attnflow_zoo import factory, registry  # factory registers the presets
from attnflow_zoo.models.attnflow import AttnFlow
tiny = registry.get_entry("marflow_tiny")
recipe = dataclasses.replace(registry.get_entry("marflow_mnist_small").recipe, batch_size=16,
                             warmup_images=16)
assert recipe.steps is None and recipe.epochs  # an epoch recipe, as every real-data entry's
registry.register_preset("marflow_epochs_tiny", AttnFlow,
                         dataclasses.replace(tiny.config, image_size=32, in_channels=1),
                         "a 1×32×32 tiny entry with an epoch recipe", recipe=recipe)
from attnflow_cli.main import main
main()
'''


def test_quickstart_trains_an_entry_whose_recipe_counts_epochs(tmp_path: Path) -> None:
    """`--model` with any 1×32×32 entry: the real-data entries' recipes count epochs
    (``steps`` None), which the first line of the run once formatted as a number."""
    out = tmp_path / "run"
    env = {**_fresh_env(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _EPOCH_ENTRY, "quickstart", "--model",
                           "marflow_epochs_tiny", "--minutes", "0.02", "--out", str(out),
                           "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at most 82 epochs of batches of 16 images" in proc.stdout
    record = checkpoint.read_run_record(checkpoint.resolve_local(out))
    assert record["preset"] == "marflow_epochs_tiny" and record["status"] == "finished"
    assert record["stop_reason"] == "max_seconds"
    assert (out / "metrics.json").is_file() and (out / "README.md").is_file()
