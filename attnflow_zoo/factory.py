"""Building and loading zoo models: ``create_model``, ``load_model``, ``list_models``.

Importing this module imports every architecture module, which registers the zoo's presets in
``registry``; everything else here reads the registry.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import checkpoint, registry
from .hub import open_checkpoint
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

    The model is built with its preset's name (``model.zoo_preset``), which ``save_pretrained``
    writes into ``config.json`` so that a checkpoint finds its model card.
    """
    return build_model(registry.get_entry(name), **overrides)


def build_model(entry: registry.ModelEntry, **overrides: Any) -> Any:
    """The model of a registry entry already looked up, with config ``overrides``."""
    return entry.model_cls(registry.entry_config(entry, **overrides), preset=entry.name)


def load_model(repo_id_or_path: str | os.PathLike[str] | checkpoint.Checkpoint, *,
               revision: str | None = None, cache_dir: str | Path | None = None,
               local_files_only: bool = False, token: str | bool | None = None,
               map_location: str = "cpu") -> Any:
    """Load any zoo checkpoint; the class is found from ``config.json``'s architecture name.

    Example: ``model = attnflow_zoo.load_model("user/attnflow-imap-cifar10")``. A training run
    folder stands for its latest checkpoint; an open ``checkpoint.Checkpoint`` is read as it is.
    """
    ckpt = open_checkpoint(repo_id_or_path, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, token=token)
    return load_checkpoint(ckpt, map_location)


def load_checkpoint(ckpt: checkpoint.Checkpoint, map_location: str = "cpu") -> Any:
    """The model of an open checkpoint (its class by ``config.json``'s architecture name)."""
    return ckpt.build(registry.architecture(ckpt.architecture), map_location)


def meta_build(model_cls: type, config: Any) -> Any:
    """``model_cls(config)`` on the ``meta`` device: its shapes, with no memory allocated and no
    initialiser run (every preset builds there; tests/test_zoo.py keeps it so)."""
    with torch.device("meta"), _NoInitialisers():
        return model_cls(config)


def _count_text(n: int) -> str:
    """A parameter count as listings show it: 1.23M, 45.6k or 789."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the zoo is built and dropped preset by preset: the
    tens of thousands of modules made it run again and again (a third of the listing's time);
    what they leave is collected once at the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


def count_parameters(model_cls: type, config: Any) -> int:
    """The parameters of ``model_cls(config)``, counted on a ``meta_build``."""
    return sum(p.numel() for p in meta_build(model_cls, config).parameters())


class _NoInitialisers(TorchFunctionMode):
    """Skips the in-place initialisers (``torch.nn.init``, ``Tensor.normal_`` ...): a meta
    tensor holds no values, so they change nothing there, and the meta device runs each of
    them through Python."""

    SKIPPED = frozenset({
        *(f for name, f in vars(torch.nn.init).items()
          if name.endswith("_") and not name.startswith("_") and callable(f)),
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_})

    #: Random draws on the meta device: an empty tensor of the size asked for (the values
    #: are not kept there anyway).
    DRAWS = frozenset({torch.randn, torch.rand})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            target = args[0] if args else kwargs["tensor"]
            if target.is_meta:
                return target
        if func in self.DRAWS and _on_meta(kwargs):
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        if func is torch.norm_except_dim and args[0].is_meta:
            # weight_norm's g = ‖v‖ over every dim but ``dim``: its shape only.
            v, dim = args[0], args[2] if len(args) > 2 else kwargs.get("dim", 0)
            return v.new_empty([n if i == dim else 1 for i, n in enumerate(v.shape)])
        return func(*args, **kwargs)


def _on_meta(kwargs: dict[str, Any]) -> bool:
    """Whether a factory call with ``kwargs`` makes a tensor on the meta device (the device
    context's default, or asked for)."""
    device = kwargs.get("device")
    return torch.device(device).type == "meta" if device is not None else \
        torch.get_default_device().type == "meta"


def describe_models(pattern: str = "*", count_params: bool = True) -> list[dict[str, str]]:
    """One row per preset (name, class, parameter count, description), for listings.

    Parameters are counted on the ``meta`` device (``count_parameters``), once per distinct
    architecture config.
    """
    counted: dict[tuple[type, Any], int] = {}
    rows = []
    with _collector_paused():
        for name in list_models(pattern):
            entry = registry.get_entry(name)
            params = "-"
            if count_params:
                key = (entry.model_cls, entry.config)
                if key not in counted:
                    counted[key] = count_parameters(*key)
                params = _count_text(counted[key])
            rows.append({"name": name, "class": entry.model_cls.__name__, "params": params,
                         "description": entry.description})
    return rows
