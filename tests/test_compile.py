"""torch.compile of the training computation and of sampling (attnflow_zoo.compilation):
compiled = eager to float tolerance, and no graph break.

Compiled with ``aot_eager`` (Dynamo's graph capture + AOTAutograd's joint forward/backward
graph, run by eager kernels: seconds). Inductor's C++ code generation takes minutes on a
small shared CPU, so it runs only with ATTNFLOW_TEST_INDUCTOR=1 (and is measured by
benchmarks/speed.py / gpu.sh).
"""

from __future__ import annotations

import os

import pytest
import torch

import attnflow_zoo as az
from attnflow_zoo.compilation import compile_available, compile_log_density, compile_sampling
from attnflow_zoo.testing import perturb_parameters

BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("ATTNFLOW_TEST_INDUCTOR") else [])
#: A micro MaR-Flow (conditional and unconditional mAR priors, 10 channel steps), so that the
#: traced graphs stay small.
MICRO = dict(image_size=4, in_channels=1, num_levels=2, num_steps=1, hidden_channels=4,
             prior_hidden_channels=4, prior_num_layers=2, prior_cond_hidden_channels=4,
             prior_embed_channels=2)


def _model(name: str = "marflow_tiny", **overrides: object) -> az.FlowModel:
    torch.manual_seed(0)
    model = az.create_model(name, **{**MICRO, **overrides})
    perturb_parameters(model, 0.1, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    model.initialize_from_data(torch.randint(0, 256, (3, *model.input_shape), generator=g,
                                             dtype=torch.uint8), g)
    return model


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    torch._dynamo.reset()
    if not compile_available(request.param):
        pytest.skip(f"torch.compile backend {request.param} is unavailable here")
    return request.param


def test_compiled_training_equals_eager(backend: str) -> None:
    model = _model()
    x = torch.rand(3, *model.input_shape, generator=torch.Generator().manual_seed(3)) - 0.5
    log_p = compile_log_density(model, backend=backend)(x)
    log_p.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = model.log_density(x)
    ref.sum().backward()
    torch.testing.assert_close(log_p, ref, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_sampling_equals_eager(backend: str) -> None:
    model = _model().eval()
    got = compile_sampling(model, backend=backend)(3, 0.7, torch.Generator().manual_seed(4))
    want = model.generate(3, 0.7, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,overrides", [
    ("marflow_tiny", {}), ("attnflow_imap_tiny", {}),
    ("attnflow_itrans_p1_tiny", {"attention_levels": (True, False)})])
def test_no_graph_break(name: str, overrides: dict) -> None:
    """One graph each for the training computation and the deterministic sampler (ActNorm's
    init is a separate pass; the conv-LSTM recurrence is one custom operator)."""
    torch._dynamo.reset()
    model = _model(name, **overrides)
    x = torch.rand(2, *model.input_shape) - 0.5
    train = torch._dynamo.explain(model.log_density)(x)
    noise = model.draw_noise(2, 0.7, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample = torch._dynamo.explain(model.generate_from_noise)(2, 0.7, noise)
    assert (train.graph_count, train.graph_break_count) == (1, 0), train.break_reasons
    assert (sample.graph_count, sample.graph_break_count) == (1, 0), sample.break_reasons


def test_fit_with_compile_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TrainConfig(compile=True)``: ``fit`` trains through ``compile_training`` (here with
    the aot_eager backend, see the module docstring) to the eager run's losses."""
    from attnflow_zoo.compilation import compile_training
    from attnflow_zoo.training import TrainConfig, fit, loop

    torch._dynamo.reset()
    if not compile_available("aot_eager"):
        pytest.skip("torch.compile backend aot_eager is unavailable here")
    compiled = []

    def aot_eager(module: torch.nn.Module) -> torch.nn.Module:
        compiled.append(module)
        return compile_training(module, backend="aot_eager")

    monkeypatch.setattr(loop, "compile_training", aot_eager)
    images = torch.randint(0, 256, (12, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = az.create_model("marflow_tiny", **MICRO)
        config = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                             validation_fraction=0, max_shift=1, flip=False, compile=flag)
        result = fit(model, images, config, device="cpu")
        losses[flag] = [r["train_bpd"] for r in result.history if "train_bpd" in r]
    assert len(compiled) == 1 and len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
