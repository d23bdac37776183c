"""``reproduce``: from a zoo entry to a published, comparable checkpoint in one resumable command.

Stages, each writing into the run folder (``--out``) and recorded in ``reproduce.json`` with
the inputs it ran on:

1. ``train``: the entry's recipe (``recipes``) trained by ``training.train_preset`` into
   ``step-N/`` checkpoints; an interrupted run resumes from its newest checkpoint.
2. ``evaluate``: held-out bits/dim and the standard FID (``scores.evaluate_checkpoint``)
   into ``metrics.json`` (the schema of ``results``), the reference statistics kept in
   ``fid/reference-<split>.npz``.
3. ``card``: ``README.md`` from the run record, ``metrics.json`` and the recipe, the papers'
   numbers beside the measured ones (a FID of random Inception weights is left off, with a note).
4. ``push`` (with a repo): the checkpoint and exactly that ``README.md``, in one commit.

A rerun skips every stage whose recorded inputs are unchanged and whose output exists, so a
killed job is continued by running the same command again; changed training settings in a
folder that already holds a run are refused (use another ``--out``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from .._io import atomic_write_text
from ..data import datasets
from ..errors import ConfigError
from ..evaluation import results, scores
from ..factory import create_model
from ..publishing import publish
from ..training import TrainConfig, recipes, train_preset
from ..training.distributed import DistContext
from ..training.run import default_run_dir

STATE_NAME = "reproduce.json"
METRICS_NAME = results.METRICS_NAME
STAGES = ("train", "evaluate", "card", "push")


@dataclass
class ReproduceResult:
    """Where each stage's output is, and which stages ran or were skipped."""

    run_dir: Path
    checkpoint: Path | None = None
    metrics: dict[str, Any] | None = None
    metrics_path: Path | None = None
    card_path: Path | None = None
    url: str | None = None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _digest(payload: Any) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


class _State:
    """``reproduce.json``: per stage, the inputs it ran on and what it wrote."""

    def __init__(self, run_dir: Path, write: bool) -> None:
        self.path = run_dir / STATE_NAME
        self.write = write
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.stages = json.loads(self.path.read_text(encoding="utf-8"))["stages"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{self.path} is damaged ({err}); delete it to redo every "
                                  "stage after training (training resumes from its "
                                  "checkpoints)") from err

    def done(self, stage: str, inputs: dict[str, Any], *outputs: Path) -> dict[str, Any] | None:
        entry = self.stages.get(stage)
        if entry and entry.get("done") and entry.get("inputs") == inputs and all(
                p.exists() for p in outputs):
            return entry
        return None

    def record(self, stage: str, inputs: dict[str, Any], done: bool, **outputs: Any) -> None:
        self.stages[stage] = {"inputs": inputs, "done": done, **outputs}
        for later in STAGES[STAGES.index(stage) + 1:]:
            if not done:
                self.stages.pop(later, None)
        if self.write:
            atomic_write_text(self.path, json.dumps({"format": 1, "stages": self.stages},
                                                    indent=2, sort_keys=True))


def _input_shape(preset: str, model_overrides: dict[str, Any]) -> tuple[int, ...]:
    try:
        with torch.device("meta"):
            return tuple(create_model(preset, **model_overrides).input_shape)
    except (RuntimeError, NotImplementedError):
        return tuple(create_model(preset, **model_overrides).input_shape)


def _total_steps(config: TrainConfig, dataset: Any, shape: tuple[int, ...],
                 limit: int | None) -> int:
    if config.steps is not None:
        return config.steps
    num = len(datasets.load_for_shape(dataset, "train", shape, limit=limit))  # type: ignore[arg-type]
    return config.epochs * (num // config.batch_size)  # type: ignore[operator]


def reproduce(preset: str, *, dataset: str | os.PathLike[str] | None = None,
              out_dir: str | os.PathLike[str] | None = None, repo_id: str | None = None,
              overrides: dict[str, Any] | None = None,
              model_overrides: dict[str, Any] | None = None, fid_samples: int | None = None,
              fid_reference_limit: int | None = None, limit: int | None = None,
              eval_limit: int | None = None,
              inception_weights: str | os.PathLike[str] | None = None,
              random_inception: bool = False, device: str = "auto", private: bool = False,
              until: str | None = None, show_progress: bool | None = None,
              log: Callable[[str], None] | None = None) -> ReproduceResult:
    """Train zoo entry ``preset`` with its recipe, score it, write its card, push it.

    Args:
        preset: a zoo entry (``attnflow models``).
        dataset: the data (default: the recipe's dataset); a table name or a local folder.
        out_dir: the run folder (default ``runs/<preset>``).
        repo_id: push to this Hub repo at the end (None: no push).
        overrides: recipe / ``TrainConfig`` settings, e.g. ``{"steps": 20}`` (``recipes``).
        model_overrides: architecture config fields, e.g. ``{"in_channels": 1}``.
        fid_samples: FID samples (default: the recipe's, 50,000; 0: no FID).
        fid_reference_limit: use only the first N reference images (stated in the metrics).
        limit, eval_limit: only the first N training / held-out images.
        inception_weights: the FID Inception weight file.
        random_inception: random Inception weights (pipeline tests; never shown on the card).
        device: "auto", "cpu", "cuda", ...
        private: create the Hub repo as private.
        until: stop after this stage (one of ``STAGES``).
        log: called with one line per stage.
    """
    say = log or (lambda _line: None)
    if until is not None and until not in STAGES:
        raise ConfigError(f"`until` must be one of {', '.join(STAGES)}, got {until!r}")
    if repo_id is not None:
        publish.check_repo_id(repo_id)
    in_recipe, in_train = recipes.split_overrides(dict(overrides or {}))
    recipe = recipes.apply_overrides(recipes.recipe_of(preset), in_recipe)
    config = recipes.config_from_recipe(recipe, DistContext.from_env().world_size, **in_train)
    dataset = dataset if dataset is not None else recipe.dataset
    if dataset is None:
        raise ConfigError(f"{preset}'s recipe names no dataset; pass `dataset` (a name or a "
                          "local folder)")
    model_overrides = dict(model_overrides or {})
    limit = limit if limit is not None else recipe.train_limit
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(preset)
    main = DistContext.from_env().is_main
    state = _State(run_dir, write=main)
    result = ReproduceResult(run_dir)
    shape = _input_shape(preset, model_overrides)

    # 1. train ------------------------------------------------------------------------------
    train_inputs = {"preset": preset, "dataset": scores.dataset_label(dataset),
                    "recipe": recipe.name, "train_config": config.to_dict(),
                    "model_overrides": model_overrides, "limit": limit, "eval_limit": eval_limit}
    previous = state.stages.get("train", {}).get("inputs")
    has_run = bool(checkpoint.step_folders(run_dir))
    if previous is not None and previous != train_inputs:
        diff = "; ".join(_differences(previous, train_inputs))
        raise ConfigError(f"{run_dir} holds a reproduce run with other settings ({diff}); rerun "
                          "with the same ones to continue it, or pick another `out_dir`")
    if previous is None and has_run:
        raise ConfigError(f"{run_dir} already holds a training run not started by "
                          "reproduce; pick another `out_dir`")
    entry = state.done("train", train_inputs)
    ckpt = checkpoint.resolve_local(run_dir) if has_run else None
    if entry is not None and ckpt is not None:
        say(f"train: done ({ckpt.name}), skipped")
        result.skipped.append("train")
    else:
        total = _total_steps(config, dataset, shape, limit)
        step = (scores.checkpoint_step(ckpt) or 0) if ckpt is not None else 0
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        state.record("train", train_inputs, False, started=started)
        if step < total:
            say(f"train: {'resuming from step ' + str(step) if ckpt else 'starting'}, "
                f"{total} steps of batch {config.batch_size} ({recipe.name})")
            fit = train_preset(preset, dataset, config, out_dir=run_dir, resume=ckpt is not None,
                               overrides=model_overrides, limit=limit, eval_limit=eval_limit,
                               device=device, show_progress=show_progress)
            if fit.checkpoint is None:  # another rank of a torchrun job: rank 0 goes on
                return result
        ckpt = checkpoint.resolve_local(run_dir)
        state.record("train", train_inputs, True, checkpoint=ckpt.name)
        result.ran.append("train")
    result.checkpoint = ckpt
    if not main or until == "train":
        return result

    # 2. evaluate ---------------------------------------------------------------------------
    num_fid = recipe.fid_num_samples if fid_samples is None else fid_samples
    split = recipe.eval_split if datasets.dataset_spec(dataset) else datasets.heldout_split(dataset)
    eval_inputs = {"checkpoint": ckpt.name, "split": split, "eval_limit": eval_limit,
                   "fid_samples": num_fid or 0, "fid_temperature": recipe.fid_temperature,
                   "fid_reference_split": recipe.fid_reference_split,
                   "fid_reference_limit": fid_reference_limit,
                   "inception_weights": str(inception_weights) if inception_weights else None,
                   "random_inception": random_inception}
    metrics_path = run_dir / METRICS_NAME
    if state.done("evaluate", eval_inputs, metrics_path):
        say(f"evaluate: done ({metrics_path.name}), skipped")
        result.skipped.append("evaluate")
        metrics = results.load_metrics(metrics_path)
    else:
        say(f"evaluate: {split} bits/dim" + (f" + FID of {num_fid} samples" if num_fid else ""))
        metrics = scores.evaluate_checkpoint(
            ckpt, dataset, split, limit=eval_limit, device=device, fid=bool(num_fid),
            num_samples=num_fid or 0, temperature=recipe.fid_temperature,
            fid_reference_split=recipe.fid_reference_split,
            fid_reference_limit=fid_reference_limit, inception_weights=inception_weights,
            random_inception=random_inception,
            statistics_out=run_dir / "fid" / f"reference-{recipe.fid_reference_split}.npz",
            show_progress=show_progress)
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        state.record("evaluate", eval_inputs, True, metrics=metrics_path.name)
        result.ran.append("evaluate")
    result.metrics, result.metrics_path = metrics, metrics_path
    if until == "evaluate":
        return result

    # 3. card -------------------------------------------------------------------------------
    card_path = run_dir / publish.CARD_NAME
    record = checkpoint.read_run_record(ckpt)
    card_inputs = {"checkpoint": ckpt.name, "metrics": _digest(metrics),
                   "run": _digest(record or {}), "repo_id": repo_id or publish.PLACEHOLDER_REPO}
    if state.done("card", card_inputs, card_path):
        say(f"card: done ({card_path.name}), skipped")
        result.skipped.append("card")
    else:
        shown, left_out = results.publishable(metrics)
        for note in left_out:
            say(f"card: not shown: {note}")
        publish.write_card(ckpt, card_path, repo_id, metrics=shown, preset=preset,
                           left_out=left_out)
        state.record("card", card_inputs, True, card=card_path.name)
        result.ran.append("card")
    result.card_path = card_path
    if until == "card" or repo_id is None:
        return result

    # 4. push -------------------------------------------------------------------------------
    text = card_path.read_text(encoding="utf-8")
    push_inputs = {"checkpoint": ckpt.name, "repo_id": repo_id, "card": _digest(text),
                   "private": private}
    entry = state.done("push", push_inputs)
    if entry is not None:
        say(f"push: done ({entry.get('url')}), skipped")
        result.skipped.append("push")
        result.url = entry.get("url")
        return result
    say(f"push: {ckpt.name} + {card_path.name} -> {repo_id}")
    url = publish.push_checkpoint(ckpt, repo_id, card=text, private=private)
    state.record("push", push_inputs, True, url=url)
    result.ran.append("push")
    result.url = url
    return result
