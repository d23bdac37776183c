"""`attnflow reproduce` end to end on the MNIST digits: recipe → training → bits/dim + FID
(random Inception weights, flagged) → card → a Hub-compatible server → offline sampling from a
fresh cache; resuming an interrupted run; the recipe path under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from _hub_server import HubServer  # noqa: E402

from attnflow_zoo import checkpoint  # noqa: E402

PRESET = "attnflow_imap_tiny"
CLI = "from attnflow_cli.main import main; main()"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ATTNFLOW_"))}
    env.update({"HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1",
                "ATTNFLOW_CACHE": str(home / "attnflow"), **extra})
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def _header(card_text: str) -> dict:
    return yaml.safe_load(card_text.split("---")[1])


@pytest.mark.slow
def test_reproduce_train_evaluate_card_push_sample(mnist_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["reproduce", PRESET, "--dataset", mnist_folder, "--out", run, "--set", "steps=20",
            "--set", "model.in_channels=1", "--fid-samples", 6, "--fid-reference-limit", 6,
            "--random-inception", "--device", "cpu", "--repo", "user/tiny-digits"]
    home = tmp_path / "home"
    with HubServer() as hub:
        env = _env(home, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test")
        res = _cli(args, env)
        assert res.returncode == 0, res.stderr
        # Every stage's output is kept in the run folder.
        ckpt = run / "step-0000020"
        assert (run / "latest").read_text().strip() == ckpt.name
        metrics = json.loads((run / "metrics.json").read_text())
        stats = Path(metrics["fid_reference_statistics"])
        assert stats.is_file() and stats.parent == (run / "fid").resolve()
        assert metrics["dataset"] == str(mnist_folder.resolve()) and metrics["split"] == "test"
        assert metrics["step"] == 20 and metrics["bpd_num_images"] == 1000
        assert 0 < metrics["bpd"] < 8.5 and metrics["bpd_estimator"] == "single-sample"
        # The FID of random Inception weights is measured, flagged, and kept off the card.
        assert metrics["fid_num_samples"] == 6 and metrics["fid_reference_num_images"] == 6
        assert "NOT a real FID" in metrics["fid_weights"]
        card_text = (run / "README.md").read_text()
        assert "random Inception weights" in card_text and "not shown" in card_text

        # The pushed repo holds exactly the checkpoint and the card kept in the run folder.
        repo = hub.state.repos["user/tiny-digits"]
        assert set(repo.files) == {"config.json", "model.safetensors", "README.md"}
        assert len(repo.commits) == 1
        assert repo.files["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()
        assert repo.files["README.md"].decode() == card_text
        header = _header(card_text)
        results = header["model-index"][0]["results"]
        assert [r["metrics"][0]["type"] for r in results] == ["bits_per_dim"]  # no FID
        assert results[0]["metrics"][0]["value"] == metrics["bpd"]
        assert results[0]["dataset"] == {"name": str(mnist_folder.resolve()),
                                         "type": "imagefolder", "split": "test"}
        assert "datasets" not in header  # a local folder is no Hub dataset
        assert header["pipeline_tag"] == "unconditional-image-generation"
        assert {"arxiv:2106.03959", "arxiv:2004.03891"} <= set(header["tags"])
        # The card tells what really happened: the folder, its sizes, the steps and batch.
        text = ModelCard(card_text).text
        assert f"local folder `{mnist_folder.resolve()}`" in text
        record = checkpoint.read_run_record(ckpt)
        num_train = record["dataset"]["num_train"]  # 98% of 4,000: validation carved from train
        assert num_train == 4000 - record["dataset"]["num_validation"] and num_train < 4000
        assert f"train split: {num_train:,} images" in text and "test split: 1,000 images" in text
        assert "ylecun/mnist" not in text and "60,000" not in text
        assert "20 steps of a global batch of 16" in text
        assert "departs from it: steps 20 (recipe: 100 steps)" in text

        # A rerun skips every finished stage (the push included).
        again = _cli(args, env)
        assert again.returncode == 0, again.stderr
        for stage in ("train", "evaluate", "card", "push"):
            assert f"{stage}: done" in again.stdout, again.stdout
        assert len(repo.commits) == 1

        fresh = tmp_path / "fresh_home"
        down = subprocess.run(
            [sys.executable, "-c", "from huggingface_hub import snapshot_download; "
             "print(snapshot_download('user/tiny-digits'))"],
            env=_env(fresh, HF_ENDPOINT=hub.url), capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr

    # The server is gone: the fresh cache alone serves the model, offline.
    grid = tmp_path / "grid.png"
    res = _cli(["sample", "--repo", "user/tiny-digits", "-n", 4, "--seed", 1, "--device", "cpu",
                "-o", grid], _env(fresh, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape[:2] == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)


def test_reproduce_resumes_an_interrupted_training(mnist_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed after its step-3 checkpoint is continued by the same call, and ends with
    exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from attnflow_zoo.workflows.reproduce import STATE_NAME, reproduce

    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    kwargs = dict(dataset=mnist_folder, overrides={"steps": 6, "checkpoint_every": 3},
                  model_overrides={"in_channels": 1}, limit=256, eval_limit=32,
                  device="cpu", until="train", show_progress=False)
    run = tmp_path / "run"
    first = reproduce(PRESET, out_dir=run, **kwargs)
    assert first.ran == ["train"] and first.checkpoint == run / "step-0000006"
    uninterrupted = load_file(run / "step-0000006" / "model.safetensors")

    # The state a kill after step 3 leaves: step-3 is the newest checkpoint, training undone.
    import shutil

    shutil.rmtree(run / "step-0000006")
    (run / "latest").write_text("step-0000003\n")
    (run / "run.json").unlink()
    state = json.loads((run / STATE_NAME).read_text())
    state["stages"]["train"]["done"] = False
    (run / STATE_NAME).write_text(json.dumps(state))
    lines: list[str] = []
    second = reproduce(PRESET, out_dir=run, log=lines.append, **kwargs)
    assert second.ran == ["train"] and any("resuming from step 3" in x for x in lines), lines
    # (The files' bytes may differ: safetensors writes its metadata in hash-map order.)
    resumed = load_file(run / "step-0000006" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    # Other training settings in the same folder are refused, naming the difference.
    from attnflow_zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="train_config.steps 6 there, 30 now"):
        reproduce(PRESET, out_dir=run, **{**kwargs, "overrides": {"steps": 30,
                                                                  "checkpoint_every": 3}})


_WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from attnflow_zoo import recipes
    from attnflow_zoo.training import train_preset
    from attnflow_zoo.training.distributed import DistContext
    out = sys.argv[2]
    plan = recipes.plan({preset!r}, model_overrides={{"in_channels": 1}}, steps=3, log_every=1,
                        checkpoint_every=100)
    config = plan.config
    train_preset(plan, sys.argv[1], out_dir=out, limit=256, eval_limit=32, device="cpu",
                 show_progress=False)
    if DistContext.from_env().world_size == 1 or torch.distributed.get_rank() == 0:
        open(out + "/config.json.txt", "w").write(json.dumps(config.to_dict()))
""")


@pytest.mark.slow
def test_recipe_under_torchrun_keeps_the_global_batch(mnist_folder: Path, tmp_path: Path) -> None:
    """The recipe's TrainConfig under torchrun (2 gloo processes) is the one-process one (global
    batch 16, the same warm-up steps), and trains the same model: step 1 (scored before any
    update) matches closely, later steps loosely (Adamax's first updates are lr·sign(g))."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(preset=PRESET))
    env = _env(tmp_path / "home")
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2"] if world == 2 else [sys.executable])
        proc = subprocess.run([*launch, str(script), str(mnist_folder), str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[world] = (json.loads((out / "config.json.txt").read_text()),
                       [r for r in records if "train_bpd" in r])
    (config1, log1), (config2, log2) = runs[1], runs[2]
    assert config1 == config2 and config1["batch_size"] == 16 and config1["warmup_steps"] == 10
    assert [r["step"] for r in log2] == [1, 2, 3]  # written once, by rank 0
    assert log2[0]["train_bpd"] == pytest.approx(log1[0]["train_bpd"], rel=1e-5)
    assert log2[0]["grad_norm"] == pytest.approx(log1[0]["grad_norm"], rel=1e-5)
    for got, want in zip(log2[1:], log1[1:], strict=True):
        assert got["train_bpd"] == pytest.approx(want["train_bpd"], rel=1e-3)
