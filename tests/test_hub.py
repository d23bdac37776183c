"""Strict checkpoints: save → load is exact, and every broken checkpoint is a CheckpointError."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

from _toy_flow import OtherFlow, ToyFlow, ToyFlowConfig  # noqa: E402

import attnflow_zoo as az  # noqa: E402
from attnflow_zoo.checkpoint import looks_like_path  # noqa: E402
from attnflow_zoo.errors import CheckpointError  # noqa: E402
from attnflow_zoo.testing import check_invertible  # noqa: E402


@pytest.fixture
def trained(gen: torch.Generator) -> ToyFlow:
    """A toy flow whose ActNorms are data-initialised (one training-mode forward)."""
    model = ToyFlow(ToyFlowConfig(levels=(1, 2)))
    model.train()
    model(torch.rand(16, 1, 8, 8, generator=gen) - 0.5)
    return model.eval()


@pytest.fixture
def ckpt(trained: ToyFlow, tmp_path: Path) -> Path:
    trained.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_save_writes_envelope_and_only_safetensors(ckpt: Path) -> None:
    payload = json.loads((ckpt / "config.json").read_text())
    assert payload["architecture"] == "ToyFlow"
    assert payload["format_version"] == 1
    assert payload["config"]["levels"] == [1, 2]
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors"}
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))


def test_the_preset_is_built_in_saved_and_loaded(tmp_path: Path) -> None:
    model = ToyFlow(ToyFlowConfig(), preset="toy_preset")
    assert model.zoo_preset == "toy_preset" and ToyFlow(ToyFlowConfig()).zoo_preset is None
    with pytest.raises(AttributeError):
        model.zoo_preset = "another"  # what the model was built with, not a setting
    model.save_pretrained(tmp_path / "named")
    assert json.loads((tmp_path / "named" / "config.json").read_text())["preset"] == "toy_preset"
    assert az.load_model(tmp_path / "named").zoo_preset == "toy_preset"
    assert ToyFlow.from_pretrained(tmp_path / "named").zoo_preset == "toy_preset"


def test_older_config_without_a_preset_key_loads_without_one(ckpt: Path) -> None:
    payload = json.loads((ckpt / "config.json").read_text())
    del payload["preset"]  # written before config.json recorded the preset
    (ckpt / "config.json").write_text(json.dumps(payload))
    loaded = az.load_model(ckpt)
    assert type(loaded) is ToyFlow and loaded.zoo_preset is None


@pytest.mark.parametrize("loader", ["class", "load_model"])
def test_round_trip_identical(trained: ToyFlow, ckpt: Path, loader: str,
                              gen: torch.Generator) -> None:
    model = ToyFlow.from_pretrained(ckpt) if loader == "class" else az.load_model(str(ckpt))
    assert type(model) is ToyFlow
    assert model.config == trained.config and model.config.levels == (1, 2)
    x = torch.rand(4, 1, 8, 8, generator=gen) - 0.5
    z0, ld0 = trained(x)
    z1, ld1 = model(x)
    assert torch.equal(z0, z1) and torch.equal(ld0, ld1)
    check_invertible(model, x)
    # ActNorm's `initialized` buffer was loaded: training mode must not re-initialise.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 1, 8, 8, generator=gen) * 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_model_reports_wrong_architecture(ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="is a ToyFlow checkpoint, not OtherFlow"):
        OtherFlow.from_pretrained(ckpt)


def _edit_config(ckpt: Path, fn) -> None:
    path = ckpt / "config.json"
    payload = json.loads(path.read_text())
    fn(payload)
    path.write_text(json.dumps(payload))


def _edit_weights(ckpt: Path, fn) -> None:
    path = ckpt / "model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)  # no checksum: the structural checks alone must catch it


@pytest.mark.parametrize("case, match", [
    ("unknown_key", "config key\\(s\\) dropout unknown to ToyFlowConfig"),
    ("other_arch", "unknown architecture 'GlowXL'"),
    ("version", "format_version 99"),
    ("shape", "shape mismatch"),
    ("missing_tensor", "missing tensor\\(s\\) flow.layers.1.bias"),
    ("unexpected_tensor", "unexpected tensor\\(s\\) extra.weight"),
    ("truncated", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("bitflip", "is corrupted"),
    ("pickle_only", "reads only safetensors"),
    ("bad_json", "not readable JSON"),
])
def test_broken_checkpoints_raise(ckpt: Path, case: str, match: str) -> None:
    weights = ckpt / "model.safetensors"
    if case == "unknown_key":
        _edit_config(ckpt, lambda p: p["config"].update(dropout=0.1))
    elif case == "other_arch":
        _edit_config(ckpt, lambda p: p.update(architecture="GlowXL"))
    elif case == "version":
        _edit_config(ckpt, lambda p: p.update(format_version=99))
    elif case == "shape":
        _edit_config(ckpt, lambda p: p["config"].update(hidden_channels=16))
    elif case == "missing_tensor":
        _edit_weights(ckpt, lambda s: s.pop("flow.layers.1.bias"))
    elif case == "unexpected_tensor":
        _edit_weights(ckpt, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif case == "bitflip":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif case == "pickle_only":
        torch.save(load_file(weights), ckpt / "pytorch_model.bin")
        weights.unlink()
    elif case == "bad_json":
        (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=match) as info:
        az.load_model(ckpt)
    assert "\n" not in str(info.value)
    if case not in ("other_arch",):
        with pytest.raises(CheckpointError):
            ToyFlow.from_pretrained(ckpt)


def test_nonexistent_paths_are_not_sent_to_the_hub(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ["./nope", str(tmp_path / "nope"), "~/surely/not/here", "runs/missing",
                 "a/b/c"]:
        assert looks_like_path(name)
        with pytest.raises(CheckpointError, match="does not exist"):
            az.load_model(name)
    assert not looks_like_path("user/model")
    with pytest.raises(CheckpointError, match="nor a valid Hub repo id"):
        az.load_model("user/model--")


def test_repo_id_offline_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(CheckpointError, match="not in the local cache"):
        az.load_model("someone/absent-model", cache_dir=tmp_path / "cache")


def test_training_folder_stands_for_its_latest_checkpoint(tmp_path) -> None:
    """`attnflow sample|evaluate|push --checkpoint RUN` all read RUN/latest (one rule, in hub)."""
    import torch

    import attnflow_zoo as az
    from attnflow_zoo.errors import CheckpointError

    model = az.create_model("marflow_tiny").eval()
    model.save_pretrained(tmp_path / "run" / "step-0000007")
    (tmp_path / "run" / "latest").write_text("step-0000007\n")
    loaded = az.load_model(tmp_path / "run").eval()
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    (tmp_path / "run" / "latest").write_text("step-0000099\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        az.load_model(tmp_path / "run")


def test_older_config_without_the_gate_keys_loads_the_gate_it_was_trained_with(tmp_path):
    """A config.json from before ``imap_gate`` / ``imap_init_logit`` existed meant the published
    σ gate at c = 4; it loads as that (AttnFlowConfig.LEGACY_DEFAULTS), not as today's default
    normalized gate, so the loaded model computes what was saved."""
    import json
    import warnings

    import attnflow_zoo as az

    torch.manual_seed(0)
    old = az.create_model("attnflow_imap_tiny", imap_gate="sigmoid", imap_init_logit=4.0).eval()
    old.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    payload = json.loads(cfg_path.read_text())
    del payload["config"]["imap_gate"], payload["config"]["imap_init_logit"]
    cfg_path.write_text(json.dumps(payload))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = az.load_model(tmp_path).eval()
    assert any("imap_gate='sigmoid'" in str(w.message) for w in caught)
    assert loaded.config.imap_gate == "sigmoid" and loaded.config.imap_init_logit == 4.0
    x = torch.rand(2, *old.input_shape, generator=torch.Generator().manual_seed(1)) - 0.5
    torch.testing.assert_close(loaded(x)[0], old(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name,overrides", [
    ("attnflow_imap_tiny", {"prior": "gaussian"}),
    ("attnflow_itrans_cond_couplings_tiny", {}),
    ("marflow_tiny", {})])
def test_older_config_without_the_bound_keys_loads_unbounded_bit_for_bit(tmp_path, name,
                                                                        overrides):
    """A config.json from before the soft clips (no coupling_log_scale_bound,
    imap_log_gate_bound, prior_log_std_bound) meant unbounded scales, gates and prior σ: it loads
    as that, and density, latents and samples are the saved model's bit for bit. The same
    weights under today's bounds compute something else (so the comparison can fail)."""
    import warnings

    from attnflow_zoo.models.attnflow import AttnFlowConfig
    from attnflow_zoo.testing import perturb_parameters

    keys = ("coupling_log_scale_bound", "imap_log_gate_bound", "prior_log_std_bound")
    legacy = {k: AttnFlowConfig.LEGACY_DEFAULTS[k] for k in keys}
    assert all(v is None for v in legacy.values())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        old = az.create_model(name, **overrides, **legacy).eval()
    perturb_parameters(old, 0.5, torch.Generator().manual_seed(3))
    old.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    payload = json.loads(cfg_path.read_text())
    for k in keys:
        del payload["config"][k]
    cfg_path.write_text(json.dumps(payload))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = az.load_model(tmp_path).eval()
    bounded = az.create_model(name, **overrides).eval()
    bounded.load_state_dict(old.state_dict())
    y = torch.tensor([0, 1]) if old.config.num_classes else None
    x = torch.rand(2, *old.input_shape, generator=torch.Generator().manual_seed(1)) - 0.5

    def outputs(model):  # noqa: ANN001, ANN202
        with torch.no_grad():
            z, logdet = model(x, y)
            return (z, logdet, model.log_density(x, y), model.inverse(z * 3, y),
                    model.generate(2, 1.0, torch.Generator().manual_seed(2), y=y))

    for got, want in zip(outputs(loaded), outputs(old), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(outputs(bounded)[1], outputs(old)[1])
