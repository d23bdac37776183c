"""`attnflow train` as a real process: off a terminal it logs periodic lines; SIGINT / SIGTERM
leave a checkpoint at the interrupted step, say how to resume and exit 130 / 143; a second
run on the same folder is refused while the first finishes intact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from test_cli_train import run

PERIODIC = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train (\d+)/(\d+) \(\d+%\)  "
                      r"bpd=\d+\.\d{4}  lr=\S+  img/s=\d+(  ETA \d+:\d\d:\d\d)?$")


@pytest.fixture
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _train(folder, out, steps, *extra) -> list[str]:
    return ["train", "--model", "marflow_tiny", "--in-channels", "1", "--dataset", str(folder),
            "--out", str(out), "--device", "cpu", "--batch-size", "16", "--limit", "256",
            "--eval-limit", "32", "--warmup-steps", "2", "--log-every", "1", "--steps",
            str(steps), *map(str, extra)]


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "attnflow_cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_until(proc: subprocess.Popen, pattern: str) -> list[str]:
    lines = []
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
    raise AssertionError("the run ended before " + pattern + ":\n" + "\n".join(lines))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_says_how_to_resume(sig, mnist_folder, tmp_path, env):
    out = tmp_path / "run"
    proc = _start(_train(mnist_folder, out, 2000, "--checkpoint-every", 1000), env)
    lines = _read_until(proc, r" train 3/2000 ")
    proc.send_signal(sig)
    stdout, rest = proc.communicate(timeout=120)
    lines += rest.splitlines()
    assert proc.returncode == 128 + sig, "\n".join(lines)
    # Off a terminal: a timestamped line per log step, with bpd, lr, img/s and the ETA.
    periodic = [PERIODIC.match(x) for x in lines if PERIODIC.match(x)]
    assert [int(m[1]) for m in periodic][:3] == [1, 2, 3] and all(m[3] for m in periodic)
    # The step in flight was finished and checkpointed, and the user is told where and how.
    record = json.loads((out / "run.json").read_text())
    step = record["step"]
    assert 3 <= step < 2000 and record["status"] == "interrupted"
    assert (out / "latest").read_text().strip() == f"step-{step:07d}"
    assert (out / f"step-{step:07d}" / "training_state" / "state.json").is_file()
    text = "\n".join(lines)
    assert f"stopped by {sig.name} at step {step}; checkpoint written to " \
           f"{out / f'step-{step:07d}'}" in text
    resume = [x for x in lines if x.startswith("resume with: attnflow train ")]
    assert len(resume) == 1 and resume[0].endswith(" --resume")
    assert "Traceback" not in text + stdout and not (out / ".lock").exists()
    if sig != signal.SIGINT:
        return
    # Resuming continues at that step: the progress count goes on from it, nothing twice.
    proc = subprocess.run([sys.executable, "-m", "attnflow_cli",
                           *_train(mnist_folder, out, step + 3, "--checkpoint-every", 1000,
                                   "--resume")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from step {step}" in proc.stderr
    counts = [int(m[1]) for m in map(PERIODIC.match, proc.stderr.splitlines()) if m]
    assert counts == [step + 1, step + 2, step + 3]
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if "train_bpd" in x]
    assert logged == list(range(1, step + 4))


def test_a_second_run_on_the_folder_is_refused_and_the_first_finishes_intact(
        mnist_folder, tmp_path, env, capsys, monkeypatch):
    import attnflow_zoo.factory  # noqa: F401 - imported before the race, so the refusal is quick
    import attnflow_zoo.training  # noqa: F401

    for key in ("HF_DATASETS_CACHE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    out = tmp_path / "run"
    first = _start(_train(mnist_folder, out, 40, "--checkpoint-every", 20), env)
    _read_until(first, r" train 1/40 ")
    # The same command again (here, a second process of its own), fresh and as a resume.
    for extra in ([], ["--resume"]):
        code, stdout, err = run(_train(mnist_folder, out, 40, "--checkpoint-every", 20, *extra),
                                capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 1 and len(lines) == 1, err
        assert f"{out} is in use by another training run (process {first.pid} on " in lines[0]
    stdout, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert (out / "latest").read_text().strip() == "step-0000040"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000020", "step-0000040"]
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if "train_bpd" in x]
    assert logged == list(range(1, 41))  # one run's lines, in order, none interleaved
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not (out / ".lock").exists()
