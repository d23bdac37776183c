"""push → a local Hub server → download into a fresh cache → offline `attnflow sample`.

Also: the model card's YAML, and every broken checkpoint failing in one CLI line with nothing
uploaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from _hub_server import HubServer  # noqa: E402
from _toy_flow import ToyFlow, ToyFlowConfig  # noqa: E402
from attnflow_cli.main import main  # noqa: E402

from attnflow_zoo.evaluation.sampling import draw_samples  # noqa: E402

# The CLI in a fresh interpreter, with the toy architecture importable (it is not a preset).
CLI = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import _toy_flow; "
       "from attnflow_cli.main import main; main()")
METRICS = {"dataset": "mnist", "split": "test", "bpd": 1.2345, "bpd_estimator": "single-sample",
           "bpd_num_images": 1000, "fid": 12.5, "fid_num_samples": 50000,
           "fid_temperature": 1.0, "fid_reference": "mnist train",
           "fid_weights": "pt_inception-2015-12-05-6726825d"}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def _run(args: list[str], env: dict[str, str], code: str = CLI) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(TESTS), *args], env=env,
                          capture_output=True, text=True, timeout=300)


E2E_PRESET = "attnflow_imap_tiny"


def _model(zoo: bool):
    """The zoo's tiny AttnFlow (the end-to-end test), or the test-only toy flow."""
    from attnflow_zoo.factory import create_model

    return create_model(E2E_PRESET) if zoo else ToyFlow(ToyFlowConfig())


def _save(model, path: Path, gen: torch.Generator) -> Path:
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *model.input_shape, generator=gen) - 0.5)  # ActNorm data init
    model.eval().save_pretrained(path)
    return path


@pytest.fixture
def ckpt(tmp_path: Path, gen: torch.Generator) -> Path:
    return _save(_model(zoo=False), tmp_path / "ckpt", gen)


@pytest.fixture
def zoo_ckpt(tmp_path: Path, gen: torch.Generator) -> Path:
    return _save(_model(zoo=True), tmp_path / "zoo_ckpt", gen)


def test_push_download_sample_offline(zoo_ckpt: Path, tmp_path: Path) -> None:
    ckpt = zoo_ckpt
    arch = json.loads((ckpt / "config.json").read_text())["architecture"]
    with HubServer() as hub:
        push = _run(["push", "--checkpoint", str(ckpt), "--repo", "user/toy-flow",
                     "--metrics", json.dumps(METRICS), "--private"],
                    _env(tmp_path / "home_push", HF_ENDPOINT=hub.url, HF_TOKEN="hf_test"))
        assert push.returncode == 0, push.stderr
        repo = hub.state.repos["user/toy-flow"]
        assert repo.private
        assert set(repo.files) == {"config.json", "model.safetensors", "README.md"}
        assert [c["files"] for c in repo.commits] == [sorted(repo.files)]
        assert repo.files["config.json"] == (ckpt / "config.json").read_bytes()
        assert repo.files["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()

        card = ModelCard(repo.files["README.md"].decode())
        data = card.data.to_dict()
        assert data["library_name"] == "attnflow_zoo"
        assert data["license"] == "apache-2.0"
        # The checkpoint has no run record: the card claims no training data (the metrics'
        # MNIST is where it was scored, in model-index) and says so.
        assert "datasets" not in data
        assert "was not recorded" in card.text
        assert "normalizing-flows" in data["tags"]
        results = data["model-index"][0]["results"]
        metrics = {r["metrics"][0]["type"]: r for r in results}
        assert metrics["bits_per_dim"]["metrics"][0]["value"] == pytest.approx(1.2345)
        assert metrics["bits_per_dim"]["dataset"]["split"] == "test"
        assert metrics["fid"]["metrics"][0]["value"] == pytest.approx(12.5)
        assert "single-sample estimate" in card.text and "50,000 samples" in card.text

        home = tmp_path / "fresh_home"
        down = _run([], _env(home, HF_ENDPOINT=hub.url),
                    code="import sys; from huggingface_hub import snapshot_download; "
                         "print(snapshot_download('user/toy-flow'))")
        assert down.returncode == 0, down.stderr
        assert {p.name for p in Path(down.stdout.strip()).iterdir()} == set(repo.files)

    # The server is gone; the fresh cache alone serves the model, in a new offline process.
    offline = _env(home, HF_HUB_OFFLINE="1")
    grid = tmp_path / "grid.png"
    res = _run(["sample", "--repo", "user/toy-flow", "-n", "16", "--seed", "3",
                "--temperature", "0.7", "--device", "cpu", "-o", str(grid)], offline)
    assert res.returncode == 0, res.stderr
    from attnflow_zoo.registry import architecture

    model = architecture(arch).from_pretrained(ckpt)
    c, h, w = model.input_shape
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    assert pixels.shape == (4 * (h + 2) + 2, 4 * (w + 2) + 2, 3)  # 4×4 grid, 2 px padding
    # The downloaded model is the pushed one: the grid's tiles are exactly the local
    # checkpoint's samples for the same seed (PNG is lossless for uint8).
    local = draw_samples(model, 16, temperature=0.7, seed=3).permute(0, 2, 3, 1).numpy()
    for k in range(16):
        i, j = divmod(k, 4)
        tile = pixels[2 + i * (h + 2): 2 + i * (h + 2) + h, 2 + j * (w + 2): 2 + j * (w + 2) + w]
        np.testing.assert_array_equal(tile, np.broadcast_to(local[k], (h, w, 3)))


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["attnflow", *args]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = old
    return info.value.code, capsys.readouterr().err


#: What each error must say: without it, any failure (e.g. the offline upload) would pass.
EXPECTED = {"missing_dir": "does not exist", "truncated": "not a readable safetensors",
            "corrupted": "corrupted", "other_arch": "ResFlow9000",
            "missing_tensor": "missing tensor", "unknown_key": "num_heads",
            "bad_metrics": "bpd_estimator", "random_fid": "random Inception weights"}


@pytest.mark.parametrize("case", ["missing_dir", "truncated", "corrupted", "other_arch",
                                  "missing_tensor", "unknown_key", "bad_metrics",
                                  "random_fid"])
def test_cli_errors_are_one_line(ckpt: Path, tmp_path: Path, case: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    metrics = None
    if case == "missing_dir":
        ckpt = tmp_path / "no" / "such" / "dir"
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "corrupted":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0x55
        weights.write_bytes(bytes(data))
    elif case == "other_arch":
        payload = json.loads(config.read_text())
        payload["architecture"] = "ResFlow9000"
        config.write_text(json.dumps(payload))
    elif case == "missing_tensor":
        state = load_file(weights)
        state.pop(sorted(state)[0])
        save_file(state, weights)
    elif case == "unknown_key":
        payload = json.loads(config.read_text())
        payload["config"]["num_heads"] = 4
        config.write_text(json.dumps(payload))
    elif case == "bad_metrics":
        metrics = json.dumps({"bpd": 3.3})
    elif case == "random_fid":
        metrics = json.dumps({**METRICS, "fid_weights": "random-init (NOT a real FID)"})
    for command in (["push", "--repo", "user/x", "--checkpoint", str(ckpt)]
                    + (["--metrics", metrics] if metrics else []),
                    ["sample", "--checkpoint", str(ckpt), "-n", "2",
                     "-o", str(tmp_path / "g.png")]):
        if metrics and command[0] == "sample":
            continue
        code, err = _cli(command, capsys)
        assert code == 1
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
        assert EXPECTED[case] in err and "upload to" not in err, err
    assert not (tmp_path / "g.png").exists()


def _card_names() -> list[str]:
    from attnflow_zoo.factory import list_models
    from attnflow_zoo.publishing.modelcard import resource_dir

    files = {p.name[:-5] for p in resource_dir("cards").iterdir() if p.name.endswith(".json")}
    return sorted(files | set(list_models()))


@pytest.mark.parametrize("name", _card_names())
def test_every_zoo_entry_renders_a_card(name: str) -> None:
    import yaml

    from attnflow_zoo.factory import list_models
    from attnflow_zoo.publishing.modelcard import card_spec, read_resource, render_card
    from attnflow_zoo.registry import get_entry

    if name in list_models():
        entry = get_entry(name)
        arch, config = entry.model_cls.__name__, entry.config
    else:  # a card for an entry not (yet) registered
        arch, config = "", {}
    spec = card_spec(name, arch)
    assert spec["family"] != "default", f"{name} has no card family"
    metrics = {**METRICS, "dataset": spec["dataset_key"]}
    if spec["dataset_key"] is None:
        metrics.pop("dataset")
    # A run record saying it was trained on the entry's dataset: then `datasets` names it.
    run = {"dataset": {"name": spec["dataset_key"], "path": None, "num_train": 100}}
    card = render_card(architecture=arch or "Model", config=config, preset=name,
                       repo_id=f"user/{name}", metrics=metrics, run=run)
    header = yaml.safe_load(str(card).split("---")[1])
    assert header["library_name"] == "attnflow_zoo"
    # A class-conditional model is no unconditional generator: no pipeline tag (issue 20).
    conditional = bool(getattr(config, "num_classes", 0))
    assert header.get("pipeline_tag") == (None if conditional
                                          else "unconditional-image-generation")
    assert ("class-conditional" in header["tags"]) == conditional
    assert header["license"] == "apache-2.0"
    assert f"arxiv:{spec['paper']['url'].rsplit('/', 1)[1]}" in header["tags"]
    hub_id = spec["dataset"]["hub_id"]
    assert header.get("datasets") == ([hub_id] if hub_id else None)
    assert {r["metrics"][0]["type"] for r in header["model-index"][0]["results"]} == {
        "bits_per_dim", "fid"}
    assert "{" not in spec["title"] and spec["paper"]["url"] in card.text
    assert spec["citation"].split("\n")[0] in card.text
    assert read_resource("dataset_license", spec["dataset"]["license_file"]).startswith("# ")
    # A family's reference numbers (SPEC §5's on CIFAR-10; TarFlow's on ImageNet 64×64) appear
    # beside results on that dataset only (TarFlow has no CIFAR-10 numbers to show).
    same_data = spec["dataset_key"] == spec.get("reference_dataset", "cifar10")
    expected = same_data and spec["family"] != "validator" and not (
        spec["family"] == "tarflow" and spec["dataset_key"] == "cifar10")
    assert ("The papers' numbers" in card.text) == expected


def test_cards_and_licenses_ship_in_the_wheel(tmp_path: Path) -> None:
    import zipfile

    root = TESTS.parent
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                            str(root)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    if build.returncode != 0 and "bdist_wheel" in build.stderr + build.stdout:
        pytest.skip("no offline wheel backend (install `wheel` or setuptools>=70.1)")
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("attnflow_zoo-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = {p.relative_to(root).as_posix() for d in ("cards", "dataset_license")
               for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    for path in shipped:
        pkg = path.replace("cards/", "attnflow_zoo/_cards/", 1).replace(
            "dataset_license/", "attnflow_zoo/_licenses/", 1)
        assert (site / pkg).is_file(), f"{path} is missing from the wheel"
    for module in (root / "attnflow_zoo").rglob("*.py"):  # every subpackage is listed
        rel = module.relative_to(root)
        assert (site / rel).is_file(), f"{rel} is missing from the wheel (pyproject packages)"
    code = (
        "import sys; site = sys.argv[1]\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
        "getattr(f, '__module__', '')]\n"
        "sys.path.insert(0, site)\n"
        "import attnflow_zoo, attnflow_zoo.publishing.modelcard as mc\n"
        "assert attnflow_zoo.__file__.startswith(site), attnflow_zoo.__file__\n"
        "assert str(mc.resource_dir('cards')).startswith(site)\n"
        "card = mc.render_card(architecture='AttnFlow', config={}, "
        "preset='attnflow_imap_celeba', repo_id='u/x')\n"
        "assert 'CelebA' in card.text\n"
        "print(mc.read_resource('dataset_license', 'celeba.md').splitlines()[0])\n")
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("# CelebA")


# --- the round trip is checked on what the model is for (issue 23, item 2) ----------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of the tiny AttnFlow on the embedded digits: a run folder with a run record."""
    from attnflow_zoo.training import train_preset
    from attnflow_zoo.training.recipes import plan

    out = tmp_path_factory.mktemp("trained") / "run"
    resolved = plan(E2E_PRESET, model_overrides={"in_channels": 1}, steps=2, batch_size=8,
                    validation_fraction=0, eval_every=None)
    train_preset(resolved, "digits", out_dir=out, limit=32, eval_limit=8, show_progress=False)
    return out


def test_push_checks_the_round_trip_on_the_training_data(trained_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from attnflow_zoo import checkpoint
    from attnflow_zoo.data import datasets
    from attnflow_zoo.factory import load_model
    from attnflow_zoo.publishing import publish

    code, err = _cli(["push", "--checkpoint", str(trained_run), "--repo", "user/x", "--dry-run",
                      "-o", str(tmp_path / "card.md")], capsys)
    assert code == 0, err
    line = next((x for x in err.splitlines() if "round trip" in x), err)
    assert line.endswith("on 8 train images of digits, its training data"), line
    assert float(line.split("= ")[1].split(" on")[0]) <= 1 / 512
    model = load_model(trained_run)
    images, labels, what = publish.round_trip_inputs(
        model, checkpoint.read_run_record(checkpoint.resolve_local(trained_run)))
    assert labels is None  # an unconditional model
    # The run's training split (seeded subset), not noise: what the model is meant to invert.
    expected = datasets.load_for_shape("digits", "train", model.input_shape, limit=8)
    assert torch.equal(images, expected) and what == "8 train images of digits, its training data"


def test_without_its_data_the_check_uses_the_models_own_samples(zoo_ckpt: Path) -> None:
    from attnflow_zoo.factory import load_model
    from attnflow_zoo.publishing import publish

    model = load_model(zoo_ckpt)  # save_pretrained: no run record, so no data to name
    images, _, what = publish.round_trip_inputs(model, None)
    assert what == "8 of its own samples at temperature 0.7"
    drawn = model.sample(8, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, drawn)
    moved = publish.round_trip_inputs(model, {"dataset": {"path": "/no/such/folder"}})
    assert moved[2] == what  # a training folder that is gone: the samples again
    assert publish.check_round_trip(model, images, what=what) <= 1 / 512


def test_a_model_that_does_not_invert_is_refused_with_the_numbers(
        tmp_path: Path, gen: torch.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(zoo=False)
    _save(model, tmp_path / "init", gen)
    with torch.no_grad():
        # x + 1e6 in float32 keeps steps of 1/16: every pixel's round trip is off by far more
        # than a grey level (the flow's later scales multiply it).
        model.flow.layers[1].bias.fill_(1e6)
    model.eval().save_pretrained(tmp_path / "broken")
    code, err = _cli(["push", "--checkpoint", str(tmp_path / "broken"), "--repo", "user/x",
                      "--dry-run", "-o", str(tmp_path / "card.md")], capsys)
    assert code == 1 and err.count("\n") == 1, err
    numbers = re.search(r"round trip inverse\(forward\(x\)\) is off by up to ([\d.e-]+) \(more "
                        r"than 1/512\) on 8 of 8 of its own samples at temperature 0\.7 "
                        r"\(median ([\d.e-]+)\)", err)
    assert numbers and float(numbers[1]) >= float(numbers[2]) > 1 / 512, err
    assert not (tmp_path / "card.md").exists()
