"""THE on-disk format of a zoo checkpoint; every reader and writer of one goes through here.

A checkpoint is a directory holding exactly:

- ``config.json``: ``{"architecture": <class name>, "format_version": 1, "preset": <zoo name or
  null>, "config": {<the config dataclass>}}``;
- ``model.safetensors``: every persistent tensor of the model, with a SHA-256 of the tensor data in
  the file's metadata so that a corrupted file is caught.

A training run folder (``attnflow train --out``) holds checkpoints ``step-NNNNNNN/`` and a file
``latest`` naming the newest; wherever a checkpoint is expected, the run folder stands for it
(``resolve_local``). Reading is strict: safetensors only (a pickle is never read), the
architecture and format version must match, every config key must be a field of the config
dataclass, the tensors must match the model's persistent state one to one, and the checksum must
hold. Any violation is a ``CheckpointError`` with a sentence saying what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _remove_duplicate_names, load_file, save_file
from torch import Tensor, nn

from ._io import atomic_path, atomic_write_text
from .errors import CheckpointError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUM_KEY = "attnflow_zoo_sha256"
#: The file in a training output folder that names its newest checkpoint folder.
LATEST_NAME = "latest"
STEP_PREFIX = "step-"
#: What a training run really did (data, sizes, recipe, hardware, time, metrics): written by
#: training into the run folder and into every step folder, read by the model card.
RUN_RECORD_NAME = "run.json"
RUN_RECORD_FORMAT = 1


# --- config.json ---------------------------------------------------------------------------
def config_to_dict(config: Any) -> dict[str, Any]:
    """The config dataclass as JSON-plain data (fails at save time if a field is not)."""
    if not dataclasses.is_dataclass(config):
        raise CheckpointError(f"{type(config).__name__} is not a config dataclass; zoo models "
                              "take one config dataclass")
    # A JSON round trip: fails at save time (not load time) on a non-JSON field, and turns
    # tuples into lists exactly as they will be read back.
    return json.loads(json.dumps(dataclasses.asdict(config)))


def write_config(directory: str | os.PathLike[str], architecture: str, config: Any,
                 preset: str | None = None) -> Path:
    """Write ``config.json`` into ``directory`` (atomically)."""
    payload = {"architecture": architecture, "format_version": FORMAT_VERSION, "preset": preset,
               "config": config_to_dict(config)}
    return atomic_write_text(Path(directory) / CONFIG_NAME,
                             json.dumps(payload, indent=2, sort_keys=True))


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint, with its envelope keys checked."""
    path = Path(directory) / CONFIG_NAME
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); the checkpoint is "
                              "corrupted, save it again") from err
    if not isinstance(payload, dict) or "architecture" not in payload:
        raise CheckpointError(f"{path} names no architecture; it was not written by "
                              "attnflow_zoo (save models with save_pretrained)")
    allowed = {"architecture", "format_version", "preset", "config"}
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise CheckpointError(f"{path} has unknown top-level key(s) {', '.join(unknown)}; "
                              f"expected only {', '.join(sorted(allowed))}")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}, this attnflow_zoo reads "
                              f"version {FORMAT_VERSION}; use a matching attnflow_zoo release")
    if not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"{path} has no `config` object")
    return payload


def config_from_dict(config_cls: type, data: dict[str, Any], where: str | Path) -> Any:
    """Build ``config_cls`` from JSON; unknown keys are an error (never silently dropped), a
    missing key takes ``config_cls.LEGACY_DEFAULTS[key]`` if there is one, else its default
    (with a warning either way)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{where} has config key(s) {', '.join(unknown)} unknown to "
                              f"{config_cls.__name__}; the checkpoint comes from another version "
                              "or architecture")
    missing = sorted(k for k, f in fields.items() if k not in data and f.init)
    no_default = [k for k in missing if fields[k].default is dataclasses.MISSING
                  and fields[k].default_factory is dataclasses.MISSING]
    if no_default:
        raise CheckpointError(f"{where} lacks required config key(s) {', '.join(no_default)} "
                              f"of {config_cls.__name__}")
    legacy = {k: v for k, v in getattr(config_cls, "LEGACY_DEFAULTS", {}).items()
              if k in missing}
    if missing:
        # A key added later: its value for older checkpoints is the config class's
        # LEGACY_DEFAULTS entry (what the absence meant when they were written), else the default.
        warnings.warn(f"{where} lacks config key(s) {', '.join(missing)}; using "
                      + ", ".join(f"{k}={legacy[k]!r}" if k in legacy else f"{k}=default"
                                  for k in missing), stacklevel=3)
        data = {**legacy, **data}
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: values are used as they are
        hints = {}
    values = {k: _decode_value(hints.get(k), v) for k, v in data.items()}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: invalid {config_cls.__name__}: {err}") from err


def _decode_value(hint: Any, value: Any) -> Any:
    # JSON has no tuples and no nested dataclasses: restore them from the field's type.
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(value, list):
            tuple_args = [a for a in args if typing.get_origin(a) is tuple]
            if tuple_args:
                return _decode_value(tuple_args[0], value)
        return _decode_value(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value, "<nested config>")  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_value(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_decode_value(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    return value


def check_config_matches(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """``CheckpointError`` unless ``directory``'s config.json describes ``model``'s architecture
    and config exactly (read through the same codec as loading)."""
    payload = read_config(directory)
    ours = type(model).__name__
    if payload["architecture"] != ours:
        raise CheckpointError(f"the checkpoint {directory} is a {payload['architecture']}, not "
                              f"the {ours} being trained; resume with the same `model` and "
                              "settings or pick a new `out_dir`")
    saved = payload["config"]
    current = config_to_dict(model.config)  # type: ignore[attr-defined]
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}={saved.get(k)!r} there vs {current.get(k)!r} here"
                           for k in diff[:4])
        raise CheckpointError(f"the checkpoint {directory} is a model with different {detail}; "
                              "resume with the same `model` and settings or pick a new "
                              "`out_dir`")


# --- model.safetensors ---------------------------------------------------------------------
def tensor_checksum(state: dict[str, Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike[str],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors with their checksum in the metadata, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {}), CHECKSUM_KEY: tensor_checksum(state)}
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp), metadata=meta)
        except SafetensorError as err:  # the writer's I/O error (a full disk): an OSError here
            raise _os_error(err) from err
    return Path(path)


def _os_error(err: Exception) -> OSError:
    """safetensors' write error as the ``OSError`` it wraps ("… (os error 28) …" -> ENOSPC)."""
    text = str(err)
    match = re.search(r"os error (\d+)", text)
    if match:
        return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
    return OSError(text.splitlines()[0] if text else type(err).__name__)


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the model's persistent state (shared tensors once) as checksummed safetensors."""
    state = model.state_dict()
    for names in _remove_duplicate_names(state).values():
        for name in names:
            state.pop(name)
    return save_tensors(state, path)


def read_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                 ) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, its checksum verified when the file carries one.

    ``CheckpointError`` for a missing, truncated, garbled or corrupted file.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: truncated or garbled
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file (missing, truncated "
                              f"or corrupted: {first}); download or save it again") from err
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != tensor_checksum(state):
        raise CheckpointError(f"{path} is corrupted (its tensor data does not match the "
                              "checksum stored in it); download or save it again")
    return state


def load_weights_strict(model: nn.Module, path: str | os.PathLike[str],
                        map_location: str | torch.device = "cpu") -> None:
    """Copy ``path``'s tensors into ``model``; every persistent tensor must match, by name and
    shape, and the data checksum (when present) must hold. The model is left in eval mode."""
    state = read_tensors(path, map_location)
    check_state_matches(model, state, path)
    model.load_state_dict(state, strict=False)
    model.to(map_location)  # load_state_dict copied into the parameters where they were built
    model.eval()


def check_state_matches(model: nn.Module, state: dict[str, Tensor], where: str | Path) -> None:
    """``CheckpointError`` unless ``state`` holds exactly the model's persistent tensors (shared
    tensors once), with the same shapes."""
    expected = model.state_dict()
    dropped = {n for names in _remove_duplicate_names(expected).values() for n in names}
    wanted = set(expected) - dropped
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {_few(unexpected)}")
    mismatched = [f"{n} {tuple(state[n].shape)} vs {tuple(expected[n].shape)}"
                  for n in sorted(wanted & set(state)) if state[n].shape != expected[n].shape]
    if mismatched:
        problems.append(f"shape mismatch (file vs config) for {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{where} does not match {type(model).__name__}'s config: "
                              f"{'; '.join(problems)}. The weights and config.json come from "
                              "different models; re-save the checkpoint with save_pretrained")


def _few(names: list[str], k: int = 4) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def save_model_files(model: nn.Module, directory: str | os.PathLike[str],
                     preset: str | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` of ``model`` into ``directory``."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_NAME)
    write_config(directory, type(model).__name__, model.config, preset)  # type: ignore
    return directory


# --- run.json: what a training run really did ----------------------------------------------
def write_run_record(directory: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``run.json`` into ``directory`` atomically (``format`` is added).

    The record is JSON-plain; its keys (all optional but ``format``): ``preset``,
    ``architecture``, ``dataset`` ({"name": a table key or None, "path": a local folder or
    None, "train_split", "num_train", "heldout_split", "num_heldout", "validation_split",
    "num_validation", "limit", "image_shape"}), ``train_config`` (``TrainConfig.to_dict()``),
    ``recipe`` (the preset's recipe name, or None), ``world_size``, ``device`` (e.g.
    "NVIDIA H200" or "cpu"), ``torch``, ``attnflow_zoo`` (versions), ``started`` (ISO time),
    ``wall_seconds``, ``step``, ``samples_seen``, ``metrics`` (a list of {"name", "split",
    "value", "step", "num_images", "protocol"}) and ``best`` ({"step", "split", "bpd"}).

    Added by training (all optional to readers): ``dataset`` also has "eval_limit" and
    "limit_rule" (how ``limit`` picks images: ``data.LIMIT_RULE``; "validation_split" is
    "carved from train" when the validation images come out of the training split);
    ``best`` also has "num_images", "path" (the folder, "best") and, once scored at the end,
    "test_bpd"; ``total_steps`` (the length asked for); ``status`` ("running", "finished",
    "interrupted" or "failed", with ``error``: its one-line message); ``segments`` (one
    {"started", "from_step", "host"} per start or resume; ``started`` is the first's and
    ``wall_seconds`` sums them, from the first step to the latest write).

    Which weights ``metrics`` describes: in a step folder (and ``best/``), that folder's; in the
    run folder, those of the newest checkpoint. ``step`` and ``samples_seen`` (= step × batch)
    are those weights' too.
    """
    payload = {**record, "format": RUN_RECORD_FORMAT}
    return atomic_write_text(Path(directory) / RUN_RECORD_NAME,
                             json.dumps(payload, indent=2, sort_keys=True))


def read_run_record(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``run.json`` of a checkpoint (its step folder first, then the run folder above it),
    or None when the checkpoint was not written by training (e.g. ``save_pretrained``)."""
    directory = Path(directory)
    for folder in (directory, directory.parent):
        path = folder / RUN_RECORD_NAME
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path} is not readable JSON ({err}); the run record is "
                                      "damaged — delete it to publish without it") from err
            if not isinstance(record, dict) or record.get("format") != RUN_RECORD_FORMAT:
                raise CheckpointError(f"{path} is not a run record of this attnflow_zoo "
                                      f"(format {RUN_RECORD_FORMAT})")
            return record
    return None


# --- where a checkpoint is -----------------------------------------------------------------
def looks_like_path(name: str) -> bool:
    """True if ``name`` is meant as a local path and must never be sent to the Hub."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if name.count(os.sep) > 1 or os.path.exists(name):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def step_folders(run: str | os.PathLike[str]) -> list[Path]:
    """The ``step-N`` checkpoint folders of a training run folder, oldest first."""
    return sorted(p for p in Path(run).glob(f"{STEP_PREFIX}*") if p.is_dir())


def resolve_local(path: str | os.PathLike[str]) -> Path:
    """The local directory holding ``config.json`` and ``model.safetensors``.

    A checkpoint directory is used as it is; a training run folder stands for the checkpoint its
    ``latest`` file names (or, if that file is missing, its newest ``step-N`` folder). This is
    the one place that rule lives.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; pass a directory "
                              "written by save_pretrained (or a Hub repo id like user/name)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).is_file():
        latest = path / LATEST_NAME
        if latest.is_file():
            named = path / latest.read_text().strip()
            if not named.is_dir():
                raise CheckpointError(f"{latest} names {named.name}, which does not exist; the "
                                      "training folder is damaged — pass a step-N folder in it")
            path = named
        elif step_folders(path):
            path = step_folders(path)[-1]
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {CONFIG_NAME} (nor the "
                              f"'{LATEST_NAME}' file of a training folder); pass a directory "
                              "written by save_pretrained or by training (its `out_dir`)")
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME} (attnflow_zoo reads only "
                              "safetensors; pickle checkpoints are never loaded); pass a "
                              "directory written by save_pretrained")
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved once (``Checkpoint.open``): its directory and its ``config.json``;
    its run record is read when first asked for. What the layers above a command take instead
    of a path, so that none of them resolves or reads the same checkpoint again."""

    directory: Path
    payload: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """The checkpoint at ``path`` (a run folder stands for its latest, ``resolve_local``)."""
        directory = resolve_local(path)
        return cls(directory, read_config(directory))

    @property
    def architecture(self) -> str:
        return self.payload["architecture"]

    @property
    def preset(self) -> str | None:
        """The zoo entry the model was built from (None: not a zoo preset)."""
        return self.payload.get("preset")

    @property
    def name(self) -> str:
        return self.directory.name

    @functools.cached_property
    def run(self) -> dict[str, Any] | None:
        """Its ``run.json`` (``read_run_record``), None when training did not write it."""
        return read_run_record(self.directory)

    @property
    def step(self) -> int | None:
        """The training step of its weights: the run record's, else its ``step-N`` folder name;
        None for a checkpoint not written by training."""
        if self.run is not None and isinstance(self.run.get("step"), int):
            return self.run["step"]
        match = re.fullmatch(rf"{STEP_PREFIX}(\d+)", self.directory.name)
        return int(match.group(1)) if match else None

    def build(self, cls: type, map_location: str | torch.device = "cpu") -> Any:
        """``cls`` from this config.json, its weights loaded strictly."""
        if self.architecture != cls.__name__:
            raise CheckpointError(
                f"{self.directory / CONFIG_NAME} is a {self.architecture} checkpoint, not "
                f"{cls.__name__}; load it with attnflow_zoo.load_model or "
                f"{self.architecture}.from_pretrained")
        config = config_from_dict(cls.config_type(),  # type: ignore[attr-defined]
                                  self.payload["config"], self.directory / CONFIG_NAME)
        model = cls(config, preset=self.preset)
        load_weights_strict(model, self.directory / WEIGHTS_NAME, map_location)
        return model


def load_directory(cls: type, directory: str | os.PathLike[str],
                   map_location: str | torch.device = "cpu") -> Any:
    """Build ``cls`` from a checkpoint directory's config.json and load its weights strictly."""
    directory = Path(directory)
    return Checkpoint(directory, read_config(directory)).build(cls, map_location)
