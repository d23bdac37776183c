"""Every ``*_tiny`` preset of the zoo, whatever its family: round trip, brute-force log-det,
batch independence, gradients, save → load identical. New presets are covered by registering
them (``list_models("*_tiny")``), not by editing a list here. Class-conditional presets get
labels: a fixed class through ``_flow`` (the checks see one bijection x -> z at that y) and one
label per image, every class in turn, in the density calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import attnflow_zoo as az
from attnflow_zoo.models.base import FlowModel
from attnflow_zoo.testing import (
    check_batch_independence,
    check_gradients,
    check_invertible,
    check_logdet,
    perturb_parameters,
)

TINY = az.list_models("*_tiny")
DENSITY = [n for n in TINY if issubclass(az.registry.get_entry(n).model_cls, FlowModel)]


class _Bijection(nn.Module):
    """A bare bijection (the validator: forward returns y) seen through the (z, logdet)
    interface of the checks, with a zero logdet placeholder (never checked against brute force:
    the validator computes no log-determinant)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return self.model.inverse(y)


class _Labelled(nn.Module):
    """A class-conditional model at one fixed class ``label``: the bijection x -> z of that
    class, seen through the (z, logdet) interface of the checks."""

    def __init__(self, model: nn.Module, label: int) -> None:
        super().__init__()
        self.model = model
        self.label = label

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(x, self.label)

    def inverse(self, z: Tensor) -> Tensor:
        return self.model.inverse(z, self.label)


def _labels(model: nn.Module, b: int) -> Tensor | None:
    """One label per image, every class in turn, for a class-conditional model; else None."""
    k = getattr(model, "num_classes", 0)
    return torch.arange(b) % k if k else None


def _ready(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The tiny preset, data-initialised (ActNorm) on random images, every parameter moved off
    its (often degenerate, zero) init, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # default layer init draws from the global RNG
        model = az.create_model(name)
    g = torch.Generator().manual_seed(seed + 100)
    if isinstance(model, FlowModel):
        x_u8 = torch.randint(0, 256, (8, *model.input_shape), generator=g, dtype=torch.uint8)
        model.initialize_from_data(x_u8, g, _labels(model, 8))
    perturb_parameters(model, 0.05, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def _inputs(model: nn.Module, b: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Model-space inputs in [−0.5, 0.5) with image-like spatial correlation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *model.input_shape, generator=g, dtype=torch.float64)
    x = 0.5 * x + 0.5 * x.mean(1, keepdim=True).roll(1, -1)
    return (x - 0.5).to(dtype)


def _flow(model: nn.Module) -> nn.Module:
    if not isinstance(model, FlowModel):
        return _Bijection(model)
    return _Labelled(model, model.num_classes - 1) if model.num_classes else model


def test_every_family_has_tiny_presets() -> None:
    families = {az.registry.get_entry(n).model_cls.__name__ for n in TINY}
    assert families == {"AttnFlow", "ResFlow", "InvertibilityValidator", "TarFlow"}
    assert set(DENSITY) < set(TINY)


@pytest.mark.parametrize("name", TINY)
def test_round_trip(name: str) -> None:
    model = _ready(name)
    x = _inputs(model, 4, torch.float64)
    check_invertible(_flow(model), x, atol=1e-8)
    check_invertible(_flow(model.float()), x.float(), atol=1e-4)


@pytest.mark.parametrize("name", DENSITY)
def test_logdet_matches_brute_force(name: str) -> None:
    """The model's forward logdet (the flow alone, no prior) = log|det ∂z/∂x| per sample."""
    model = _ready(name)
    check_logdet(_flow(model), _inputs(model, 2, torch.float64, seed=5), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", TINY)
def test_batch_independence(name: str) -> None:
    model = _ready(name)
    check_batch_independence(_flow(model), _inputs(model, 4, torch.float64, seed=2))
    if isinstance(model, FlowModel):
        g = torch.Generator().manual_seed(0)
        x_u8 = torch.randint(0, 256, (5, *model.input_shape), generator=g, dtype=torch.uint8)
        logp = model.log_prob(x_u8, _labels(model, 5), generator=g)
        assert logp.shape == (5,) and logp.dtype == torch.float64 and torch.isfinite(logp).all()
        x = _inputs(model, 4, torch.float64, seed=3)
        y = _labels(model, 4)
        logp = model.log_density(x, y)
        assert logp.shape == (4,) and torch.isfinite(logp).all()
        for i in range(4):
            yi = None if y is None else y[i: i + 1]
            torch.testing.assert_close(model.log_density(x[i: i + 1], yi), logp[i: i + 1],
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = _ready(name, torch.float32)
    x = _inputs(model, 3, torch.float32)
    if isinstance(model, FlowModel):
        y = _labels(model, 3)
        check_gradients(model, x, nll=lambda m, v: -m.log_density(v, y).mean())
    else:
        check_gradients(model, x, nll=lambda m, v: m(v).pow(2).mean())


@pytest.mark.parametrize("name", TINY)
def test_save_load_identical(name: str, tmp_path: Path) -> None:
    model = _ready(name, torch.float32)
    model.save_pretrained(tmp_path)
    loaded = az.load_model(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    assert loaded.zoo_preset == name
    x = _inputs(model, 3, torch.float32)
    with torch.no_grad():
        a, b = _flow(model)(x), _flow(loaded)(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if isinstance(model, FlowModel):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        y = _labels(model, 3)
        with torch.no_grad():
            assert torch.equal(model.log_density(x, y, generator=g1),
                               loaded.log_density(x, y, generator=g2))
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        y = _labels(model, 2)
        assert torch.equal(model.sample(2, generator=g1, y=y),
                           loaded.sample(2, generator=g2, y=y))


@pytest.mark.parametrize("name", TINY)
def test_configs_are_frozen(name: str) -> None:
    """A config cannot change under a built model (it would save one model and run another)."""
    model = az.create_model(name)
    field = next(iter(model.config.__dataclass_fields__))
    with pytest.raises(AttributeError):
        setattr(model.config, field, getattr(model.config, field))


def test_every_preset_builds_on_the_meta_device() -> None:
    """`attnflow models` counts parameters on the meta device (no memory, no fallback): no
    constructor may read a tensor's value (``float(t)``, ``t.item()``), or its preset would fail
    here. The count is the one a real build gives. The listing is made in a fresh interpreter:
    no preset's meta build may run one of torch's Python meta kernels, whose first use imports
    torch._dynamo (seconds of the listing)."""
    code = ("import json, sys, attnflow_zoo as az; rows = az.describe_models(); "
            "print(json.dumps([rows, 'torch._dynamo' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    rows, dynamo = json.loads(out.strip().splitlines()[-1])
    assert not dynamo
    assert [r["name"] for r in rows] == az.list_models()
    assert all(r["params"] != "-" for r in rows)
    name = "attnflow_imap_tiny"
    entry = az.registry.get_entry(name)
    real = sum(p.numel() for p in az.create_model(name).parameters())
    assert az.factory.count_parameters(entry.model_cls, entry.config) == real


@pytest.mark.parametrize("name", az.list_models("*_tiny"))
def test_meta_counts_equal_real_builds(name: str) -> None:
    """The meta build's shortcuts (no initialisers; random draws and weight norms as empty
    tensors of their shapes) leave every parameter's shape as a real build makes it."""
    entry = az.registry.get_entry(name)
    meta = az.factory.meta_build(entry.model_cls, entry.config)
    real = az.create_model(name)
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in real.state_dict().items()}
