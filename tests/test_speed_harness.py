"""The sync-free training step of benchmarks/harness.py (the recipe for the training loop):
no value is read back to the host, and a non-finite step changes no weight."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnflow_zoo as az

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from harness import TrainStep  # noqa: E402


def _setup(precision: str = "fp32") -> tuple[torch.nn.Module, TrainStep, torch.Tensor]:
    torch.manual_seed(0)
    model = az.create_model("marflow_tiny")
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (4, *model.input_shape), generator=g, dtype=torch.uint8)
    model.initialize_from_data(x_u8, g)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    return model, TrainStep(model, opt, precision), model.to_model_space(x_u8, g)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    """Forward, backward, clipping, the non-finite guard and the optimizer step make no
    ``item`` / ``bool`` / ``tolist`` / ``cpu`` call on a tensor. The one exception is Adamax's
    own step counter, a CPU tensor by design (``capturable=True``, which keeps it on the
    device, is CUDA-only), so reading it never waits for a device."""
    model, step, x = _setup(precision)
    counters = step.optimizer.state  # filled after the first step
    step(x)
    own_counters = {id(s["step"]) for s in counters.values()}
    calls: list[str] = []
    for name in ("item", "__bool__", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: object, _name: str = name,
                _original: object = original, **kwargs: object) -> object:
            if not (_name == "item" and id(self) in own_counters):
                calls.append(_name)
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, spy)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [step(x) for _ in range(2)]
    monkeypatch.undo()
    assert calls == []
    assert all(torch.isfinite(v) for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert int(step.skipped) == 0


def test_nonfinite_step_is_skipped_and_counted() -> None:
    model, step, x = _setup()
    step(x)
    weights = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for _ in range(2):
        assert not torch.isfinite(step(bad))
    for a, p in zip(weights, model.parameters(), strict=True):
        assert torch.equal(a, p)  # no weight moved
    assert (int(step.skipped), int(step.consecutive)) == (2, 2)
    for state in step.optimizer.state.values():  # no NaN reached the moments
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_inf"]).all()
    assert torch.isfinite(step(x))
    assert (int(step.skipped), int(step.consecutive)) == (2, 0)
    assert any(not torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_has_no_host_sync_on_cuda(precision: str) -> None:
    """On CUDA, with Adamax keeping its step counter on the device (capturable=True), a whole
    step runs under torch.cuda.set_sync_debug_mode("error")."""
    torch.manual_seed(0)
    model = az.create_model("marflow_tiny").cuda()
    g = torch.Generator("cuda").manual_seed(0)
    x_u8 = torch.randint(0, 256, (4, *model.input_shape), generator=g, dtype=torch.uint8,
                         device="cuda")
    model.initialize_from_data(x_u8, g)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3, capturable=True)
    step = TrainStep(model, opt, precision)
    x = model.to_model_space(x_u8, g)
    step(x)  # first call: optimizer state created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
