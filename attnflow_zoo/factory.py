"""Building and loading zoo models: ``create_model``, ``load_model``, ``list_models``.

Importing this module imports every architecture module, which registers the zoo's presets in
``registry``; everything else here reads the registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, registry
from .hub import resolve_checkpoint
from .models import (  # noqa: F401 - registers presets
    attnflow,
    attnflow_presets,
    resflow,
    tarflow,
    validator,
)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the zoo's presets matching a shell-style ``pattern``."""
    return registry.preset_names(pattern)


def create_model(name: str, **overrides: Any) -> Any:
    """Build preset ``name`` with config ``overrides`` (unknown keys are a ``ConfigError``).

    The model remembers its preset (``model.zoo_preset``), which ``save_pretrained`` writes into
    ``config.json`` so that a checkpoint finds its model card.
    """
    entry = registry.get_entry(name)
    model = entry.model_cls(registry.preset_config(name, **overrides))
    model.zoo_preset = name
    return model


def load_model(repo_id_or_path: str | os.PathLike[str], *, revision: str | None = None,
               cache_dir: str | Path | None = None, local_files_only: bool = False,
               token: str | bool | None = None, map_location: str = "cpu") -> Any:
    """Load any zoo checkpoint; the class is found from ``config.json``'s architecture name.

    Example: ``model = attnflow_zoo.load_model("user/attnflow-imap-cifar10")``. A training run
    folder stands for its latest checkpoint.
    """
    directory = resolve_checkpoint(repo_id_or_path, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)
    cls = registry.architecture(checkpoint.read_config(directory)["architecture"])
    return checkpoint.load_directory(cls, directory, map_location)


def describe_models(pattern: str = "*", count_params: bool = True) -> list[dict[str, str]]:
    """One row per preset (name, class, parameter count, description), for listings.

    Counting parameters builds each model on the ``meta`` device, so no memory is allocated;
    a model whose construction cannot run on ``meta`` is built on the CPU instead.
    """
    rows = []
    for name in list_models(pattern):
        entry = registry.get_entry(name)
        params = "-"
        if count_params:
            try:
                with torch.device("meta"):
                    model = entry.model_cls(entry.config)
            except (RuntimeError, NotImplementedError):
                # A layer whose __init__ reads tensor values cannot be built on meta: build it
                # for real on the CPU instead (slower, same count).
                model = entry.model_cls(entry.config)
            n = sum(p.numel() for p in model.parameters())
            params = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
        rows.append({"name": name, "class": entry.model_cls.__name__, "params": params,
                     "description": entry.description})
    return rows
