"""The zoo as data: presets by name, and architecture names -> classes (timm-style).

A leaf of the house: it imports only ``errors``. The model modules register their presets here
(``register_preset`` / ``register_model``) and every zoo class registers its architecture name
(``ZooHubMixin.__init_subclass__``); ``factory`` imports the model modules and builds from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ModelEntry:
    """One zoo entry: a preset name, its model class, its (frozen) config and a description."""

    name: str
    model_cls: type
    config: Any
    description: str = ""


_PRESETS: dict[str, ModelEntry] = {}
_ARCHITECTURES: dict[str, type] = {}


def register_preset(name: str, model_cls: type, config: Any, description: str = ""
                    ) -> ModelEntry:
    """Register ``config`` (a frozen config dataclass of ``model_cls``) as preset ``name``."""
    if name in _PRESETS:
        raise ConfigError(f"model {name!r} is registered twice")
    entry = ModelEntry(name, model_cls, config, description)
    _PRESETS[name] = entry
    return entry


def register_model(model_cls: type) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator form: register ``fn()`` under ``fn.__name__`` for ``model_cls``; the first line
    of the function's docstring is the entry's description."""

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        doc = (fn.__doc__ or "").strip().splitlines()
        register_preset(fn.__name__, model_cls, fn(), doc[0] if doc else "")
        return fn

    return wrap


def register_architecture(cls: type) -> None:
    """Record ``cls`` under its class name (the ``architecture`` of its ``config.json``)."""
    _ARCHITECTURES[cls.__name__] = cls


def preset_names(pattern: str = "*") -> list[str]:
    """Sorted names of the registered presets matching a shell-style ``pattern``."""
    return sorted(n for n in _PRESETS if fnmatch.fnmatchcase(n, pattern))


def get_entry(name: str) -> ModelEntry:
    """The entry of preset ``name``; ``ConfigError`` naming close matches if unknown."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} `attnflow models` lists the zoo.")
    return _PRESETS[name]


def preset_config(name: str, **overrides: Any) -> Any:
    """The preset's config with ``overrides`` applied (unknown keys are an error)."""
    cfg = get_entry(name).config
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{type(cfg).__name__} has no field(s) {', '.join(unknown)}; "
                          f"valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **overrides)


def architecture(name: str) -> type:
    """The zoo class named ``name`` (a ``config.json`` architecture); ``CheckpointError`` if no
    imported zoo class has that name."""
    if name not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES)) or "no architectures"
        raise CheckpointError(f"unknown architecture {name!r} in config.json; this attnflow_zoo "
                              f"knows {known} (is the checkpoint from a newer release?)")
    return _ARCHITECTURES[name]
