"""What a training run leaves and refuses (in-process, through the `attnflow` entry point):
resume checks, seeded initial weights, falling back past a damaged checkpoint, the run
folder's record and pictures, the lock, and every bad input as one line that writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_train import PRESET, _env, _preset, _snapshot, run  # noqa: F401 - fixtures

from attnflow_zoo import progress
from attnflow_zoo.errors import ConfigError, TrainingError
from attnflow_zoo.training.config import check_resume
from attnflow_zoo.training.lock import LOCK_NAME, RunLock


def _args(folder, out, *extra, preset: str = PRESET) -> list:
    channels = ["--in-channels", 1] if preset != PRESET else []
    return ["train", "--model", preset, "--dataset", folder, "--out", out, "--device", "cpu",
            *channels, "--batch-size", 16, "--limit", 256, "--eval-limit", 32,
            "--warmup-steps", 2, "--log-every", 1, *extra]


def _train_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "train_bpd" in x]


def _one_error_line(code: int, stdout: str, err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code not in (0, None), (stdout, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in stdout + err
    return lines[0]


# --- resume ---------------------------------------------------------------------------------
def test_resume_refuses_changes_unless_overridden(mnist_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(_args(mnist_folder, out, "--steps", 3), capsys)[0] == 0
    before = _snapshot(out)
    line = _one_error_line(*run(_args(mnist_folder, out, "--steps", 5, "--resume",
                                      "--batch-size", 32), capsys))
    assert "batch_size=32: the run used 16" in line and "start a new --out" in line
    line = _one_error_line(*run(_args(mnist_folder, out, "--steps", 5, "--resume", "--lr", 1e-3),
                                capsys))
    assert "lr 0.0008 -> 0.001" in line and "--override lr" in line
    assert _snapshot(out) == before
    code, _, err = run(_args(mnist_folder, out, "--steps", 5, "--resume", "--lr", 1e-3,
                             "--override", "lr"), capsys)
    assert code == 0, err
    assert "resuming from step 3" in err and "changed: lr" in err
    assert _train_steps(out) == [1, 2, 3, 4, 5]  # continued at 4, nothing logged twice
    assert json.loads((out / "run.json").read_text())["train_config"]["lr"] == 1e-3


@pytest.mark.parametrize(("saved", "current", "allow", "result"), [
    ({"steps": 10, "warmup_steps": 2, "log_every": 5}, {"steps": 40, "warmup_steps": 2,
                                                       "log_every": 1}, (), []),
    ({"steps": 10, "warmup_steps": 20}, {"steps": 40, "warmup_steps": 20}, (), "warm-up"),
    ({"steps": 10, "schedule": "cosine"}, {"steps": 40, "schedule": "cosine"}, ("steps",),
     ["steps"]),
    ({"seed": 0}, {"seed": 1}, ("seed",), "another seed would train on validation images"),
    ({"validation": 0.02}, {"validation": 0.1}, (), "carved out"),
    ({"lr": 1.0, "ema_decay": 0.9}, {"lr": 2.0, "ema_decay": None}, ("lr",),
     "`allow_changes` ema_decay"),
    ({"dataset": "/a"}, {"dataset": "/b"}, ("dataset",), ["dataset"]),
    ({"lr": 1.0}, {"lr": 1.0}, ("nosuch",), "no such setting"),
])
def test_check_resume_rules(saved, current, allow, result):
    if isinstance(result, list):
        assert check_resume(saved, current, allow) == result
    else:
        with pytest.raises(ConfigError, match=result):
            check_resume(saved, current, allow)


@pytest.mark.parametrize("damage", ["truncated_optimizer", "missing_weights", "bad_checksum",
                                    "no_latest"])
def test_a_damaged_newest_checkpoint_falls_back(damage, mnist_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(_args(mnist_folder, out, "--steps", 4, "--checkpoint-every", 2), capsys)[0] == 0
    newest = out / "step-0000004"
    if damage == "truncated_optimizer":
        opt = newest / "training_state" / "optimizer.safetensors"
        opt.write_bytes(opt.read_bytes()[:100])
    elif damage == "missing_weights":
        (newest / "model.safetensors").unlink()
    elif damage == "bad_checksum":
        weights = newest / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-3] ^= 0xFF
        weights.write_bytes(bytes(raw))
    else:
        (out / "latest").unlink()
    code, _, err = run(_args(mnist_folder, out, "--steps", 6, "--checkpoint-every", 2,
                             "--resume"), capsys)
    assert code == 0, err
    resumed_at = 4 if damage == "no_latest" else 2
    assert f"resuming from step {resumed_at}" in err
    if damage != "no_latest":
        assert "skipping damaged checkpoint step-0000004" in err
    # Replayed steps are logged once, and the result is the uninterrupted run's.
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
    if damage != "truncated_optimizer":
        return
    straight = tmp_path / "straight"
    assert run(_args(mnist_folder, straight, "--steps", 6, "--checkpoint-every", 2), capsys)[0] == 0
    for rel in ("step-0000006/model.safetensors",
                "step-0000006/training_state/optimizer.safetensors"):
        a, b = load_file(straight / rel), load_file(out / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel


# --- seeded initial weights -------------------------------------------------------------------
def _bits(path: Path) -> dict[str, bytes]:
    """Every tensor's exact bytes (the file's own bytes are not comparable: safetensors writes
    its metadata keys in hash order)."""
    return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for k, v in load_file(path).items()}


def test_the_same_seed_gives_the_same_checkpoint(mnist_folder, tmp_path, capsys):
    """marflow_tiny's convolutions draw their initial weights from torch's global RNG."""
    state = torch.random.get_rng_state()
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        code, _, err = run(_args(mnist_folder, out, "--steps", 2, "--seed", seed,
                                 "--validation", 0, preset="marflow_tiny"), capsys)
        assert code == 0, err
        files[name] = [_bits(out / "step-0000002" / rel) for rel in
                       ("model.safetensors", "training_state/model.safetensors",
                        "training_state/optimizer.safetensors")]
        torch.rand(7)  # moving the caller's RNG changes nothing
    assert files["a"] == files["b"]
    assert files["a"][0] != files["c"][0]
    assert not torch.equal(state, torch.random.get_rng_state())  # only ours moved it


# --- what a run folder holds ----------------------------------------------------------------
def test_a_run_folder_holds_events_curves_samples_and_the_record(mnist_folder, tmp_path, capsys):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, stdout, err = run(_args(mnist_folder, out, "--steps", 6, "--eval-every", 3,
                                  "--checkpoint-every", 3, "--validation", 20), capsys)
    assert code == 0, err
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()
    assert {"train/bpd", "train/lr", "train/grad_norm", "train/images_per_s", "validation/bpd",
            "test/bpd"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/bpd")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("validation/bpd")] == [0, 3, 6]
    assert [e.step for e in events.Images("samples")] == [0, 3, 6]
    curves = Image.open(out / "curves.png")
    assert curves.format == "PNG" and curves.width >= 600
    grid = Image.open(out / "samples.png")
    assert grid.format == "PNG" and grid.width >= 256  # 8×8 digits enlarged to be seen

    record = json.loads((out / "run.json").read_text())
    ds = record["dataset"]
    assert ds["path"] == str(mnist_folder.resolve()) and ds["name"] is None
    assert (ds["num_train"], ds["num_validation"], ds["num_heldout"]) == (236, 20, 32)
    assert (ds["limit"], ds["eval_limit"], ds["heldout_split"]) == (256, 32, "test")
    assert ds["validation_split"] == "carved from train" and ds["image_shape"] == [1, 8, 8]
    assert record["preset"] == PRESET and record["architecture"] == "ToyFlow"
    assert (record["step"], record["samples_seen"], record["status"]) == (6, 96, "finished")
    assert record["train_config"]["batch_size"] == 16 and record["world_size"] == 1
    assert record["device"].startswith("cpu") and record["torch"] == torch.__version__
    assert record["attnflow_zoo"] and record["started"] and record["wall_seconds"] > 0
    splits = {(m["split"], m["num_images"]) for m in record["metrics"]}
    assert {("validation", 20), ("test", 32)} <= splits
    assert all(m["step"] == 6 and m["name"] == "bits_per_dim" for m in record["metrics"])
    best = record["best"]
    assert best["split"] == "validation" and best["step"] in (0, 3, 6)
    assert json.loads((out / "best" / "run.json").read_text())["step"] == best["step"]
    for folder in out.glob("step-*"):  # each copy describes its own weights
        copy = json.loads((folder / "run.json").read_text())
        assert copy["step"] == int(folder.name.split("-")[1])
    assert f"best: {out / 'best'}" in stdout


# --- the lock -------------------------------------------------------------------------------
def test_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    with RunLock(tmp_path / "run") as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        with pytest.raises(TrainingError, match=f"in use by another training run \\(process "
                                                f"{os.getpid()} on"):
            RunLock(tmp_path / "run").__enter__()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    # A lock file left by a killed run: nobody holds it, so it is stale.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": "h",
                                                         "started": "then"}))
    with RunLock(tmp_path / "run"):
        pass
    assert f"left by process {dead} on h, started then, which is no longer running" in \
        capsys.readouterr().err


# --- progress off a terminal ------------------------------------------------------------------
def test_progress_lines_off_a_terminal_continue_from_the_start(capsys):
    with progress.progress("train", total=12, start=4, every=4) as advance:
        for step in range(5, 13):
            advance(1, bpd=f"{step:.1f}")
    lines = capsys.readouterr().err.splitlines()  # captured: not a terminal
    # A line after the first step (a log shows at once that the run goes on), then every 4.
    assert [x.split("  ")[0][20:] for x in lines] == ["train 5/12 (42%)", "train 8/12 (67%)",
                                                     "train 12/12 (100%)"]
    assert lines[1].split("  ")[1:3] == ["bpd=8.0", lines[1].split("  ")[2]]
    assert lines[1].split("  ")[-1].startswith("ETA ") and "ETA" not in lines[2]


# --- bad input: one line, nothing written -------------------------------------------------------
@pytest.fixture
def saved_model(tmp_path):
    from _toy_flow import ToyFlow, ToyFlowConfig

    folder = tmp_path / "ckpt"
    ToyFlow(ToyFlowConfig()).save_pretrained(folder)
    (tmp_path / "blocked").write_text("a file where a folder is expected")
    return folder


def _bad(case: str, mnist_folder: Path, tmp_path: Path, ckpt: Path) -> tuple[list, str]:
    out = tmp_path / "out"
    blocked = tmp_path / "blocked" / "x"
    train = _args(mnist_folder, out, "--steps", 2)
    sample = ["sample", "--checkpoint", ckpt, "-n", 4, "-o", tmp_path / "s.png"]
    evaluate = ["evaluate", "--checkpoint", ckpt, "--dataset", mnist_folder, "--limit", 8]
    validate = ["validate", "--dataset", mnist_folder, "--limit", 8, "--out", out]
    table = {
        "train_lr": (train + ["--lr", -1], "lr must be a positive number"),
        "train_warmup": (train + ["--warmup-steps", -5], "warmup_steps must be ≥ 0"),
        "train_batch_0": (train + ["--batch-size", 0], "batch_size must be positive"),
        "train_amp_cpu": (train + ["--precision", "fp16"], "--precision fp16 needs a CUDA device"),
        "train_cuda": (train + ["--device", "cuda"], "CUDA"),
        "train_validation": (train + ["--validation", 1.5], "validation must be"),
        "train_override": (train + ["--override", "lr"], "--override only applies"),
        "train_blocked_out": (_args(mnist_folder, blocked, "--steps", 2), "cannot write"),
        "train_missing_option": (["train", "--model", PRESET, "--steps", 1],
                                 "Missing option '--dataset'"),
        "sample_n0": (sample + ["-n", 0], "number of samples must be a positive integer"),
        "sample_n_negative": (sample + ["-n", -1], "number of samples must be a positive"),
        "sample_temperature_inf": (sample + ["--temperature", "inf"], "finite number"),
        "sample_batch_0": (sample + ["--batch-size", 0], "batch size must be a positive"),
        "sample_suffix": (sample + ["-o", tmp_path / "grid.gif"], "cannot save samples as .gif"),
        "sample_blocked": (sample + ["-o", blocked / "grid.png"], "cannot write"),
        "sample_cuda": (sample + ["--device", "cuda"], "CUDA"),
        "evaluate_batch_0": (evaluate + ["--batch-size", 0], "--batch-size must be a positive"),
        "evaluate_cuda": (evaluate + ["--device", "cuda"], "CUDA"),
        "validate_epochs_0": (validate + ["--epochs", 0], "epochs must be a positive integer"),
        "validate_blocked": (["validate", "--dataset", mnist_folder, "--out", blocked],
                             "cannot write"),
    }
    return table[case]


BAD = ["train_lr", "train_warmup", "train_batch_0", "train_amp_cpu", "train_cuda",
       "train_validation", "train_override", "train_blocked_out", "train_missing_option",
       "sample_n0", "sample_n_negative", "sample_temperature_inf", "sample_batch_0",
       "sample_suffix", "sample_blocked", "sample_cuda", "evaluate_batch_0", "evaluate_cuda",
       "validate_epochs_0", "validate_blocked"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(case, mnist_folder, tmp_path, saved_model,
                                                  capsys):
    if case.endswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, cause = _bad(case, mnist_folder, tmp_path, saved_model)
    before = _snapshot(tmp_path)
    line = _one_error_line(*run(args, capsys))
    assert cause in line, line
    assert _snapshot(tmp_path) == before  # no --out, no half-written file


def _tmpfs(tmp_path, size: str):
    """A tmpfs of ``size`` under ``tmp_path`` (needs root, as in CI), unmounted after; the test
    is skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs."""
    yield from _tmpfs(tmp_path, "256k")


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(full_disk, mnist_folder, capsys):
    out = full_disk / "run"
    code, stdout, err = run(_args(mnist_folder, out, "--steps", 2, preset="marflow_tiny"), capsys)
    # The disk fills up mid-run: progress lines, then one error line, no traceback.
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in stdout + err
    assert "No space left on device" in errors[0] and "not write" in errors[0]
    assert not list(full_disk.rglob("*.tmp")) and not list(full_disk.rglob(".*tmp"))
    assert not (out / "latest").exists()  # no checkpoint was half-made or pointed at


def test_an_unreachable_hub_is_one_line(saved_model, tmp_path):
    """`push` with no network: the HTTP stack's error becomes one line (cli.main), not 80."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import _toy_flow; "
            "from attnflow_cli.main import main; sys.argv = ['attnflow', 'push', "
            f"'--checkpoint', {str(saved_model)!r}, '--repo', 'user/x']; main()")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_TOKEN": "hf_test", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    line = _one_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert "cannot reach the Hugging Face Hub" in line and "refused" in line


def test_every_option_has_help_and_version_prints(capsys):
    import typer
    from attnflow_cli.main import app

    from attnflow_zoo import __version__

    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        bare = [p.name for p in command.params if p.name != "help" and not p.help]
        assert not bare, (name, bare)
    code, stdout, _ = run(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"attnflow_zoo {__version__}"


# --- a full disk while checkpointing, and what a killed run leaves (issue 23, items 7, 9) -------
def _disk_full_line(err: str) -> str:
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def test_a_full_disk_at_the_safetensors_write_is_one_line_saying_what_was_kept(
        mnist_folder, tmp_path, capsys, monkeypatch):
    """The disk fills up inside safetensors' own writer (its Rust code raises SafetensorError
    with the OS error in its text) while the second checkpoint is written: fault injection at
    that call, with the error text the real writer gives on a full tmpfs."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.serialize_file

    def full_disk(tensors, filename, metadata=None):
        if f".{'step-0000002'}-" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    out = tmp_path / "run"
    code, _, err = run(_args(mnist_folder, out, "--steps", 3, "--checkpoint-every", 1,
                             "--validation", 0), capsys)
    line = _disk_full_line(err)
    assert code == 1
    assert line == ("error: could not write the checkpoint of step 2 (No space left on device; "
                    "nothing was left half-written): step-0000001 is kept, the newest intact "
                    "checkpoint; free some space and resume from it"), line
    assert (out / "latest").read_text().strip() == "step-0000001"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: room for one checkpoint of the tiny model, not two."""
    yield from _tmpfs(tmp_path, "1600k")


def test_a_really_full_disk_while_checkpointing_is_one_line(small_disk, mnist_folder, capsys):
    out = small_disk / "run"
    code, _, err = run(_args(mnist_folder, out, "--steps", 4, "--checkpoint-every", 1,
                             "--keep-last", 4, "--validation", 0, "--eval-every", 100,
                             preset="marflow_tiny"), capsys)
    line = _disk_full_line(err)
    assert code == 1 and "No space left on device" in line, line
    kept = (out / "latest").read_text().strip()
    assert f"{kept} is kept, the newest intact checkpoint" in line
    assert not list(small_disk.rglob("*.tmp"))


def test_what_a_killed_write_left_is_removed_by_the_next_run_which_says_so(
        mnist_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(_args(mnist_folder, out, "--steps", 2), capsys)[0] == 0
    # A real kill inside the real atomic write of a checkpoint folder and of `latest`.
    killed = ("import os, signal, sys; from attnflow_zoo._io import atomic_directory, "
              "atomic_path; out = sys.argv[1]\n"
              "with atomic_path(os.path.join(out, 'latest')) as tmp:\n"
              "    tmp.write_text('step-0000009')\n"
              "    with atomic_directory(os.path.join(out, 'step-0000009')) as d:\n"
              "        (d / 'model.safetensors').write_bytes(os.urandom(300_000))\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", killed, str(out)], capture_output=True)
    assert proc.returncode == -9
    litter = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert len(litter) == 2 and litter[0].startswith(".latest.") and \
        litter[1].startswith(".step-0000009-"), litter
    code, _, err = run(_args(mnist_folder, out, "--steps", 3, "--resume", "--override",
                             "steps"), capsys)
    assert code == 0, err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    note = next(x for x in err.splitlines() if "unfinished write" in x)
    assert f"removed 2 unfinished write(s) left in {out} by a run that was killed (0.3 MB:" \
        in note and litter[0] in note and litter[1] in note
    assert (out / "latest").read_text().strip() == "step-0000003"
