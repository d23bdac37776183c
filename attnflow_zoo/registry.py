"""The zoo as data: presets by name (config, training recipe, published weights), and
architecture names -> classes (timm-style).

A leaf of the house: it imports only ``errors`` and ``settings`` (the training vocabulary its
recipes are written in). The model modules register their presets here
(``register_preset`` / ``register_model``, each with its ``Recipe`` next to the architecture) and
every zoo class registers its architecture name (``ZooHubMixin.__init_subclass__``); ``factory``
imports the model modules and builds from here, ``recipes`` turns a recipe into a TrainConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, ConfigError, check_choice, check_positive_int
from .settings import TrainingSettings

TASKS = ("density", "invertibility")


@dataclass(frozen=True, kw_only=True)
class Recipe(TrainingSettings):
    """How a zoo entry is trained and scored: plain data next to its architecture.

    ``training.recipes.train_config`` turns a recipe into a ``TrainConfig``: the batch is the
    GLOBAL batch (all processes together, kept under torchrun), the lr is used as it is at that
    batch (never rescaled), and the warm-up, stated in images as the papers count it, becomes
    ceil(warmup_images / batch_size) optimizer steps. The settings a run shares with it
    (length, batch, optimizer, lr, schedule, EMA, augmentation, precision, ...) are
    ``settings.TrainingSettings``, with their defaults and checks; a recipe adds:

    Attributes:
        name: short id of the recipe (recorded in run.json and shown on the card).
        source: where its numbers come from, and which choices are the zoo's own.
        task: "density" (maximum likelihood, ``attnflow train``) or "invertibility" (Zha et
            al.'s MSE experiment, run by ``attnflow validate``).
        dataset: the dataset the recipe is for (a key of the data table), None for any.
        warmup_images: linear warm-up from 0, in training images.
        train_limit: train on the first N training images only (None: all).
        eval_split: the split the headline metric is reported on.
        bpd_estimator: "single-sample" or "importance-weighted" dequantisation estimate.
        fid_num_samples: samples of the FID (None: the entry reports no FID).
        fid_temperature: prior temperature of those samples.
        fid_reference_split: the split whose Inception statistics the samples are compared with.
    """

    name: str
    source: str
    task: str = "density"
    dataset: str | None = None
    warmup_images: int = 10_000
    train_limit: int | None = None
    eval_split: str = "test"
    bpd_estimator: str = "single-sample"
    fid_num_samples: int | None = 50_000
    fid_temperature: float = 1.0
    fid_reference_split: str = "train"

    def check_settings(self) -> None:
        """The shared checks, after the recipe's own: its task, and whole numbers where a
        recipe counts (recipes are written by hand and read from JSON)."""
        check_choice("recipe task", self.task, TASKS)
        for name in ("batch_size", "epochs", "steps", "train_limit", "fid_num_samples"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(f"recipe {name}", value)
        for name in ("warmup_images", "max_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"recipe {name} must be an integer ≥ 0, got {value!r}")
        if not (isinstance(self.fid_temperature, int | float)
                and 0 < self.fid_temperature < float("inf")):
            raise ConfigError(f"recipe fid_temperature must be a positive number, got "
                              f"{self.fid_temperature!r}")
        super().check_settings()

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (recipe fields only; checked again). A recipe has one length:
        setting ``steps`` drops ``epochs``, and back."""
        unknown = sorted(set(changes) - recipe_fields())
        if unknown:
            raise ConfigError(f"Recipe has no field(s) {', '.join(unknown)}")
        if changes.get("steps") is not None and "epochs" not in changes:
            changes["epochs"] = None
        if changes.get("epochs") is not None and "steps" not in changes:
            changes["steps"] = None
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as err:  # a value of the wrong type reaching a comparison
            raise ConfigError(f"invalid recipe setting: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-plain data."""
        return dataclasses.asdict(self)


#: The recipe of every density ``*_tiny`` preset: a short run on any data for the test suite.
TINY_RECIPE = Recipe(name="tiny-test", source="test-size preset: a short run for the test suite, "
                     "not for quality", lr=1e-3, warmup_images=160, batch_size=16, steps=100,
                     max_shift=1, ema_decay=0.99, fid_num_samples=256)


def recipe_fields() -> set[str]:
    """The names of ``Recipe``'s fields."""
    return {f.name for f in dataclasses.fields(Recipe)}


@dataclass(frozen=True)
class ModelEntry:
    """One zoo entry: a preset name, its model class, its (frozen) config, a description, its
    training recipe and the Hub repo of its published weights (None: no weights yet)."""

    name: str
    model_cls: type
    config: Any
    description: str = ""
    recipe: Recipe | None = None
    weights: str | None = None


_PRESETS: dict[str, ModelEntry] = {}
_ARCHITECTURES: dict[str, type] = {}


def register_preset(name: str, model_cls: type, config: Any, description: str = "", *,
                    recipe: Recipe | None = None, weights: str | None = None) -> ModelEntry:
    """Register ``config`` (a frozen config dataclass of ``model_cls``) as preset ``name``, with
    its training ``recipe`` and the Hub repo id of its published ``weights`` (if any)."""
    if name in _PRESETS:
        raise ConfigError(f"model {name!r} is registered twice")
    entry = ModelEntry(name, model_cls, config, description, recipe, weights)
    _PRESETS[name] = entry
    return entry


def register_model(model_cls: type, *, recipe: Recipe | None = None, weights: str | None = None
                   ) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator form: register ``fn()`` under ``fn.__name__`` for ``model_cls``; the first line
    of the function's docstring is the entry's description."""

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        doc = (fn.__doc__ or "").strip().splitlines()
        register_preset(fn.__name__, model_cls, fn(), doc[0] if doc else "", recipe=recipe,
                        weights=weights)
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
        if not _PRESETS:
            hint = (" No preset is registered yet: the model modules register them when "
                    "attnflow_zoo.factory is imported (az.create_model and az.list_models "
                    "import it).")
        raise ConfigError(f"unknown model {name!r}.{hint} `attnflow models` lists the zoo.")
    return _PRESETS[name]


def preset_config(name: str, **overrides: Any) -> Any:
    """The preset's config with ``overrides`` applied (unknown keys are an error)."""
    return entry_config(get_entry(name), **overrides)


def entry_config(entry: ModelEntry, **overrides: Any) -> Any:
    """An entry's config with ``overrides`` applied (unknown keys are an error)."""
    cfg = entry.config
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
