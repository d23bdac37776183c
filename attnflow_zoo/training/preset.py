"""``train_preset``: a zoo entry, resolved into a ``recipes.Plan``, trained on a dataset by name
or folder (what ``attnflow train`` runs). Every check runs before the data is loaded and before
anything is written."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, registry
from .._io import check_writable
from ..core import resolve_device
from ..data import datasets
from ..errors import CheckpointError, ConfigError, DataError
from ..factory import build_model
from .config import TrainConfig, check_device, check_resume
from .datasets import data_record, run_settings
from .lock import check_unlocked
from .loop import FitResult, fit
from .recipes import Plan
from .run import check_fresh, default_run_dir
from .state import recorded_settings, resume_candidates


def build_seeded(plan: Plan, seed: int, **more: Any) -> Any:
    """The plan's model with the global RNG forked and seeded by ``seed`` (the caller's RNG
    state is untouched), so the initial weights of a run depend on its seed only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(plan.entry, **{**plan.model_overrides, **more})


def train_preset(plan: Plan, dataset: str | os.PathLike[str], *,
                 out_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                 limit: int | None = None, eval_limit: int | None = None, device: str = "auto",
                 show_progress: bool | None = None, allow_changes: Iterable[str] = (),
                 conditional: bool = False) -> FitResult:
    """Build the zoo entry of ``plan`` (``recipes.plan``: its settings and architecture
    overrides; initial weights seeded by its ``seed``), load ``dataset`` at its image size
    (``limit`` / ``eval_limit``: seeded random subsets, ``datasets.LIMIT_RULE``) and ``fit`` it
    into ``out_dir`` (default ``runs/<entry>``).

    Every check (device, output folder, resume compatibility, data, image size) runs before
    anything is written to ``out_dir``. ``allow_changes``: the settings a resume may change.
    ``conditional``: make the model class-conditional on the dataset's labels (``num_classes``
    = the dataset's number of classes; a ``_cond_`` preset is conditional already). A
    class-conditional model trains on the dataset's labels.
    """
    allow_changes = tuple(allow_changes)
    if allow_changes and not resume:
        raise ConfigError("`allow_changes` only applies to `resume` (it allows a setting of the "
                          "run being resumed to change)")
    config = plan.config
    dev = resolve_device(device)
    check_device(config, dev)
    out = Path(out_dir) if out_dir is not None else default_run_dir(plan.name)
    check_writable(out, is_dir=True)
    model = build_seeded(plan, config.seed, **_classes(plan, dataset, conditional))
    if config.flip is None:
        config = config.replace(flip=datasets.default_flip(dataset))
    split = datasets.heldout_split(dataset)
    info = {"preset": plan.name, "recipe": getattr(plan.recipe, "name", None),
            "dataset": data_record(dataset, limit, split, eval_limit)}
    check_unlocked(out)
    if resume:
        _precheck_resume(out, model, config, info, allow_changes)
    else:
        check_fresh(out)
    shape = model.input_shape
    train, train_labels = datasets.load_labelled(dataset, "train", shape, limit=limit)
    heldout, heldout_labels = datasets.load_labelled(dataset, split, shape, limit=eval_limit) \
        if split else (None, None)
    return fit(model, train, config, eval_data=heldout, out_dir=out, resume=resume, device=dev,
               show_progress=show_progress, allow_changes=allow_changes, run_info=info,
               train_labels=train_labels, eval_labels=heldout_labels)


def _classes(plan: Plan, dataset: str | os.PathLike[str], conditional: bool) -> dict[str, Any]:
    """``num_classes`` from the dataset when a run is made class-conditional (else nothing),
    with ``conditional_overrides``."""
    if not conditional or plan.model_overrides.get("num_classes"):
        return {}
    found = datasets.count_classes(dataset)
    if not found:
        raise DataError(f"{dataset} has no class labels (no `label` column or class folders "
                        "root/{split}/{class}/), so `conditional` cannot train on it; drop "
                        "`conditional` or use a labelled dataset")
    more = {**plan.model_overrides, "num_classes": found}
    return {"num_classes": found, **conditional_overrides(plan.entry, more, plan.config)}


def conditional_overrides(entry: registry.ModelEntry, overrides: dict[str, Any],
                          config: TrainConfig) -> dict[str, Any]:
    """What ``conditional`` adds to a preset besides ``num_classes``: the class head that its
    training's ``class_loss_weight`` > 0 needs (Glow's y_cond). The couplings stay
    unconditioned, as in the ``_cond_`` presets: with the class loss, conditioned couplings let
    the top latent carry the label itself, and Bayes' rule gains nothing (README,
    "Class-conditional models")."""
    arch = registry.entry_config(entry, **overrides)
    if config.class_loss_weight > 0 and hasattr(arch, "class_head") \
            and "class_head" not in overrides:
        return {"class_head": True}
    return {}


def _precheck_resume(out: Path, model: Any, config: TrainConfig, info: dict[str, Any],
                     allow: tuple[str, ...]) -> None:
    """The resume checks of ``fit``, early (before the data loads), on the newest checkpoint; a
    damaged one is left to ``fit``, which falls back to an older one."""
    first = resume_candidates(out)[0]
    try:
        checkpoint.read_config(first)
        saved = recorded_settings(first)
    except CheckpointError:
        return
    checkpoint.check_config_matches(model, first)
    check_resume(saved, run_settings(config, info), allow)
