"""Hugging Face Hub integration of every zoo model class: ``ZooHubMixin`` and resolving a repo id.

``ZooHubMixin`` is thin over ``checkpoint`` (the on-disk format and its strict reader): it adds
the Hub mixin's ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` entry points and
registers each subclass's architecture name, so ``factory.load_model`` finds any zoo class.

Offline without saying so (``online.unreachable``): a repo id is then read from the local cache
only, so a cached repo loads at once and a missing one is one line, with no retries.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import PyTorchModelHubMixin

from . import checkpoint, registry
from .errors import CheckpointError
from .online import endpoint, unreachable

T = TypeVar("T", bound="ZooHubMixin")


class ZooHubMixin(
    PyTorchModelHubMixin,
    library_name="attnflow_zoo",
    tags=["normalizing-flows", "attnflow_zoo"],
    license="apache-2.0",
):
    """Hub save/load for zoo models: checksummed safetensors plus the config dataclass as JSON.

    No pipeline tag here: the card (``publishing.modelcard.render_card``) gives each model its
    own, and a class-conditional model none (the Hub has no class-conditional image generation
    task).

    The class's constructor takes one config dataclass and the preset's name,
    ``__init__(self, config: <Arch>Config, *, preset: str | None = None)`` (or set the class
    attribute ``config_class``). The model's ``zoo_preset`` (the preset it
    was built with, ``models.base.ZooModel``) is saved in ``config.json`` so that a checkpoint
    knows which model card is its own.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry.register_architecture(cls)

    # --- saving -----------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``model.safetensors`` (with a data checksum) and ``config.json``."""
        checkpoint.save_model_files(self, save_directory,  # type: ignore[arg-type]
                                    getattr(self, "zoo_preset", None))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """A short stub card for ``save_pretrained``: the architecture and preset, nothing it
        cannot know. The zoo's full card (``publishing.modelcard``: data, recipe, metrics) is
        rendered from a checkpoint and its run record by the publishing layer."""
        from huggingface_hub import ModelCard

        preset = getattr(self, "zoo_preset", None)
        name = type(self).__name__
        return ModelCard(
            "---\nlibrary_name: attnflow_zoo\ntags:\n- normalizing-flows\n- attnflow_zoo\n---\n\n"
            f"# {preset or name}\n\nAn `attnflow_zoo` `{name}` checkpoint"
            f"{f' (preset `{preset}`)' if preset else ''}: `config.json` and `model.safetensors`. "
            "Load it with `attnflow_zoo.load_model(path_or_repo_id)`. Its full model card "
            "(data, recipe, metrics) is written by `attnflow card` or `attnflow push`.\n")

    @classmethod
    def config_type(cls) -> type:
        """The config dataclass the constructor takes (``config_class`` or the annotation)."""
        explicit = getattr(cls, "config_class", None)
        if explicit is not None:
            return explicit
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception as err:  # noqa: BLE001 - an unresolved forward reference
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
        return checkpoint.load_directory(cls, directory, map_location)

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


def resolve_checkpoint(repo_id_or_path: str | os.PathLike[str], *, revision: str | None = None,
                       cache_dir: str | Path | None = None, force_download: bool = False,
                       local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """The local directory holding ``config.json`` and ``model.safetensors``: a local path by
    ``checkpoint.resolve_local`` (a run folder stands for its latest checkpoint), a repo id
    fetched into (or read from) the HF cache."""
    name = os.fspath(repo_id_or_path)
    if isinstance(repo_id_or_path, os.PathLike) or checkpoint.looks_like_path(name):
        return checkpoint.resolve_local(name)
    return _download(name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                     local_files_only=local_files_only, token=token)


def open_checkpoint(repo_id_or_path: str | os.PathLike[str] | checkpoint.Checkpoint,
                    **hub_options: Any) -> checkpoint.Checkpoint:
    """The checkpoint a command names (a local path, a run folder or a Hub repo id, fetched as
    ``resolve_checkpoint`` does), resolved once; an open one is returned as it is."""
    if isinstance(repo_id_or_path, checkpoint.Checkpoint):
        return repo_id_or_path
    directory = resolve_checkpoint(repo_id_or_path, **hub_options)
    return checkpoint.Checkpoint.open(directory)


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
    if not kwargs.get("local_files_only") and unreachable():
        if kwargs.get("force_download"):
            raise CheckpointError(f"cannot download Hub repo {repo_id!r} again: the Hub at "
                                  f"{endpoint()} cannot be reached; check the network or "
                                  "HF_ENDPOINT")
        kwargs["local_files_only"] = True  # the cache answers at once (no 25 s of retries)
    paths = {}
    for fname in (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME):
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
                    "loaded)") if fname == checkpoint.WEIGHTS_NAME else ""
            raise CheckpointError(f"Hub repo {repo_id!r} has no {fname}{hint}") from err
        except OSError as err:  # HTTP errors and the like
            raise CheckpointError(f"could not fetch {fname} of Hub repo {repo_id!r}: "
                                  f"{str(err).splitlines()[0]}") from err
    if paths[checkpoint.CONFIG_NAME].parent != paths[checkpoint.WEIGHTS_NAME].parent:
        raise CheckpointError(f"{checkpoint.CONFIG_NAME} and {checkpoint.WEIGHTS_NAME} of "
                              f"{repo_id!r} come from different revisions; retry with an "
                              "explicit revision")
    return paths[checkpoint.CONFIG_NAME].parent

