"""The training loop reads nothing back to the host inside a step (issue 14), and the one
precision option (``TrainConfig.precision``, older runs' ``amp``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import attnflow_zoo as az
from attnflow_zoo.errors import ConfigError
from attnflow_zoo.training import TrainConfig, fit
from attnflow_zoo.training.config import check_resume
from attnflow_zoo.training.step import TrainStep

#: A micro MaR-Flow (mAR conv-LSTM priors, ActNorm, couplings): the real step, small.
MICRO = dict(image_size=4, in_channels=1, num_levels=2, num_steps=1, hidden_channels=4,
             prior_hidden_channels=4, prior_num_layers=2, prior_cond_hidden_channels=4,
             prior_embed_channels=2)
#: Methods that read a tensor's value back to the host.
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def _config(**kw: object) -> TrainConfig:
    base = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=3, validation_fraction=0,
                max_shift=1, flip=False, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


@contextmanager
def _count_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """Records every host read of a tensor, split into inside / outside ``TrainStep.__call__``.
    Adamax's own step counters are CPU tensors by design on CPU (reading one waits for no
    device; on CUDA the loop makes them device tensors with ``capturable=True``): not counted.
    """
    seen: dict[str, list[str]] = {"inside": [], "outside": []}
    where = ["outside"]
    step_call = TrainStep.__call__

    def in_step(self: TrainStep, *args: object, **kwargs: object) -> torch.Tensor:
        where.append("inside")
        try:
            return step_call(self, *args, **kwargs)
        finally:
            where.pop()

    def counters(self: TrainStep) -> set[int]:
        return {id(s["step"]) for s in self.optimizer.state.values() if "step" in s}

    steps: list[TrainStep] = []
    original_init = TrainStep.__init__

    def init(self: TrainStep, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        steps.append(self)

    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: object, _name: str = name, _original: object = original,
                **kwargs: object) -> object:
            if not any(id(self) in counters(s) for s in steps):
                seen[where[-1]].append(_name)
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(TrainStep, "__call__", in_step)
    monkeypatch.setattr(TrainStep, "__init__", init)
    try:
        yield seen
    finally:
        monkeypatch.undo()


def _model() -> az.FlowModel:
    torch.manual_seed(0)
    return az.create_model("marflow_tiny", **MICRO)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch,
                                          precision: str) -> None:
    """No ``item`` / ``tolist`` / ``bool`` / ``float`` / ``int`` of a tensor inside a step, and
    the loop's reads outside the steps do not grow with the number of steps (they happen at
    logging and checkpoint steps only)."""
    counts = []
    for steps in (2, 5):
        with _count_reads(monkeypatch) as seen:
            result = fit(_model(), _images(), _config(steps=steps, log_every=steps,
                                                      precision=precision), device="cpu")
        assert seen["inside"] == [], f"host reads inside a step: {seen['inside']}"
        counts.append(sorted(seen["outside"]))
        assert result.step == steps and result.train_bpd is not None
        assert torch.isfinite(torch.tensor(result.train_bpd))
    assert counts[0] == counts[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_has_no_host_sync_on_cuda(monkeypatch: pytest.MonkeyPatch,
                                                precision: str) -> None:
    """On CUDA every step after the first (which creates Adamax's state) runs under
    ``torch.cuda.set_sync_debug_mode("warn")`` without a single synchronisation warning."""
    step_call = TrainStep.__call__
    calls = [0]

    def watched(self: TrainStep, *args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return step_call(self, *args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return step_call(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(TrainStep, "__call__", watched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(_model(), _images(), _config(steps=4, log_every=4, precision=precision),
            device="cuda")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert calls[0] == 4 and syncs == []


def test_bf16_trains_on_cpu_like_fp32() -> None:
    """``precision="bf16"`` runs on the CPU (no longer CUDA-only) and trains the same model to
    bf16 tolerance: same steps, a finite loss within 0.05 bits/dim of fp32's."""
    results = {p: fit(_model(), _images(), _config(steps=3, precision=p), device="cpu")
               for p in ("fp32", "bf16")}
    assert results["bf16"].step == results["fp32"].step == 3
    assert abs(results["bf16"].train_bpd - results["fp32"].train_bpd) < 0.05


def test_precision_option_and_older_runs() -> None:
    """One option: ``precision``; an older run's ``amp`` reads as it, resumes unchanged, and
    ``compile`` may change on resume (the same model to float tolerance)."""
    assert TrainConfig.from_dict({"steps": 3, "amp": "none"}) == TrainConfig(steps=3)
    assert TrainConfig.from_dict({"steps": 3, "amp": "bf16"}).precision == "bf16"
    assert TrainConfig(**TrainConfig(steps=3).to_dict()) == TrainConfig(steps=3)
    old = {k: v for k, v in TrainConfig(steps=3).to_dict().items()
           if k not in ("precision", "compile")} | {"amp": "none"}
    assert check_resume(old, TrainConfig(steps=3).to_dict()) == []
    assert check_resume(old, TrainConfig(steps=3, compile=True).to_dict()) == []
    with pytest.raises(ConfigError, match="precision"):
        check_resume(old, TrainConfig(steps=3, precision="bf16").to_dict())
    assert check_resume(old, TrainConfig(steps=3, precision="bf16").to_dict(),
                        ["precision"]) == ["precision"]
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(steps=3, precision="fp8")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        fit(_model(), _images(), _config(precision="fp16"), device="cpu")
