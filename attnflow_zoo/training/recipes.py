"""Recipes -> training settings: the zoo entry's ``Recipe`` (registry) as a ``TrainConfig``.

The rule, the same for one process and for ``torchrun --nproc-per-node N``:

- the batch is the GLOBAL batch (each of N processes takes batch / N rows), so N processes train
  the model one process would; a batch that does not split over N is refused;
- the lr is the recipe's at that global batch and is never rescaled (override it together with
  the batch if you change the batch);
- the warm-up is stated in images, as the papers count it, and becomes
  ceil(warmup_images / batch) optimizer steps, so it lasts as many images at any batch;
- ``steps`` wins over ``epochs``; overriding one drops the other.

Overrides are recipe fields (``batch_size``, ``lr``, ``warmup_images``, ``epochs``, ``steps``,
``max_shift``, ``ema_decay``, ...) or ``TrainConfig`` fields (``checkpoint_every``, ``seed``,
``warmup_steps``, ...); a ``TrainConfig`` field given explicitly wins over what the recipe makes
of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import factory, registry
from ..data import datasets
from ..errors import ConfigError
from ..registry import Recipe
from ..settings import TrainingSettings, legacy_settings
from .distributed import DistContext

if TYPE_CHECKING:
    from .config import TrainConfig

#: TrainConfig fields a recipe sets (compared when a run is checked against its recipe): the
#: shared vocabulary, and the two a recipe states its own way (a warm-up in images, the shift).
RECIPE_SETTINGS = (*(f.name for f in dataclasses.fields(TrainingSettings)), "warmup_steps",
                   "augment")


@dataclass(frozen=True)
class Plan:
    """A zoo entry resolved once for a run: its registry entry, its recipe with the overrides
    applied (None for an entry without one), the ``TrainConfig`` they make and the
    architecture overrides. A command makes it (``plan``) and passes it down; nothing below
    looks the entry up again."""

    entry: registry.ModelEntry
    recipe: Recipe | None
    config: TrainConfig
    model_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes, from a build on the meta device."""
        return tuple(factory.meta_build(self.entry.model_cls, registry.entry_config(
            self.entry, **self.model_overrides)).input_shape)


def plan(preset: str, *, world_size: int | None = None,
         model_overrides: dict[str, Any] | None = None, **overrides: Any) -> Plan:
    """Resolve zoo entry ``preset`` for a run: its recipe with ``overrides`` (recipe or
    ``TrainConfig`` fields, module rule) as a ``TrainConfig`` for ``world_size`` processes
    (None: torchrun's, else 1); an entry without a recipe gets ``TrainConfig(**overrides)``.
    ``model_overrides`` are architecture config fields (checked when the model is built)."""
    from .config import TrainConfig

    in_recipe, in_train = split_overrides(overrides)
    entry = registry.get_entry(preset)
    if entry.recipe is None:  # e.g. a preset registered by user code
        return Plan(entry, None, TrainConfig(**overrides), dict(model_overrides or {}))
    recipe = entry.recipe.replace(**in_recipe)
    config = config_from_recipe(recipe, world_size or DistContext.from_env().world_size,
                                **in_train)
    return Plan(entry, recipe, config, dict(model_overrides or {}))


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe fields, TrainConfig-only fields) of ``overrides``; ``ConfigError`` naming the
    valid keys for any other."""
    from .config import TrainConfig

    recipe_keys = registry.recipe_fields() - {"name", "source", "task", "dataset"}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - recipe_keys - train_keys)
    if unknown:
        raise ConfigError(f"unknown recipe/training setting(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(recipe_keys | train_keys))}")
    in_recipe = {k: v for k, v in overrides.items() if k in recipe_keys}
    return in_recipe, {k: v for k, v in overrides.items() if k not in recipe_keys}


def warmup_steps(warmup_images: int, batch_size: int) -> int:
    """Optimizer steps of a warm-up over ``warmup_images`` images at a global batch."""
    return math.ceil(warmup_images / batch_size)


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """The ``TrainConfig`` fields a (density) recipe sets (module rule), unchecked, as a run
    records them (``betas`` a list)."""
    shared = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(TrainingSettings)}
    return {**shared, "epochs": None if recipe.steps is not None else recipe.epochs,
            "betas": None if recipe.betas is None else list(recipe.betas),
            "lr": float(recipe.lr), "weight_decay": float(recipe.weight_decay),
            "noise_std": float(recipe.noise_std),
            "class_loss_weight": float(recipe.class_loss_weight),
            "class_lr_scale": float(recipe.class_lr_scale),
            "warmup_steps": warmup_steps(recipe.warmup_images, recipe.batch_size),
            "augment": recipe.max_shift > 0 or recipe.flip is not False}


def config_from_recipe(recipe: Recipe, world_size: int = 1, **train_overrides: Any
                       ) -> TrainConfig:
    """The ``TrainConfig`` of a (density) recipe for ``world_size`` processes (module rule)."""
    from .config import TrainConfig

    if recipe.task != "density":
        raise ConfigError(f"recipe {recipe.name!r} is Zha et al.'s invertibility experiment: "
                          "run it with `attnflow validate`, not `attnflow train`")
    if world_size < 1 or recipe.batch_size % world_size:
        raise ConfigError(f"the global batch {recipe.batch_size} does not split over "
                          f"{world_size} processes; set batch_size to a multiple of "
                          f"{world_size} (and the lr with it) or run another number of "
                          "processes")
    return TrainConfig(**{**recipe_settings(recipe), **train_overrides})


def train_config(preset: str, world_size: int | None = None, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of zoo entry ``preset``'s recipe, with ``overrides`` (module rule);
    an entry without a recipe gets ``TrainConfig(**overrides)`` (its defaults).

    Example: ``train_config("attnflow_imap_cifar10_mixlog")`` gives Adamax 8e-4, batch 64,
    warm-up 157 steps (10,000 images), 400 epochs, shift ≤ 3 px, EMA 0.999; under torchrun
    with 4 processes each takes 16 rows of the same batch of 64.

    Args:
        preset: a zoo entry name.
        world_size: the number of processes (None: ``WORLD_SIZE`` of torchrun, else 1).
        **overrides: recipe or ``TrainConfig`` fields, e.g. ``steps=20``.
    """
    return plan(preset, world_size=world_size, **overrides).config


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["steps=20", "ema_decay=none", "flip=false", "lr=1e-3"]`` -> a dict of typed values
    (JSON numbers and booleans, ``none``/``null`` -> None, anything else a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"`settings` take key=value, got {item!r} (e.g. steps=20)")
        text = text.strip()
        if text.lower() in ("none", "null"):
            value: Any = None
        elif text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
        out[key] = value
    return out


def parse_settings(items: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` items (``parse_assignments``) as (recipe / ``TrainConfig`` overrides,
    architecture overrides): ``model.KEY=value`` sets the architecture's field KEY."""
    assigned = parse_assignments(items)
    model = {k.removeprefix("model."): v for k, v in assigned.items() if k.startswith("model.")}
    return {k: v for k, v in assigned.items() if not k.startswith("model.")}, model


# --- how a recipe reads -----------------------------------------------------------------------
def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _flip_text(recipe: Recipe) -> str:
    if recipe.flip is not None:
        return "flip" if recipe.flip else "no flip"
    if recipe.dataset is None:
        return "flip: data's rule"
    return "flip" if datasets.default_flip(recipe.dataset) else "no flip"


def _length(recipe: Recipe) -> str:
    n, unit = (recipe.steps, "step") if recipe.steps is not None else (recipe.epochs, "epoch")
    return f"{n:,} {unit}" + ("s" if n != 1 else "")


def summary(recipe: Recipe | None) -> str:
    """One compact line, e.g. ``adamax 8e-4 · b64 · 400 ep · wu 10k img · shift 3, flip ·
    EMA 0.999``."""
    if recipe is None:
        return "-"
    length = f"{recipe.steps} steps" if recipe.steps is not None else f"{recipe.epochs} ep"
    parts = [f"{recipe.optimizer} {recipe.lr:g}", f"b{recipe.batch_size}", length]
    if recipe.noise_std:
        parts.append(f"noise σ {recipe.noise_std:g}")
    if recipe.warmup_images:
        parts.append(f"wu {_count(recipe.warmup_images)} img")
    if recipe.task == "invertibility":
        parts.insert(0, "invertibility")
        if recipe.train_limit:
            parts.append(f"first {recipe.train_limit} img")
        return " · ".join(parts)
    aug = [f"shift {recipe.max_shift}"] if recipe.max_shift else []
    parts.append(", ".join([*aug, _flip_text(recipe)]))
    if recipe.ema_decay is not None:
        parts.append(f"EMA {recipe.ema_decay:g}")
    if recipe.precision != "fp32":
        parts.append(recipe.precision)
    return " · ".join(parts)


def describe(recipe: Recipe) -> list[str]:
    """The recipe as sentences for a model card."""
    lines = [f"Recipe `{recipe.name}`. Source: {recipe.source}"]
    if recipe.task == "invertibility":
        limit = f" on the first {recipe.train_limit} training images" if recipe.train_limit \
            else ""
        length = _length(recipe)
        return [*lines, f"{recipe.optimizer.capitalize()}, lr {recipe.lr:g}, batch "
                        f"{recipe.batch_size}, {length}{limit} (run by `attnflow validate`)."]
    warm = (f"linear warm-up over {recipe.warmup_images:,} images "
            f"(= {warmup_steps(recipe.warmup_images, recipe.batch_size)} steps at this batch)"
            if recipe.warmup_images else "no warm-up")
    length = _length(recipe)
    flips = {"flip": "horizontal flips", "no flip": "no flips",
             "flip: data's rule": "flips by the dataset's rule"}[_flip_text(recipe)]
    aug = (f"random shift <= {recipe.max_shift} px (edge padding), {flips}" if recipe.max_shift
           else flips)
    ema = (f"EMA of the weights, decay {recipe.ema_decay:g} (the published weights are the EMA)"
           if recipe.ema_decay is not None else "no EMA")
    fid = (f"; FID of {recipe.fid_num_samples:,} samples at temperature "
           f"{recipe.fid_temperature:g} against the {recipe.fid_reference_split} split's "
           "Inception statistics" if recipe.fid_num_samples else "")
    return [*lines,
            f"{_optimizer_text(recipe)}, lr {recipe.lr:g} after {warm}; {recipe.schedule} "
            "lr after it; the lr is not rescaled with the batch.",
            _noise_text(recipe),
            f"Global batch {recipe.batch_size} (split over the processes under torchrun), "
            f"{length}, {recipe.precision}"
            + (f", gradient norm clipped at {recipe.grad_clip:g}" if recipe.grad_clip else "")
            + ".",
            f"Augmentation: {aug}; {ema}.",
            f"Scoring: {recipe.eval_split}-split bits/dim ({recipe.bpd_estimator} "
            f"dequantisation estimate){fid}."]


def _optimizer_text(recipe: Recipe) -> str:
    name = {"adamax": "Adamax", "adam": "Adam", "adamw": "AdamW"}[recipe.optimizer]
    betas = f" betas ({recipe.betas[0]:g}, {recipe.betas[1]:g})" if recipe.betas else ""
    decay = f", weight decay {recipe.weight_decay:g}" if recipe.weight_decay else ""
    return f"{name}{betas}{decay}"


def _noise_text(recipe: Recipe) -> str:
    if not recipe.noise_std:
        return ("Input: uniform dequantisation (a likelihood recipe: its bits/dim is a "
                "discrete-data bits/dim).")
    return (f"Input: the 8-bit bins' centres plus Gaussian noise σ = {recipe.noise_std:g} in "
            "model space (a sample-quality recipe: the checkpoint's bits/dim is not a "
            "discrete-data bits/dim and is not comparable with likelihood checkpoints).")


def deviations(recipe: Recipe, run: dict[str, Any]) -> list[str]:
    """How a run (its ``run.json``) departs from ``recipe``: one phrase per setting."""
    used = legacy_settings(run.get("train_config") or {})
    out = []
    dataset = (run.get("dataset") or {})
    trained_on = dataset.get("name") or dataset.get("path")
    if recipe.dataset is not None and trained_on and trained_on != recipe.dataset:
        out.append(f"trained on {trained_on} (recipe: {recipe.dataset})")
    if dataset.get("limit"):
        out.append(f"only the first {dataset['limit']} training images")
    if not used or recipe.task != "density":
        return out
    wanted = recipe_settings(recipe)
    for key in RECIPE_SETTINGS:
        if key not in used or (key == "flip" and recipe.flip is None):
            continue
        if key in ("steps", "epochs") and used.get("steps") is not None:
            if key == "epochs":
                continue
            if wanted.get("steps") != used["steps"]:
                length = (f"{wanted['steps']} steps" if wanted.get("steps") is not None
                          else f"{wanted['epochs']} epochs")
                out.append(f"steps {used['steps']} (recipe: {length})")
            continue
        if used[key] != wanted.get(key):
            out.append(f"{key} {used[key]} (recipe: {wanted.get(key)})")
    return out
