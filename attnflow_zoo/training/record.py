"""The written account of a run: ``metrics.jsonl`` (one record per log / evaluation) and
``run.json`` (what the run really did; the schema is ``checkpoint.write_run_record``'s)."""

from __future__ import annotations

import json
import platform
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from .._io import append_text, atomic_write_text
from .report import read_metrics

METRICS = "metrics.jsonl"
#: How bits/dim are estimated everywhere in the zoo (SPEC §4).
PROTOCOL = "single-sample dequantisation"


def device_name(device: torch.device) -> str:
    """The hardware a run used: the GPU's name (e.g. "NVIDIA H200"), else "cpu (<model>)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor()
    return f"cpu ({model})" if model else "cpu"


def versions() -> dict[str, str]:
    """The versions of torch and of the installed attnflow_zoo."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        zoo = version("attnflow-zoo")
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        zoo = "unknown"
    return {"torch": torch.__version__, "attnflow_zoo": zoo}


class MetricsLog:
    """``metrics.jsonl``, append-only; a resumed run first drops the records after its step (they
    belong to steps it is about to replay), so no step is ever logged twice."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            append_text(self.path, json.dumps(record) + "\n")


class RunRecord:
    """Keeps ``run.json`` of a run folder: written at the start, at every checkpoint and at the
    end; each step folder (and ``best/``) gets a copy describing its own weights."""

    def __init__(self, out: Path | None, base: dict[str, Any], previous: dict[str, Any] | None,
                 start_step: int) -> None:
        self.out = out
        self.began = time.monotonic()
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        prior = previous or {}
        self.prior_wall = float(prior.get("wall_seconds") or 0.0) if start_step else 0.0
        segments = list(prior.get("segments") or []) if start_step else []
        segments.append({"started": now, "from_step": start_step,
                         "host": socket.gethostname()})
        self.data: dict[str, Any] = {
            **base,
            "started": prior.get("started", now) if start_step else now,
            "segments": segments,
            "step": start_step,
            "samples_seen": start_step * int(base["train_config"]["batch_size"]),
            "status": "running",
            "metrics": [],
            "best": prior.get("best") if start_step else None,
        }

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.data["wall_seconds"] = round(self.prior_wall + time.monotonic() - self.began, 3)
        self.data["samples_seen"] = self.data["step"] * int(
            self.data["train_config"]["batch_size"])

    def snapshot(self, **values: Any) -> dict[str, Any]:
        """The record with ``values`` overriding (e.g. the metrics of another checkpoint)."""
        return {**self.data, **values}

    def write(self, folder: Path | None = None, record: dict[str, Any] | None = None) -> None:
        """Write ``record`` (default: the run's) into ``folder`` (default: the run folder)."""
        target = folder if folder is not None else self.out
        if target is not None:
            checkpoint.write_run_record(target, record if record is not None else self.data)


def metric(name: str, split: str, value: float, step: int, num_images: int) -> dict[str, Any]:
    """One entry of ``run.json``'s ``metrics``."""
    return {"name": name, "split": split, "value": value, "step": step, "num_images": num_images,
            "protocol": PROTOCOL}
