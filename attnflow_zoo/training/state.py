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
from ..errors import CheckpointError, OutputError, TrainingError
from ..progress import note

STATE_DIR = "training_state"
STATE_FORMAT = 1
#: The checkpoint with the lowest validation bits/dim (never rotated away; no training state).
BEST_NAME = "best"


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
                             extra: dict[str, Any], record: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/step-NNNNNNN`` (with ``record`` as its ``run.json``) and point ``latest``
    at it; keep the newest ``keep`` step folders."""
    for p in raw.parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"weights became non-finite before the checkpoint at step {step}; "
                                "nothing was written — lower `lr` or set `grad_clip`")
    name = f"{checkpoint.STEP_PREFIX}{step:07d}"
    try:
        with atomic_directory(out_dir / name) as tmp:
            (ema_model if ema_model is not None else raw).save_pretrained(tmp)  # type: ignore
            state_dir = tmp / STATE_DIR
            if ema_model is not None:
                checkpoint.save_weights(raw, state_dir / checkpoint.WEIGHTS_NAME)
            tensors, plain = _flatten_optimizer(optimizer.state_dict())
            checkpoint.save_tensors(tensors, state_dir / "optimizer.safetensors")
            meta = {"format": STATE_FORMAT, "step": step, "ema": ema_model is not None,
                    "optimizer": plain,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "train_config": train_config, **extra}
            atomic_write_text(state_dir / "state.json", json.dumps(meta, indent=1))
            if record is not None:
                checkpoint.write_run_record(tmp, record)
        atomic_write_text(out_dir / checkpoint.LATEST_NAME, name + "\n")
    except OutputError as err:
        raise OutputError(f"could not write the checkpoint of step {step} ({_reason(err)}; "
                          f"nothing was left half-written): {kept(out_dir)}") from err
    for old in checkpoint.step_folders(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir / name


def save_best(out_dir: Path, model: nn.Module, record: dict[str, Any]) -> Path:
    """Write ``out_dir/best`` (``save_pretrained`` layout + ``run.json``) atomically."""
    try:
        with atomic_directory(out_dir / BEST_NAME) as tmp:
            model.save_pretrained(tmp)  # type: ignore[attr-defined]
            checkpoint.write_run_record(tmp, record)
    except OutputError as err:
        before = "the previous best/ is kept" if (out_dir / BEST_NAME).is_dir() else \
            "there is no best/ yet"
        raise OutputError(f"could not write best/ of step {record.get('step')} ({_reason(err)}; "
                          f"nothing was left half-written): {before}, and "
                          f"{kept(out_dir)}") from err
    return out_dir / BEST_NAME


def _reason(err: OSError) -> str:
    """The system's reason for a failed write ("No space left on device")."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__
    return str(err).rsplit(": ", 1)[-1].split(";")[0]


def kept(out_dir: Path) -> str:
    """What a run folder keeps to resume from after a failed write, as the end of a sentence."""
    try:
        folder = checkpoint.resolve_local(out_dir)
    except CheckpointError:
        return "no checkpoint was kept (none had been written); free some space and start again"
    return (f"{folder.name} is kept, the newest intact checkpoint; free some space and resume "
            "from it")


def resume_candidates(out_dir: Path) -> list[Path]:
    """The step folders a resume may start from, best first: the one the run folder stands for
    (``checkpoint.resolve_local``: ``latest``, or the newest step folder when ``latest`` is
    gone), then every older step folder, newest first."""
    folders = checkpoint.step_folders(out_dir)
    if not folders and not (out_dir / checkpoint.LATEST_NAME).exists():
        raise CheckpointError(f"{out_dir} holds no training run to resume; drop `resume` to "
                              "start one there, or pass the `out_dir` of the run to continue")
    try:
        first = checkpoint.resolve_local(out_dir)
    except CheckpointError as err:
        if not folders:
            raise
        note(f"{err}; trying the step folders")
        first = None
    rest = [f for f in reversed(folders) if first is None or f.resolve() != first.resolve()]
    return ([first] if first is not None else []) + rest


def recorded_settings(folder: Path) -> dict[str, Any]:
    """What the run of step folder ``folder`` trained with: its ``TrainConfig`` (from the
    training state) and, when it has a ``run.json``, its data (``dataset``, ``limit``,
    ``eval_limit``) — the keys ``config.check_resume`` compares."""
    try:
        meta = json.loads((folder / STATE_DIR / "state.json").read_text())
        saved = dict(meta["train_config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder} has no readable training state ({err}); it cannot be "
                              "resumed") from err
    try:
        record = checkpoint.read_run_record(folder)
    except CheckpointError:  # a damaged record: the training state alone is compared
        record = None
    if record is not None and isinstance(record.get("dataset"), dict):
        ds = record["dataset"]
        saved.update(dataset=ds.get("name") or ds.get("path"), limit=ds.get("limit"),
                     eval_limit=ds.get("eval_limit"))
    if record is not None and record.get("total_steps") is not None:
        saved["total_steps"] = record["total_steps"]
    return saved


def load_newest_intact(out_dir: Path, raw: nn.Module, ema_model: nn.Module | None,
                       optimizer: torch.optim.Optimizer, scaler: Any
                       ) -> tuple[Path, dict[str, Any]]:
    """``load_training_state`` from the first intact ``resume_candidates`` folder; a damaged one
    (missing or truncated file, bad checksum) is skipped with a note. A checkpoint of another
    model is an error at once (an older one would be too)."""
    errors = []
    for folder in resume_candidates(out_dir):
        try:
            checkpoint.read_config(folder)
        except CheckpointError as err:
            errors.append((folder, err))
            continue
        checkpoint.check_config_matches(raw, folder)
        try:
            meta = load_training_state(folder, raw, ema_model, optimizer, scaler)
        except CheckpointError as err:
            errors.append((folder, err))
            continue
        for bad, err in errors:
            note(f"skipping damaged checkpoint {bad.name} ({err}); resuming from {folder.name}")
        return folder, meta
    detail = "; ".join(f"{f.name}: {e}" for f, e in errors[:2])
    raise CheckpointError(f"{out_dir} has no intact checkpoint to resume from ({detail}); start "
                          "a new `out_dir`")


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
                              "be resumed — start a new `out_dir`") from err
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
                              f"{str(err).splitlines()[0]}; resume with the same `model` and "
                              "settings or pick a new `out_dir`") from err
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta
