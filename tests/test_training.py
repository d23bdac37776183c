"""fit(): learning on real digits, exact resume, checkpoints, the non-finite guard, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _toy_flow import ToyFlow, ToyFlowConfig

from attnflow_zoo.data.datasets import load_images
from attnflow_zoo.errors import CheckpointError, ConfigError, TrainingError
from attnflow_zoo.hub import resolve_checkpoint
from attnflow_zoo.metrics import evaluate_bpd
from attnflow_zoo.training import TrainConfig, fit
from attnflow_zoo.training.config import check_resume


def _glow(hidden_channels: int = 16) -> ToyFlow:
    """A real (small) Glow: squeeze, then K × (ActNorm, InvConv1x1, AffineCoupling), N(0, I)."""
    return ToyFlow(ToyFlowConfig(hidden_channels=hidden_channels))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small convs with 2 OpenMP threads on a loaded 2-core machine spin-wait (~40 ms per conv
    # vs 0.2 ms with one thread).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(mnist_folder, tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    cache = tmp_path_factory.mktemp("cache")
    train = load_images(mnist_folder, "train", image_size=8, limit=1024, cache_dir=cache)
    test = load_images(mnist_folder, "test", image_size=8, limit=256, cache_dir=cache)
    return train, test


def _config(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=32, lr=2e-3, warmup_steps=4, log_every=2,
                checkpoint_every=4, eval_batch_size=128, flip=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_heldout_bpd(digits, tmp_path):
    train, test = digits
    from _toy_flow import ToyFlow, ToyFlowConfig
    model = ToyFlow(ToyFlowConfig(hidden_channels=16))
    result = fit(model, train, _config(steps=200, lr=5e-3, log_every=50, checkpoint_every=1000,
                                       eval_every=100, warmup_steps=10),
                 eval_data=test, out_dir=tmp_path, device="cpu")
    vals = [r["val_bpd"] for r in result.history if "val_bpd" in r]
    assert len(vals) == 3  # validation at init, halfway, end
    assert vals[-1] < vals[0] - 0.5, vals
    # The held-out split is scored once, at the end (never used to choose).
    evals = [r["eval_bpd"] for r in result.history if "eval_bpd" in r]
    assert len(evals) == 1 and abs(evals[0] - vals[-1]) < 0.5
    # The metrics file holds the same records, and images/s is logged.
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    assert all(r["images_per_s"] > 0 for r in lines if "train_bpd" in r)
    # The checkpoint is the save_pretrained layout, loadable as is; its eval matches the log.
    ckpt = resolve_checkpoint(tmp_path)
    assert ckpt == result.checkpoint and (ckpt / "config.json").is_file()
    loaded = ToyFlow.from_pretrained(ckpt)
    again = evaluate_bpd(loaded, test, 128, torch.Generator().manual_seed(0))
    assert again == evals[-1]


def test_resume_is_exact(digits, tmp_path):
    train, test = digits
    straight = _glow()
    fit(straight, train, _config(steps=8), out_dir=tmp_path / "a", device="cpu")

    first = _glow()
    fit(first, train, _config(steps=4), out_dir=tmp_path / "b", device="cpu")
    resumed = _glow()
    fit(resumed, train, _config(steps=8), out_dir=tmp_path / "b", resume=True, device="cpu")

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    a_dir, b_dir = resolve_checkpoint(tmp_path / "a"), resolve_checkpoint(tmp_path / "b")
    from safetensors.torch import load_file

    for rel in ("model.safetensors", "training_state/optimizer.safetensors",
                "training_state/model.safetensors"):
        ta, tb = load_file(str(a_dir / rel)), load_file(str(b_dir / rel))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), rel
    # The logged training losses of the resumed half equal the straight run's.
    def losses(d):
        return [(r["step"], r["train_bpd"]) for r in map(json.loads, (d / "metrics.jsonl")
                .read_text().splitlines()) if "train_bpd" in r]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_checkpoints_rotate_and_nothing_half_written(digits, tmp_path):
    train, _ = digits
    fit(_glow(), train, _config(steps=12, checkpoint_every=3,
                                                   keep_checkpoints=2),
        out_dir=tmp_path, device="cpu")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "curves.png", "latest", "metrics.jsonl", "run.json", "samples.png",
                     "step-0000009", "step-0000012", "tensorboard"]
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / ".lock").exists()
    assert (tmp_path / "latest").read_text().strip() == "step-0000012"
    state = json.loads((tmp_path / "step-0000012/training_state/state.json").read_text())
    assert state["step"] == 12 and state["train_config"]["steps"] == 12


def test_resume_from_another_architecture_is_refused(digits, tmp_path):
    train, _ = digits
    fit(_glow(), train, _config(steps=2), out_dir=tmp_path, device="cpu")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="hidden_channels"):
        fit(_glow(hidden_channels=8), train, _config(steps=4),
            out_dir=tmp_path, resume=True, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


class _PoisonedGlow(ToyFlow):
    """A ToyFlow whose loss is +inf from step ``poison_from`` on (counted in training calls)."""

    poison_from = 3

    def log_density(self, x, y=None, generator=None):
        calls = getattr(self, "_calls", 0)
        self._calls = calls + 1
        out = super().log_density(x)
        return out - math.inf if self.training and calls >= self.poison_from else out


def test_nonfinite_steps_are_skipped_then_stop(digits, tmp_path):
    train, _ = digits
    model = _PoisonedGlow(ToyFlowConfig(hidden_channels=16))
    with pytest.raises(TrainingError, match="3 consecutive"):
        fit(model, train, _config(steps=20, max_nonfinite=3, checkpoint_every=1),
            out_dir=tmp_path, device="cpu")
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["consecutive"] for r in records if r.get("event") == "nonfinite"] == [1, 2, 3]
    # Checkpoints exist only for the good steps (the init forward is call 0: steps 1, 2 are good).
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000001", "step-0000002"]
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("reason", ["max_seconds", "steps"])
def test_a_time_budget_ends_the_run_as_its_steps_would(digits, tmp_path, reason):
    """`max_seconds` (what `attnflow quickstart` runs on): whichever of the budget and the steps
    comes first ends the run with the final evaluation, checkpoint and run.json."""
    from attnflow_zoo.checkpoint import read_run_record

    train, test = digits
    # A million steps cannot finish within 0.01 s; six steps cannot take an hour.
    steps, budget = (10**6, 0.01) if reason == "max_seconds" else (6, 3600.0)
    result = fit(_glow(), train, _config(steps=steps, max_seconds=budget), eval_data=test,
                 out_dir=tmp_path, device="cpu")
    assert result.stop_reason == reason and result.eval_bpd is not None
    assert result.step == 6 if reason == "steps" else 1 <= result.step < steps
    record = read_run_record(result.checkpoint)
    assert record["status"] == "finished" and record["stop_reason"] == reason
    assert record["step"] == result.step == int(result.checkpoint.name.split("-")[1])
    assert [m["value"] for m in record["metrics"] if m["split"] == "test"] == [result.eval_bpd]


def test_config_rejects_nonsense():
    from attnflow_zoo.errors import ConfigError

    with pytest.raises(ConfigError):
        TrainConfig()
    with pytest.raises(ConfigError):
        TrainConfig(steps=10, precision="fp8")
    for seconds in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="max_seconds"):
            TrainConfig(steps=10, max_seconds=seconds)
    assert TrainConfig(**TrainConfig(steps=3).to_dict()) == TrainConfig(steps=3)


@pytest.mark.parametrize(("old", "fraction", "images", "count"), [
    (0.02, 0.02, None, 20), (0.5, 0.5, None, 500), (0, 0.0, None, 0), (20, 0.02, 20, 20),
    (1, 0.02, 1, 1), (20.0, 0.02, 20, 20)])
def test_validation_is_a_fraction_or_a_count_and_older_runs_keep_their_split(old, fraction,
                                                                            images, count):
    """An older run's one-number ``validation`` (a fraction below 1, a count from 1 up) reads
    as the split it meant; each field has one unit."""
    config = TrainConfig.from_dict({"steps": 3, "validation": old})
    assert (config.validation_fraction, config.validation_images) == (fraction, images)
    assert config.validation_count(1000) == count
    assert TrainConfig.from_dict(config.to_dict()) == config
    saved = {"steps": 3, "validation": old}
    assert check_resume(saved, config.to_dict()) == []
    other = {"validation_images": count + 1} if images else {"validation_fraction": 0.25}
    with pytest.raises(ConfigError, match="carved out"):
        check_resume(saved, config.replace(**other).to_dict())


@pytest.mark.parametrize(("settings", "match"), [
    ({"validation_fraction": 1.0}, "validation_fraction must be a fraction in \\[0, 1\\)"),
    ({"validation_fraction": 20}, "give a number of images as validation_images"),
    ({"validation_fraction": -0.1}, "validation_fraction"),
    ({"validation_fraction": float("nan")}, "validation_fraction"),
    ({"validation_images": -1}, "validation_images must be a whole number ≥ 0"),
    ({"validation_images": 2.5}, "validation_images must be a whole number ≥ 0"),
    ({"validation": 1.5}, "`validation` must be a fraction in \\[0, 1\\) or a whole number"),
    ({"validation": -1}, "`validation` must be"),
    ({"validation": float("inf")}, "`validation` must be"),
])
def test_validation_rejects_nonsense_in_one_line(settings, match):
    with pytest.raises(ConfigError, match=match) as caught:
        TrainConfig.from_dict({"steps": 3, **settings})
    assert "\n" not in str(caught.value)


_WORKER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from attnflow_zoo.training import TrainConfig, fit
    from safetensors.torch import save_file
    import torch.distributed as dist
    from _toy_flow import ToyFlow, ToyFlowConfig
    train = torch.load({data!r}, weights_only=True)
    model = ToyFlow(ToyFlowConfig(hidden_channels=16))
    fit(model, train, TrainConfig(**{config!r}), out_dir={out!r}, device="cpu")
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
              {out!r} + f"/final-{{dist.get_rank()}}.safetensors",
              metadata={{"world": str(dist.get_world_size())}})
    dist.destroy_process_group()
""")
_DDP_CONFIG = {"steps": 3, "batch_size": 16, "warmup_steps": 1, "log_every": 1,
               "checkpoint_every": 100, "flip": False, "ema_decay": None}


@pytest.mark.slow
def test_torchrun_two_processes_gloo(digits, tmp_path):
    """Two gloo processes with a global batch of 16 train the same model as one process with
    a batch of 16 (DDP sharding, noise and ActNorm init all checked against the reference)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    train, _ = digits
    data_path = tmp_path / "train.pt"
    torch.save(train[:256].clone(), data_path)
    out = tmp_path / "out"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(Path(__file__).parent), data=str(data_path),
                                     out=str(out), config=_DDP_CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [load_file(out / f"final-{r}.safetensors") for r in (0, 1)]
    with safe_open(out / "final-0.safetensors", "pt") as f:
        assert f.metadata()["world"] == "2"
    for name in states[0]:  # DDP keeps the replicas equal
        assert torch.equal(states[0][name], states[1][name]), name
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000003"]
    assert not list(out.glob(".*tmp"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
               if "train_bpd" in x]
    assert [r["step"] for r in records] == [1, 2, 3]  # written once (rank 0)

    # The reference: one process, the same global batch.
    reference = ToyFlow(ToyFlowConfig(hidden_channels=16))
    ref_out = tmp_path / "one"
    fit(reference, train[:256].clone(), TrainConfig(**_DDP_CONFIG), out_dir=ref_out,
        device="cpu")
    ref_records = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()
                   if "train_bpd" in x]
    # Step 1 is scored before any update: the same images, noise and ActNorm init give the same
    # loss, and DDP's averaged gradient the same norm (a sum over ranks would double it).
    assert records[0]["train_bpd"] == pytest.approx(ref_records[0]["train_bpd"], rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(ref_records[0]["grad_norm"], rel=1e-5)
    # Later steps agree loosely: Adamax's first updates are lr·sign(g), so float-level
    # differences in near-zero gradient entries move some weights by ±2·lr.
    for got, want in zip(records[1:], ref_records[1:], strict=True):
        assert got["train_bpd"] == pytest.approx(want["train_bpd"], rel=1e-3)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_evaluate_bpd_refuses_a_bad_batch_size(digits, batch_size):
    """A library user's bad batch size is a ConfigError saying what to pass, not a range() error."""
    _, test = digits
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        evaluate_bpd(ToyFlow(ToyFlowConfig(hidden_channels=8)), test[:4], batch_size)
