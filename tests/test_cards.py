"""Cards that tell the truth, one metrics schema from `evaluate --json` to `push --metrics`, the
card written locally, and `push` failing in one line when the Hub cannot be reached."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _cli import run_cli as _cli

from attnflow_zoo.checkpoint import write_run_record
from attnflow_zoo.errors import ConfigError
from attnflow_zoo.evaluation.results import check_metrics, publishable
from attnflow_zoo.factory import create_model
from attnflow_zoo.publishing.modelcard import render_card

METRICS = {"format": 1, "dataset": "cifar10", "split": "test", "step": 100, "bpd": 3.5,
           "bpd_estimator": "single-sample", "bpd_num_images": 10000, "fid": 45.0,
           "fid_num_samples": 50000, "fid_temperature": 1.0, "fid_reference": "cifar10 train",
           "fid_reference_split": "train", "fid_reference_num_images": 50000,
           "fid_weights": "torch-fidelity-inception-2015-12-05-6726825d"}
RUN = {"preset": "attnflow_imap_cifar10_mixlog", "recipe": "marscf-mixlogcdf-cifar10",
       "dataset": {"name": "cifar10", "path": None, "train_split": "train", "num_train": 50000,
                   "heldout_split": "test", "num_heldout": 10000, "image_shape": [3, 32, 32]},
       "world_size": 8, "device": "NVIDIA H200", "wall_seconds": 3725.0, "step": 312500,
       "samples_seen": 20_000_000, "torch": "2.5.1", "attnflow_zoo": "0.1.0"}


def _card(**kw) -> tuple[dict, str]:
    base = dict(architecture="AttnFlow", config={"attention": "imap"},
                preset="attnflow_imap_cifar10_mixlog", repo_id="user/x")
    card = render_card(**{**base, **kw})
    return yaml.safe_load(str(card).split("---")[1]), card.text


def _results(header: dict) -> dict[str, dict]:
    return {r["metrics"][0]["type"]: r for r in header.get("model-index", [{}])[0].get(
        "results", [])}


# --- the metrics schema ---------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"bits_per_dim": 3.3}, "unknown metrics key"),
    ({"bpd": "3.3"}, "bpd must be int or float"),
    ({"bpd_estimator": None}, "bpd_estimator must be str"),
    ({"bpd_estimator": "ELBO"}, "bpd_estimator must be one of"),
    ({"fid": float("nan")}, "fid must be a finite number"),
    ({"format": 2}, "format 2"),
])
def test_schema_refuses_what_it_cannot_state(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_metrics({**METRICS, **change})
    with pytest.raises(ConfigError, match="without fid_weights"):
        check_metrics({k: v for k, v in METRICS.items() if k != "fid_weights"})


def test_a_pipeline_fid_is_never_a_card_fid() -> None:
    fake = {**METRICS, "fid_weights": "random-init-1234abcd (NOT a real FID)"}
    with pytest.raises(ConfigError, match="random Inception weights"):
        render_card(architecture="AttnFlow", config={}, preset=None, repo_id="u/x",
                    metrics=fake)
    shown, notes = publishable(fake)
    assert "fid" not in shown and shown["bpd"] == 3.5 and "random Inception" in notes[0]
    header, text = _card(metrics=shown, left_out=notes, run=RUN)
    assert set(_results(header)) == {"bits_per_dim"} and "Not shown: a FID of 45" in text


# --- truthful cards ---------------------------------------------------------------------------
def test_card_of_a_recorded_cifar10_run() -> None:
    header, text = _card(metrics=METRICS, run=RUN, recipe={
        "name": "marscf-mixlogcdf-cifar10", "lines": ["Adamax, lr 0.0008."], "deviations": []})
    assert header["datasets"] == ["uoft-cs/cifar10"]
    results = _results(header)
    assert results["bits_per_dim"]["metrics"][0]["value"] == 3.5
    assert results["bits_per_dim"]["dataset"]["split"] == "test"
    assert results["fid"]["metrics"][0]["value"] == 45.0
    assert results["fid"]["dataset"]["split"] == "train"
    assert {"arxiv:2106.03959", "arxiv:2004.03891", "arxiv:1902.00275"} <= set(header["tags"])
    assert "train split: 50,000 images used" in text and "312,500 steps" in text
    assert "8 × NVIDIA H200, wall time 1:02:05" in text and "this run follows it" in text
    assert "| **this checkpoint** | 3.500 | 45.0 |" in text  # beside the papers' numbers
    assert "| AttnFlow-iMap | 3.247 | 40.2 |" in text


def test_card_of_a_local_folder_run_claims_no_hub_dataset() -> None:
    run = {**RUN, "dataset": {"name": None, "path": "/data/digits", "num_train": 4000,
                              "limit": 4500, "heldout_split": "test", "num_heldout": 500,
                              "num_validation": 500, "validation_split": "carved from train",
                              "image_shape": [1, 32, 32]}, "step": 40,
           "train_config": {"batch_size": 16, "lr": 8e-4}}
    metrics = {"dataset": "/data/digits", "split": "test", "bpd": 1.9,
               "bpd_estimator": "single-sample"}
    header, text = _card(metrics=metrics, run=run, recipe={
        "name": "r", "lines": [], "deviations": ["batch_size 16 (recipe: 64)"]})
    assert "datasets" not in header
    assert _results(header)["bits_per_dim"]["dataset"] == {
        "name": "/data/digits", "type": "imagefolder", "split": "test"}
    assert "local folder `/data/digits`" in text and "4,000 images used (the first 4,500)" in text
    assert "validation: 500 images carved from the train split; held-out test split: 500" in text
    assert "CIFAR-10" not in text.split("## Architecture")[0]
    assert "departs from it: batch_size 16 (recipe: 64)" in text
    assert "The papers' numbers" not in text  # CIFAR-10 references never beside other data


def test_card_without_a_run_record_says_so() -> None:
    header, text = _card()
    assert "datasets" not in header and "model-index" not in header
    assert "was not recorded" in text and "No metrics were measured" in text


# --- evaluate --json -> push --metrics, the card written locally, push offline -----------------
@pytest.fixture
def digits_checkpoint(tmp_path: Path, gen: torch.Generator) -> Path:
    """A tiny grey AttnFlow (ActNorm initialised on noise) saved with a run record of a run on
    a local folder, as training writes it."""
    from attnflow_zoo.core import initialize_from_data

    model = create_model("attnflow_imap_tiny", in_channels=1)
    x = torch.rand(16, 1, 8, 8, generator=gen) - 0.5
    initialize_from_data(model, lambda: model.log_density(x))
    ckpt = tmp_path / "run" / "step-0000040"
    model.eval().save_pretrained(ckpt)
    write_run_record(ckpt.parent, {"preset": "attnflow_imap_tiny", "recipe": "tiny-test",
                                   "dataset": {"name": None, "path": "/data/digits",
                                               "num_train": 4000},
                                   "step": 40, "world_size": 1, "total_steps": 100,
                                   "status": "interrupted",
                                   "train_config": {"steps": 40, "batch_size": 16}})
    return ckpt


def test_evaluate_json_feeds_push_metrics_as_is(digits_checkpoint: Path, mnist_folder: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["evaluate", "--checkpoint", digits_checkpoint.parent, "--dataset",
                           mnist_folder, "--limit", 64, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["step"] == 40 and metrics["bpd_num_images"] == 64
    assert metrics["dataset"] == str(mnist_folder.resolve())
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(out.strip().splitlines()[-1])
    card_path = tmp_path / "card" / "README.md"
    card_path.parent.mkdir()
    code, out, err = _cli(["push", "--checkpoint", digits_checkpoint.parent, "--repo", "user/d",
                           "--metrics", metrics_file, "--dry-run", "-o", card_path], capsys)
    assert code == 0, err
    assert "nothing was uploaded" in out
    header = yaml.safe_load(card_path.read_text().split("---")[1])
    bpd = _results(header)["bits_per_dim"]
    assert bpd["metrics"][0]["value"] == metrics["bpd"]
    assert bpd["dataset"]["name"] == str(mnist_folder.resolve())
    assert "/data/digits" in card_path.read_text()  # trained on: the run record's folder
    assert "40 steps of the 100 planned" in card_path.read_text()
    assert "the run's status: interrupted" in card_path.read_text()

    # `attnflow card` writes the same card (default: README.md in the checkpoint).
    code, out, err = _cli(["card", "--checkpoint", digits_checkpoint.parent, "--repo", "user/d",
                           "--metrics", metrics_file], capsys)
    assert code == 0, err
    assert (digits_checkpoint / "README.md").read_text() == card_path.read_text()


def test_push_offline_is_one_line(digits_checkpoint: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    code, _, err = _cli(["push", "--checkpoint", digits_checkpoint, "--repo", "user/d"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "the Hub is offline" in err and "--dry-run" in err


def test_push_to_an_unreachable_hub_is_one_line(digits_checkpoint: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1"}
    res = subprocess.run([sys.executable, "-c", "from attnflow_cli.main import main; main()",
                          "push", "--checkpoint", str(digits_checkpoint), "--repo", "user/d"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "cannot reach the Hugging Face Hub" in res.stderr and "refused" in res.stderr
    assert "nothing was uploaded" in res.stderr


def test_models_lists_recipes_and_weights(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["models", "attnflow_imap_cifar10_mixlog", "--no-params"], capsys)
    assert code == 0, err
    assert "adamax" in out and "b64" in out and "none" in out


# --- cards that cannot lie (issue 23, item 6) -----------------------------------------------
_BPD = {"dataset": "digits", "split": "test", "bpd": 3.0, "bpd_estimator": "single-sample",
        "bpd_num_images": 100}


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "attnflow_foo"], "unknown model 'attnflow_foo'"),
    (["--preset", "marflow_cifar10"], "built from zoo entry 'attnflow_imap_tiny'; a card for "
                                      "'marflow_cifar10' would describe another model"),
    (["--repo", "not a repo!!"], "'not a repo!!' is not a valid Hub repo id"),
    (["--metrics", json.dumps({**_BPD, "bpd": -5})], "metrics bpd = -5 is impossible"),
    (["--metrics", json.dumps({**_BPD, "fid": -1.0, "fid_num_samples": 100,
                               "fid_weights": "w"})], "metrics fid = -1.0 is impossible"),
    (["--metrics", json.dumps({**_BPD, "bpd_num_images": 0})], "bpd_num_images = 0 is imposs"),
    (["--metrics", json.dumps({**_BPD, "step": 7})], "the metrics score step 7, but this "
                                                     "checkpoint is step 40"),
])
def test_a_card_that_would_lie_is_one_line_and_nothing_is_written(
        digits_checkpoint: Path, tmp_path: Path, args: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "card.md"
    repo = [] if "--repo" in args else ["--repo", "user/d"]
    stub = (digits_checkpoint / "README.md").read_text()  # save_pretrained's
    for command in (["card", "-o", out], ["push", "--dry-run", "-o", out], ["card"]):
        code, _, err = _cli([*command, "--checkpoint", digits_checkpoint, *repo, *args], capsys)
        assert code == 1 and err.count("\n") == 1 and message in err, (command, err)
        assert not out.exists() and (digits_checkpoint / "README.md").read_text() == stub


def test_a_stated_preset_must_be_the_checkpoints_config(tmp_path: Path, gen: torch.Generator
                                                        ) -> None:
    """A checkpoint that records no preset takes a stated one only if it is that model."""
    from attnflow_zoo.models.attnflow import AttnFlow
    from attnflow_zoo.publishing.publish import build_card

    tiny = create_model("attnflow_imap_tiny")
    AttnFlow(tiny.config).save_pretrained(tmp_path / "ckpt")  # no zoo_preset: none recorded
    card = build_card(tmp_path / "ckpt", preset="attnflow_imap_tiny")
    assert "attnflow_imap_tiny" in card.text
    with pytest.raises(ConfigError, match="the checkpoint is not zoo entry 'marflow_tiny': "
                                          "attention='imap' \\(the entry: 'none'\\)"):
        build_card(tmp_path / "ckpt", preset="marflow_tiny")


def test_without_metrics_the_card_shows_the_runs_own_metrics_json(
        digits_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = digits_checkpoint.parent
    (run / "metrics.json").write_text(json.dumps({**_BPD, "step": 40, "bpd": 2.75}))
    for command in (["card"], ["push", "--repo", "user/d", "--dry-run"]):
        code, _, err = _cli([*command, "--checkpoint", run], capsys)
        assert code == 0, err
        header = yaml.safe_load((digits_checkpoint / "README.md").read_text().split("---")[1])
        assert _results(header)["bits_per_dim"]["metrics"][0]["value"] == 2.75
    # Metrics of another step of the run describe other weights: left off, and said so.
    (run / "metrics.json").write_text(json.dumps({**_BPD, "step": 30, "bpd": 2.75}))
    code, _, err = _cli(["card", "--checkpoint", run], capsys)
    assert code == 0, err
    text = (digits_checkpoint / "README.md").read_text()
    assert "model-index" not in text.split("---")[1]
    assert "scores step 30, not this checkpoint's step 40" in text


def test_training_checkpoints_carry_no_card_that_denies_their_run_json(tmp_path: Path) -> None:
    from attnflow_zoo.training import train_preset
    from attnflow_zoo.training.recipes import plan

    out = tmp_path / "run"
    resolved = plan("attnflow_imap_tiny", model_overrides={"in_channels": 1}, steps=2,
                    batch_size=8, validation_fraction=0, eval_every=None)
    train_preset(resolved, "digits", out_dir=out, limit=16, eval_limit=8, show_progress=False)
    for folder in (out / "step-0000002", out / "best"):
        if (folder / "README.md").exists():
            text = (folder / "README.md").read_text()
            assert (folder / "run.json").exists() and "no `run.json`" not in text, folder
    code, _, err = _cli(["card", "--checkpoint", out])
    assert code == 0, err
    text = (out / "step-0000002" / "README.md").read_text()
    assert "was not recorded" not in text and "2 steps of the 2 planned" not in text
    assert "Length: 2 steps of a global batch of 8" in text
