"""`attnflow train` / `attnflow evaluate` end to end on real digits, and what a user sees on
errors (one line, exit status 1, nothing half-written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _cli import run_cli as run

from attnflow_zoo import registry

PRESET = "tinyglow_test"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    # One thread (small convs spin-wait with two on a loaded machine); a private data cache.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _preset(monkeypatch):
    """A small real Glow registered as a preset for the duration of a test."""
    from _toy_flow import ToyFlow, ToyFlowConfig

    import attnflow_zoo.factory  # noqa: F401 - the zoo's own presets first

    entry = registry.ModelEntry(PRESET, ToyFlow, ToyFlowConfig(hidden_channels=16),
                                "Small Glow on 8×8 grey images (tests only)")
    monkeypatch.setitem(registry._PRESETS, PRESET, entry)


def _train_args(folder, out, *extra, preset: str = "marflow_tiny") -> list[str]:
    channels = ["--in-channels", 1] if preset != PRESET else []
    return ["train", "--model", preset, "--dataset", folder, "--out", out, "--device", "cpu",
            *channels,
            "--batch-size", 32, "--limit", 1024, "--eval-limit", 256, "--eval-batch-size", 128,
            "--warmup-steps", 10, "--log-every", 50, *extra]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "steps"), [(PRESET, 200), ("marflow_tiny", 100)])
def test_train_lowers_bpd_and_evaluate_reproduces_it(preset, steps, mnist_folder, tmp_path,
                                                     capsys):
    out = tmp_path / "run"
    args = _train_args(mnist_folder, out, "--steps", steps, "--lr", 5e-3,
                       "--eval-every", steps // 2, preset=preset)
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_bpd"] for r in records if "val_bpd" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.5, vals
    evals = [r["eval_bpd"] for r in records if "eval_bpd" in r]
    assert len(evals) == 1 and "held-out" in stdout

    code, stdout, err = run(["evaluate", "--checkpoint", out, "--dataset", mnist_folder,
                             "--limit", 256, "--batch-size", 128, "--device", "cpu", "--json"],
                            capsys)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["split"] == "test" and result["bpd_num_images"] == 256
    assert result["bpd"] == evals[-1]


def test_resume_continues_and_refuses_to_overwrite(mnist_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(_train_args(mnist_folder, out, "--steps", 3), capsys)
    # The library's note on resizing names its argument; the command says its flag.
    assert code == 0 and "28×28 resized (bilinear) to 8×8" in err and "--image-size" in err
    code, _, err = run(_train_args(mnist_folder, out, "--steps", 3), capsys)
    assert code == 1 and "--resume" in err and len(err.strip().splitlines()) == 1
    # A longer run shortens no schedule here but lengthens the warm-up (cut to the run's
    # length): refused unless said.
    code, _, err = run(_train_args(mnist_folder, out, "--steps", 5, "--resume"), capsys)
    assert code == 1 and "--override steps" in err and "warm-up" in err
    assert (out / "latest").read_text().strip() == "step-0000003"
    code, _, err = run(_train_args(mnist_folder, out, "--steps", 5, "--resume", "--override",
                                   "steps"), capsys)
    assert code == 0 and "resuming from step 3" in err
    assert (out / "latest").read_text().strip() == "step-0000005"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "train_bpd" in x]
    assert steps == [3, 5]


def _snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else None


@pytest.mark.parametrize("case", ["unknown_preset", "channels", "missing_folder",
                                  "other_architecture", "bad_attention", "unknown_field"])
def test_bad_input_is_one_line_and_writes_nothing(case, mnist_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args(mnist_folder, out, "--steps", 2)
    if case == "unknown_preset":
        args[2] = "no_such_model"
    elif case == "channels":
        args += ["--in-channels", 3]
    elif case == "missing_folder":
        args[4] = tmp_path / "nowhere"
    elif case == "bad_attention":
        args += ["--attn", "softmax"]
    elif case == "unknown_field":
        args = _train_args(mnist_folder, out, "--steps", 2, "--attn", "imap", preset=PRESET)
    elif case == "other_architecture":
        assert run(args, capsys)[0] == 0
        args = _train_args(mnist_folder, out, "--steps", 4, "--resume", "--attn", "imap")
    before = _snapshot(out)
    code, stdout, err = run(args, capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "Traceback" not in err + stdout
    cause = {"unknown_preset": "no_such_model", "channels": "1×8×8 but the model takes 3×8×8",
             "missing_folder": "nowhere", "other_architecture": "different attention",
             "bad_attention": "'softmax'", "unknown_field": "no field(s) attention"}[case]
    assert cause in err, err
    assert _snapshot(out) == before
    if case == "other_architecture":
        assert "attention" in err


def test_evaluate_errors(mnist_folder, tmp_path, capsys):
    code, _, err = run(["evaluate", "--checkpoint", tmp_path, "--dataset", mnist_folder], capsys)
    assert code == 1 and "not a checkpoint" in err and len(err.strip().splitlines()) == 1
    # --fid without the Inception weights (or without FID support) is one clear line too.
    out = tmp_path / "run"
    assert run(_train_args(mnist_folder, out, "--steps", 1), capsys)[0] == 0
    code, _, err = run(["evaluate", "--checkpoint", out, "--dataset", mnist_folder, "--limit",
                        16, "--fid", "--num-samples", 8, "--device", "cpu"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "Inception weights" in err, err  # the missing weights, not any other failure


def test_console_script_error_is_one_line():
    """What a user sees: a subprocess of the real entry point, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "attnflow_cli", "train", "--model",
                           "no_such_model", "--dataset", "mnist", "--steps", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "unknown model 'no_such_model'" in lines[0], proc.stderr


def test_library_words_become_the_flags_of_the_command_that_ran():
    """Library messages name arguments (`batch_size`); the CLI shows the running command's
    flag for each, and leaves other backticked words (a column, a function) alone."""
    import typer
    from attnflow_cli.flags import command_of, in_flags
    from attnflow_cli.main import app

    group = typer.main.get_command(app)
    train = command_of(group, ["train", "--model", PRESET])
    assert in_flags("lower `batch_size` or pick another `out_dir`; no `label` column", train) \
        == "lower --batch-size or pick another --out; no `label` column"
    assert in_flags("drop `which`", command_of(group, ["sample", "-n", "4"])) == "drop --class"
    assert in_flags("pass `split`", command_of(group, ["models"])) == "pass `split`"
