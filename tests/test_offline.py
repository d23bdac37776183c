"""Offline without saying so: HF_HUB_OFFLINE is not set but the Hub cannot be reached (here a
refused port on 127.0.0.1, no mock). A Hub id then answers from the local cache: one that is not
cached is the one-line error with nothing before it (without the zoo's check, huggingface_hub
retries for ~25 s and logs each retry as a "Retrying in …" line on stderr), and one that is
cached loads with offline mode still off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from _hub_server import HubServer  # noqa: E402

from attnflow_zoo import online  # noqa: E402
from attnflow_zoo.factory import create_model  # noqa: E402

CLI = "from attnflow_cli.main import main; main()"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it), never
    listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _env(home: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"})
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_the_check_tells_a_listening_port_from_a_refused_one(closed_port: int) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert online._can_connect("127.0.0.1", server.getsockname()[1], 5.0)
    assert not online._can_connect("127.0.0.1", closed_port, 5.0)


@pytest.mark.parametrize("args,expected", [
    (["sample", "--repo", "user/absent", "-o", "grid.png"],
     "config.json of Hub repo 'user/absent' is not in the local cache and the Hub cannot be "
     "reached"),
    (["evaluate", "--repo", "user/absent", "--dataset", "digits"],
     "config.json of Hub repo 'user/absent' is not in the local cache and the Hub cannot be "
     "reached"),
    (["train", "--model", "attnflow_imap_tiny", "--dataset", "cifar10", "--steps", "1",
      "--out", "run"],
     "cifar10 is not in the local Hugging Face cache and the Hub cannot be reached"),
], ids=["sample", "evaluate", "train"])
def test_an_uncached_hub_id_is_one_line_at_once(args: list[str], expected: str,
                                                closed_port: int, tmp_path: Path) -> None:
    proc = _cli(args, _env(tmp_path / "empty-home", f"http://127.0.0.1:{closed_port}"),
                tmp_path)
    assert proc.returncode == 1
    # One line, the zoo's own: no traceback and no "Retrying in 8s [Retry 4/5]" before it.
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "grid.png").exists()


def test_a_cached_repo_loads_without_retries(closed_port: int, tmp_path: Path) -> None:
    model = create_model("attnflow_imap_tiny")
    model.train()
    with torch.no_grad():  # the ActNorm data init, so the model is a trained one's shape
        model(torch.rand(8, *model.input_shape, generator=torch.Generator().manual_seed(0))
              - 0.5)
    model.eval().save_pretrained(tmp_path / "ckpt")
    home = tmp_path / "home"
    args = ["sample", "--repo", "user/tiny", "-n", "4", "--seed", "1", "--device", "cpu", "-o"]
    with HubServer() as hub:
        hub.state.repos["user/tiny"] = _repo(tmp_path / "ckpt")
        online_run = _cli([*args, "online.png"], _env(home, hub.url), tmp_path)
        assert online_run.returncode == 0, online_run.stderr
        assert any("/user/tiny/resolve/" in r for r in hub.state.requests)  # it did download
    # The Hub is now out of reach and offline mode is still off: the cache answers.
    again = _cli([*args, "cached.png"], _env(home, f"http://127.0.0.1:{closed_port}"), tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Retry" not in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "cached.png").read_bytes() == (tmp_path / "online.png").read_bytes()


def _repo(folder: Path):
    """A repo of the test Hub holding the files of a saved checkpoint."""
    import hashlib
    import json

    from _hub_server import Repo, _git_blob_sha

    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    sha = hashlib.sha1(json.dumps(sorted((k, _git_blob_sha(v)) for k, v in files.items())
                                  ).encode()).hexdigest()
    return Repo(private=False, files=files, sha=sha)
