"""Training checkpoints: write a step folder atomically, read one back for an exact resume.

A checkpoint is ``<out>/step-NNNNNNN/`` in the ``save_pretrained`` layout (``config.json`` +
``model.safetensors``: the EMA weights when EMA is on, loadable with ``Model.from_pretrained``)
plus ``training_state/`` (raw weights, optimizer, scaler, step: checksummed safetensors + JSON;
never a pickle). The folder is written under a temporary name and renamed, then ``<out>/latest``
is replaced, so a crash never leaves a half-written checkpoint. Every file is read back through
``checkpoint``'s strict readers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint
from .._io import atomic_directory, atomic_write_text
from ..errors import CheckpointError, TrainingError

STATE_DIR = "training_state"
STATE_FORMAT = 1


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_training_checkpoint(out_dir: Path, step: int, raw: nn.Module,
                             ema_model: nn.Module | None, optimizer: torch.optim.Optimizer,
                             scaler: Any, train_config: dict[str, Any], keep: int,
                             extra: dict[str, Any]) -> Path:
    """Write ``out_dir/step-NNNNNNN`` and point ``latest`` at it; keep the newest ``keep``."""
    for p in raw.parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"weights became non-finite before the checkpoint at step {step}; "
                                "nothing was written — lower --lr or set grad clipping")
    name = f"{checkpoint.STEP_PREFIX}{step:07d}"
    with atomic_directory(out_dir / name) as tmp:
        (ema_model if ema_model is not None else raw).save_pretrained(tmp)  # type: ignore
        state_dir = tmp / STATE_DIR
        if ema_model is not None:
            checkpoint.save_weights(raw, state_dir / checkpoint.WEIGHTS_NAME)
        tensors, plain = _flatten_optimizer(optimizer.state_dict())
        checkpoint.save_tensors(tensors, state_dir / "optimizer.safetensors")
        meta = {"format": STATE_FORMAT, "step": step, "ema": ema_model is not None,
                "optimizer": plain, "scaler": scaler.state_dict() if scaler is not None else None,
                "train_config": train_config, **extra}
        atomic_write_text(state_dir / "state.json", json.dumps(meta, indent=1))
    atomic_write_text(out_dir / checkpoint.LATEST_NAME, name + "\n")
    for old in checkpoint.step_folders(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir / name


def load_training_state(directory: Path, raw: nn.Module, ema_model: nn.Module | None,
                        optimizer: torch.optim.Optimizer, scaler: Any) -> dict[str, Any]:
    """Restore raw weights, EMA weights, optimizer and scaler from a step folder; returns its
    ``state.json``. Every tensor file is checked (checksum, names, shapes) before any is used."""
    checkpoint.check_config_matches(raw, directory)
    state_dir = directory / STATE_DIR
    try:
        meta = json.loads((state_dir / "state.json").read_text())
        fmt, has_ema = meta["format"], meta["ema"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory} has no complete training state ({err}); it cannot "
                              "be resumed — start a new --out") from err
    if fmt != STATE_FORMAT:
        raise CheckpointError(f"{directory} has training-state format {fmt}, this version "
                              f"reads {STATE_FORMAT}")
    weights = checkpoint.read_tensors(directory / checkpoint.WEIGHTS_NAME)
    raw_weights = (checkpoint.read_tensors(state_dir / checkpoint.WEIGHTS_NAME) if has_ema
                   else weights)
    opt_tensors = checkpoint.read_tensors(state_dir / "optimizer.safetensors")
    checkpoint.check_state_matches(raw, raw_weights, directory)
    raw.load_state_dict(raw_weights, strict=False)
    if ema_model is not None:
        ema_model.load_state_dict(weights if has_ema else raw_weights, strict=False)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory} does not match the model being trained: "
                              f"{str(err).splitlines()[0]}; resume with the same --model/options "
                              "or pick a new --out") from err
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta
