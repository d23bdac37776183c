"""The zoo as data: presets by name (config, training recipe, published weights), and
architecture names -> classes (timm-style).

A leaf of the house: it imports only ``errors``. The model modules register their presets here
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

from .errors import CheckpointError, ConfigError

TASKS = ("density", "invertibility")
OPTIMIZERS = ("adamax", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Recipe:
    """How a zoo entry is trained and scored: plain data next to its architecture.

    ``training.recipes.train_config`` turns a recipe into a ``TrainConfig``: the batch is the
    GLOBAL batch (all processes together, kept under torchrun), the lr is used as it is at that
    batch (never rescaled), and the warm-up, stated in images as the papers count it, becomes
    ceil(warmup_images / batch_size) optimizer steps.

    Attributes:
        name: short id of the recipe (recorded in run.json and shown on the card).
        source: where its numbers come from, and which choices are the zoo's own.
        task: "density" (maximum likelihood, ``attnflow train``) or "invertibility" (Zha et
            al.'s MSE experiment, run by ``attnflow validate``).
        dataset: the dataset the recipe is for (a key of the data table), None for any.
        optimizer: "adamax", "adam" or "adamw" (decoupled weight decay).
        betas: the optimizer's (β₁, β₂); None: torch's default for it.
        weight_decay: the optimizer's weight decay (0: none).
        lr: learning rate after warm-up, at ``batch_size``.
        warmup_images: linear warm-up from 0, in training images.
        batch_size: global batch.
        epochs: training length in passes over the training split (``steps`` wins).
        steps: training length in optimizer steps.
        schedule: "constant" or "cosine" after warm-up.
        noise_std: σ > 0 trains on x + σ·ε, ε ~ N(0, I), around the 8-bit bins' centres in
            model-space units (TarFlow's noise augmentation for sample quality; SPEC §6);
            0: uniform dequantisation (a likelihood recipe, discrete-data bits/dim).
        max_shift: random translation ≤ ``max_shift`` px (0: no augmentation).
        flip: horizontal flips; None: the dataset's rule (on for CIFAR-10 and CelebA, off for
            digits and local folders).
        ema_decay: EMA of the weights (the published weights are the EMA), None: no EMA.
        precision: "fp32", "bf16" or "fp16" (autocast on CUDA).
        grad_clip: max global gradient norm, None: no clipping.
        train_limit: train on the first N training images only (None: all).
        eval_split: the split the headline metric is reported on.
        bpd_estimator: "single-sample" or "importance-weighted" dequantisation estimate.
        fid_num_samples: samples of the FID (None: the entry reports no FID).
        fid_temperature: prior temperature of those samples.
        fid_reference_split: the split whose Inception statistics the samples are compared with.
        class_loss_weight: w_y, the weight of a class-conditional model's class-head
            cross-entropy in bits per image, added to the bits/dim loss (Glow's ``weight_y``;
            ``TrainConfig.class_loss_weight``); 0: likelihood only.
        class_lr_scale: a class-conditional model's class parameters train at lr × this
            (``TrainConfig.class_lr_scale``); no effect on an unconditional model.
    """

    name: str
    source: str
    task: str = "density"
    dataset: str | None = None
    optimizer: str = "adamax"
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0
    lr: float = 8e-4
    warmup_images: int = 10_000
    batch_size: int = 64
    epochs: int | None = None
    steps: int | None = None
    schedule: str = "constant"
    noise_std: float = 0.0
    max_shift: int = 3
    flip: bool | None = None
    ema_decay: float | None = 0.999
    precision: str = "fp32"
    grad_clip: float | None = None
    train_limit: int | None = None
    eval_split: str = "test"
    bpd_estimator: str = "single-sample"
    fid_num_samples: int | None = 50_000
    fid_temperature: float = 1.0
    fid_reference_split: str = "train"
    class_loss_weight: float = 0.0
    class_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # JSON / --set give a list
            object.__setattr__(self, "betas", tuple(self.betas))
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        for name, allowed in (("task", TASKS), ("optimizer", OPTIMIZERS),
                              ("precision", PRECISIONS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"recipe {name} must be one of {', '.join(allowed)}, got "
                                  f"{getattr(self, name)!r}")
        if self.steps is None and self.epochs is None:
            raise ConfigError(f"recipe {self.name!r} needs a training length: steps or epochs")

    def _check_numbers(self) -> None:
        for name in ("batch_size", "epochs", "steps", "train_limit", "fid_num_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ConfigError(f"recipe {name} must be a positive integer, got {value!r}")
        for name in ("warmup_images", "max_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"recipe {name} must be an integer ≥ 0, got {value!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise ConfigError(f"recipe lr must be a positive number, got {self.lr!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"recipe ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not (isinstance(self.class_lr_scale, int | float) and self.class_lr_scale > 0):
            raise ConfigError(f"recipe class_lr_scale must be positive, got "
                              f"{self.class_lr_scale!r}")
        if not (isinstance(self.class_loss_weight, int | float) and self.class_loss_weight >= 0):
            raise ConfigError(f"recipe class_loss_weight must be ≥ 0, got "
                              f"{self.class_loss_weight!r}")
        if not (isinstance(self.fid_temperature, int | float) and self.fid_temperature > 0):
            raise ConfigError(f"recipe fid_temperature must be positive, got "
                              f"{self.fid_temperature!r}")
        for name in ("weight_decay", "noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ConfigError(f"recipe {name} must be a number ≥ 0, got {value!r}")
        if self.betas is not None and not (isinstance(self.betas, tuple) and len(self.betas) == 2
                                           and all(
                isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"recipe betas must be two numbers in [0, 1), got {self.betas!r}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (recipe fields only; checked again)."""
        unknown = sorted(set(changes) - recipe_fields())
        if unknown:
            raise ConfigError(f"Recipe has no field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

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
