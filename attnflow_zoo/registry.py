"""The zoo as data: presets registered by name, created with overrides (timm-style)."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    """One zoo entry: a preset name, its model class and a factory of its config."""

    name: str
    model_cls: type
    make_config: Callable[[], Any]
    description: str = ""
    hub_repo: str | None = None
    card: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(model_cls: type, *, hub_repo: str | None = None, card: str | None = None
                   ) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register the config factory ``fn`` under ``fn.__name__`` for ``model_cls``.

    The factory's docstring's first line becomes the entry's description.
    """

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(name, model_cls, fn, doc[0] if doc else "", hub_repo,
                                     card or name)
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered presets matching a shell-style ``pattern``."""
    _load_all()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ``ConfigError`` naming close matches if unknown."""
    _load_all()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} `attnflow models` lists the zoo.")
    return _REGISTRY[name]


def make_config(name: str, **overrides: Any) -> Any:
    """The preset's config dataclass with ``overrides`` applied (unknown keys are an error)."""
    cfg = get_entry(name).make_config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{type(cfg).__name__} has no field(s) {', '.join(unknown)}; "
                          f"valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **overrides)


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> Any:
    """Build preset ``name`` with config ``overrides``; ``pretrained`` loads its Hub weights.

    The model remembers its preset (``model.zoo_preset``), which ``save_pretrained`` writes into
    ``config.json`` so that ``attnflow push`` finds the preset's model card.
    """
    entry = get_entry(name)
    if pretrained:
        if entry.hub_repo is None:
            raise ConfigError(f"no pretrained weights are published for {name!r} yet; "
                              "train it with `attnflow train` or pass a repo to load_model")
        if overrides:
            raise ConfigError("overrides cannot be combined with pretrained=True")
        model = entry.model_cls.from_pretrained(entry.hub_repo)
    else:
        model = entry.model_cls(make_config(name, **overrides))
    model.zoo_preset = name
    return model


def model_class(architecture: str) -> type:
    """The zoo class named ``architecture`` (a ``config.json`` architecture name).

    Registered presets' classes come first; any other class inheriting ``ZooHubMixin`` is found
    too (e.g. a model defined in user code). ``CheckpointError`` if none has that name.
    """
    from .errors import CheckpointError
    from .hub import _ARCHITECTURES

    _load_all()
    for entry in _REGISTRY.values():
        if entry.model_cls.__name__ == architecture:
            return entry.model_cls
    if architecture in _ARCHITECTURES:
        return _ARCHITECTURES[architecture]
    known = sorted({e.model_cls.__name__ for e in _REGISTRY.values()})
    raise CheckpointError(f"unknown architecture {architecture!r} in config.json; this "
                          f"attnflow_zoo knows {', '.join(known) or 'no architectures'} "
                          "(is the checkpoint from a newer release?)")


def entries() -> list[ModelEntry]:
    """Every registered entry, sorted by name."""
    _load_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _load_all() -> None:
    # Importing the models package runs every @register_model.
    from . import models  # noqa: F401


def describe_models(pattern: str = "*", count_params: bool = True) -> list[dict[str, str]]:
    """One row per preset (name, class, parameter count, Hub repo, description), for listings.

    Counting parameters builds each model on the ``meta`` device, so no memory is allocated;
    a model whose construction cannot run on ``meta`` is built on the CPU instead.
    """
    import torch

    rows = []
    for name in list_models(pattern):
        entry = _REGISTRY[name]
        params = "-"
        if count_params:
            try:
                with torch.device("meta"):
                    model = entry.model_cls(entry.make_config())
            except (RuntimeError, NotImplementedError):
                # A layer whose __init__ reads tensor values (e.g. `.item()` on a mask) cannot
                # be built on meta: build it for real on the CPU instead (slower, same count).
                model = entry.model_cls(entry.make_config())
            n = sum(p.numel() for p in model.parameters())
            params = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
        rows.append({"name": name, "class": entry.model_cls.__name__, "params": params,
                     "hub_repo": entry.hub_repo or "", "description": entry.description})
    return rows
