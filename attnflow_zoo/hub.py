"""Hugging Face Hub integration shared by every zoo model class: strict save and load.

Every model class inherits ``ZooHubMixin`` (through ``FlowModel`` or directly). A checkpoint is a
directory (local, or a Hub repo) holding exactly:

- ``config.json``: ``{"architecture": <class name>, "format_version": 1, "preset": <zoo name or
  null>, "config": {<the config dataclass>}}``;
- ``model.safetensors``: every persistent tensor of the model, with a SHA-256 of the tensor data in
  the file's metadata so that a corrupted file is caught.

Loading is strict: safetensors only (a pickle is never read), the architecture and format version
must match, every config key must be a field of the config dataclass, and the tensors must match
the model's persistent state one to one, name and shape. Any violation is a ``CheckpointError``
with a sentence saying what to do, never a model with silently random layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import PyTorchModelHubMixin

from .errors import CheckpointError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUM_KEY = "attnflow_zoo_sha256"

T = TypeVar("T", bound="ZooHubMixin")

# Every class that inherits the mixin, by class name: how ``load_model`` finds an architecture.
_ARCHITECTURES: dict[str, type] = {}


class ZooHubMixin(
    PyTorchModelHubMixin,
    library_name="attnflow_zoo",
    tags=["normalizing-flows", "attnflow_zoo"],
):
    """Hub save/load for zoo models: safetensors weights plus the config dataclass as JSON.

    The class's constructor takes one config dataclass, ``__init__(self, config: <Arch>Config)``
    (or set the class attribute ``config_class``). ``zoo_preset`` (set by ``create_model``) is
    saved in ``config.json`` so that a checkpoint knows which model card is its own.
    """

    zoo_preset: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _ARCHITECTURES[cls.__name__] = cls

    # --- saving -----------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``model.safetensors`` (with a data checksum) and ``config.json``."""
        from safetensors.torch import _remove_duplicate_names, save_model

        path = Path(save_directory) / WEIGHTS_NAME
        state = self.state_dict()  # type: ignore[attr-defined]
        # save_model stores shared tensors once; hash exactly what lands in the file.
        for names in _remove_duplicate_names(state).values():
            for name in names:
                state.pop(name)
        save_model(self, str(path), force_contiguous=True,  # type: ignore[arg-type]
                   metadata={"format": "pt", CHECKSUM_KEY: _tensor_checksum(state)})
        payload = {
            "architecture": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "preset": getattr(self, "zoo_preset", None),
            "config": _config_to_dict(self._get_config()),
        }
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(payload, indent=2,
                                                                   sort_keys=True))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The zoo's card (``cards/``) for this model, written by ``save_pretrained``."""
        from .modelcard import render_card

        return render_card(architecture=type(self).__name__, config=self._get_config(),
                           preset=getattr(self, "zoo_preset", None),
                           repo_id=kwargs.get("repo_id", "<user>/<repo>"))

    def _get_config(self) -> Any:
        config = getattr(self, "config", None)
        if config is None or not dataclasses.is_dataclass(config):
            raise CheckpointError(f"{type(self).__name__} has no config dataclass in "
                                  "`self.config`; zoo models take one config dataclass")
        return config

    @classmethod
    def config_type(cls) -> type:
        """The config dataclass the constructor takes (``config_class`` or the annotation)."""
        explicit = getattr(cls, "config_class", None)
        if explicit is not None:
            return explicit
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception as err:  # unresolved forward reference
            raise CheckpointError(f"cannot resolve the config type of {cls.__name__}: {err}; "
                                  "set `config_class` on the class") from err
        config_cls = hints.get("config")
        if config_cls is None or not dataclasses.is_dataclass(config_cls):
            raise CheckpointError(f"{cls.__name__}.__init__ must annotate `config` with its "
                                  "config dataclass (or set `config_class`)")
        return config_cls

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[T],
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str = "cpu",
        **unused: Any,
    ) -> T:
        """Load a checkpoint strictly from a Hub repo id or a local directory.

        Raises:
            CheckpointError: missing path or repo, a non-safetensors checkpoint, another
                architecture, an unknown config key, or weights that do not match the config.
        """
        if unused:
            raise CheckpointError(f"unexpected argument(s) {', '.join(sorted(unused))}; "
                                  "a zoo checkpoint carries its whole config")
        directory = resolve_checkpoint(pretrained_model_name_or_path, revision=revision,
                                       cache_dir=cache_dir, force_download=force_download,
                                       local_files_only=local_files_only, token=token)
        return cls._load_directory(directory, map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None,  # type: ignore
                         cache_dir: str | Path | None = None, force_download: bool = False,
                         local_files_only: bool = False, token: str | bool | None = None,
                         map_location: str = "cpu", **unused: Any) -> Any:
        # The mixin's default falls back to pytorch_model.bin (a pickle) and loads non-strictly;
        # every path into loading goes through the strict loader instead.
        return cls.from_pretrained(model_id, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download,
                                   local_files_only=local_files_only, token=token,
                                   map_location=map_location)

    @classmethod
    def _load_directory(cls: type[T], directory: Path, map_location: str = "cpu") -> T:
        payload = read_config(directory)
        if payload["architecture"] != cls.__name__:
            raise CheckpointError(
                f"{directory / CONFIG_NAME} is a {payload['architecture']} checkpoint, not "
                f"{cls.__name__}; load it with attnflow_zoo.load_model or "
                f"{payload['architecture']}.from_pretrained")
        config = _config_from_dict(cls.config_type(), payload["config"], directory / CONFIG_NAME)
        model = cls(config)  # type: ignore[call-arg]
        model.zoo_preset = payload.get("preset")
        load_weights_strict(model, directory / WEIGHTS_NAME, map_location)
        return model


def load_model(repo_id_or_path: str | os.PathLike[str], *, revision: str | None = None,
               cache_dir: str | Path | None = None, local_files_only: bool = False,
               token: str | bool | None = None, map_location: str = "cpu") -> Any:
    """Load any zoo checkpoint; the class is found from ``config.json``'s architecture name.

    Example: ``model = attnflow_zoo.load_model("user/attnflow-imap-cifar10")``.
    """
    from .registry import model_class

    directory = resolve_checkpoint(repo_id_or_path, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
    cls = model_class(read_config(directory)["architecture"])
    return cls._load_directory(directory, map_location=map_location)


# --- resolving a checkpoint ----------------------------------------------------------------
def looks_like_path(name: str) -> bool:
    """True if ``name`` is meant as a local path and must never be sent to the Hub."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if name.count(os.sep) > 1 or os.path.exists(name):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


#: The file in a training output folder that names its newest checkpoint folder.
LATEST_NAME = "latest"


def resolve_checkpoint(repo_id_or_path: str | os.PathLike[str], *, revision: str | None = None,
                       cache_dir: str | Path | None = None, force_download: bool = False,
                       local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """The local directory holding ``config.json`` and ``model.safetensors``.

    A local directory is used as it is, except a training output folder (``attnflow train
    --out``), which stands for the checkpoint its ``latest`` file names; a repo id is fetched
    into (or read from) the HF cache. This is the one place that rule lives.
    """
    name = os.fspath(repo_id_or_path)
    if isinstance(repo_id_or_path, os.PathLike) or looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint directory {path} does not exist; pass a directory "
                                  "written by save_pretrained (or a Hub repo id like user/name)")
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        latest = path / LATEST_NAME
        if not (path / CONFIG_NAME).is_file() and latest.is_file():
            path = path / latest.read_text().strip()
            if not path.is_dir():
                raise CheckpointError(f"{latest} names {path.name}, which does not exist; the "
                                      "training folder is damaged — pass a step-N folder in it")
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path} is not a checkpoint: it has no {CONFIG_NAME} (nor the "
                                  f"'{LATEST_NAME}' file of a training folder); pass a directory "
                                  "written by save_pretrained or by `attnflow train --out`")
        for fname in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / fname).is_file():
                hint = (" (attnflow_zoo reads only safetensors; pickle checkpoints are never "
                        "loaded)") if fname == WEIGHTS_NAME else ""
                raise CheckpointError(f"{path} has no {fname}{hint}; pass a directory written "
                                      "by save_pretrained")
        return path
    return _download(name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                     local_files_only=local_files_only, token=token)


def _download(repo_id: str, **kwargs: Any) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is neither an existing directory nor a valid Hub "
                              "repo id (user/name)") from err
    paths = {}
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[fname] = Path(hf_hub_download(repo_id, fname, **kwargs))
        # LocalEntryNotFoundError subclasses EntryNotFoundError: test it first.
        except RepositoryNotFoundError as err:
            raise CheckpointError(f"Hub repo {repo_id!r} not found (or private: log in with "
                                  "`hf auth login`)") from err
        except RevisionNotFoundError as err:
            raise CheckpointError(f"revision {kwargs.get('revision')!r} not found in Hub repo "
                                  f"{repo_id!r}") from err
        except LocalEntryNotFoundError as err:
            raise CheckpointError(f"{fname} of Hub repo {repo_id!r} is not in the local cache "
                                  "and the Hub cannot be reached (offline?); download it once "
                                  "online or pass a local directory") from err
        except EntryNotFoundError as err:
            hint = (" (attnflow_zoo reads only safetensors; pickle checkpoints are never "
                    "loaded)") if fname == WEIGHTS_NAME else ""
            raise CheckpointError(f"Hub repo {repo_id!r} has no {fname}{hint}") from err
        except OSError as err:  # HTTP errors and the like
            raise CheckpointError(f"could not fetch {fname} of Hub repo {repo_id!r}: "
                                  f"{str(err).splitlines()[0]}") from err
    if paths[CONFIG_NAME].parent != paths[WEIGHTS_NAME].parent:
        raise CheckpointError(f"{CONFIG_NAME} and {WEIGHTS_NAME} of {repo_id!r} come from "
                              "different revisions; retry with an explicit revision")
    return paths[CONFIG_NAME].parent


# --- config.json ---------------------------------------------------------------------------
def read_config(directory: Path) -> dict[str, Any]:
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


def _config_to_dict(config: Any) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    json.dumps(out)  # fail at save time, not at load time, if a field is not JSON-plain
    return out


def _config_from_dict(config_cls: type, data: dict[str, Any], where: Path) -> Any:
    """Build ``config_cls`` from JSON; unknown keys are an error (the mixin drops them)."""
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
    if missing:
        warnings.warn(f"{where} lacks config key(s) {', '.join(missing)}; using the defaults",
                      stacklevel=3)
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:
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
        return _decode_value(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _config_from_dict(hint, value, Path("<nested config>"))  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_value(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_decode_value(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    return value


# --- model.safetensors ---------------------------------------------------------------------
def _tensor_checksum(state: dict[str, Any]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_weights_strict(model: Any, path: Path, map_location: str = "cpu") -> None:
    """Copy ``path``'s tensors into ``model``; every persistent tensor must match, by name and
    shape, and the data checksum (when present) must hold. The model is left in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import _remove_duplicate_names, load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device=map_location)
    except Exception as err:  # SafetensorError, OSError: truncated or garbled file
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"corrupted: {str(err).splitlines()[0]}); download or save it "
                              "again") from err
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
        raise CheckpointError(f"{path} does not match {type(model).__name__}'s config: "
                              f"{'; '.join(problems)}. The weights and config.json come from "
                              "different models; re-save the checkpoint with save_pretrained")
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != _tensor_checksum(state):
        raise CheckpointError(f"{path} is corrupted (its tensor data does not match the "
                              "checksum stored in it); download or save it again")
    result = model.load_state_dict(state, strict=False)
    leftover = set(result.missing_keys) - dropped
    if leftover:  # pragma: no cover - guarded above
        raise CheckpointError(f"{path}: tensors {_few(sorted(leftover))} were not loaded")
    model.to(map_location)  # load_state_dict copied into the parameters where they were built
    model.eval()


def _few(names: list[str], k: int = 4) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


# --- pushing -------------------------------------------------------------------------------
def check_round_trip(model: Any, num_images: int = 4, seed: int = 0) -> float:
    """Max |inverse(forward(x)) − x| on a few dequantised random images; raises
    ``CheckpointError`` above half a quantisation step (1/512), where samples would change.

    A model with its own check (``model.check_invertibility()`` returning the error, e.g. the
    fixed-point validator) uses that instead.
    """
    import torch

    from . import data

    own = getattr(model, "check_invertibility", None)
    if callable(own):
        err = float(own())
    else:
        shape = getattr(model, "input_shape", None) or getattr(model, "image_shape", None)
        if shape is None:
            raise CheckpointError(f"{type(model).__name__} has no input_shape; cannot check "
                                  "its round trip before pushing")
        gen = torch.Generator().manual_seed(seed)
        x_u8 = torch.randint(0, 256, (num_images, *shape), generator=gen, dtype=torch.uint8)
        x = (data.dequantize(x_u8, generator=gen) - 0.5).to(_device_of(model))
        with torch.no_grad():
            out = model(x)
            # Density models return (z, logdet); a bare bijection (the validator) returns z.
            z, logdet = out if isinstance(out, tuple) else (out, None)
            x_rec = model.inverse(z)
        if logdet is not None and not torch.isfinite(logdet).all():
            raise CheckpointError("the checkpoint gives a non-finite log-determinant; "
                                  "refusing to push it")
        err = (x_rec - x).abs().max().item()
    if not err <= 1 / 512:
        raise CheckpointError(f"the checkpoint's round trip inverse(forward(x)) is off by {err:.3g}"
                              " (more than 1/512); refusing to push a model that does not invert")
    return err


def _device_of(model: Any) -> Any:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return "cpu"


def push_checkpoint(checkpoint: str | os.PathLike[str], repo_id: str, *,
                    metrics: dict[str, Any] | None = None, private: bool = False,
                    preset: str | None = None, token: str | None = None,
                    commit_message: str | None = None) -> str:
    """Check a local checkpoint and upload exactly config.json, model.safetensors, README.md.

    The checkpoint is loaded strictly, its round trip is checked (``check_round_trip``), the model
    card is rendered from ``cards/`` (with ``metrics``, see ``modelcard.render_card``) and the
    three files go to ``repo_id`` in one commit. Returns the commit URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .modelcard import render_card

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub repo id (user/name)") from err
    if "/" not in repo_id:
        raise CheckpointError(f"give the repo with its owner, e.g. user/{repo_id}")
    name = os.fspath(checkpoint)
    directory = resolve_checkpoint(Path(name) if not looks_like_path(name) else name)
    model = load_model(directory)
    check_round_trip(model)
    payload = read_config(directory)
    card = render_card(architecture=payload["architecture"], config=model.config,
                       preset=preset or payload.get("preset"), repo_id=repo_id, metrics=metrics)
    operations = [
        CommitOperationAdd(CONFIG_NAME, str(directory / CONFIG_NAME)),
        CommitOperationAdd(WEIGHTS_NAME, str(directory / WEIGHTS_NAME)),
        CommitOperationAdd("README.md", str(card).encode("utf-8")),
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=commit_message
                                 or f"Upload {payload['architecture']} with attnflow_zoo")
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"upload to {repo_id!r} failed: {str(err).splitlines()[0]}"
                              ) from err
    return str(info.commit_url)
