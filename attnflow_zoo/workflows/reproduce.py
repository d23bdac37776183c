"""``reproduce``: from a zoo entry to a published, comparable checkpoint in one resumable command.

Stages, each writing into the run folder (``out_dir``) and recorded in ``reproduce.json`` with
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
folder that already holds a run are refused (use another ``out_dir``).
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
from ..checkpoint import Checkpoint
from ..core import resolve_device
from ..data import datasets
from ..errors import ConfigError, DataError, check_choice, check_positive_int
from ..evaluation import results, scores
from ..evaluation.fid import resolve_inception_weights
from ..publishing import publish
from ..registry import Recipe
from ..training import recipes, train_preset
from ..training.distributed import DistContext
from ..training.run import default_run_dir
from .stages import StageRecord

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


@dataclass
class _Job:
    """What ``reproduce`` works on, resolved once at its top: the entry's plan, the data, the
    run folder with its stage record, the options of the later stages (checked; the device and
    the FID Inception weight file resolved) and what was done."""

    plan: recipes.Plan
    dataset: str | os.PathLike[str]
    run_dir: Path
    state: StageRecord
    limit: int | None
    eval_limit: int | None
    num_fid: int
    fid_reference_limit: int | None
    inception_weights: str | os.PathLike[str] | None
    random_inception: bool
    device: torch.device
    show_progress: bool | None
    say: Callable[[str], None]
    main: bool
    result: ReproduceResult

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe  # type: ignore[return-value]  # _prepare checks it is there


def _check_options(options: dict[str, Any]) -> None:
    """The caller's settings, checked once before any work (the stages take them as they are;
    the recipe checked its own)."""
    if options["until"] is not None:
        check_choice("`until`", options["until"], STAGES)
    if options["repo_id"] is not None:
        publish.check_repo_id(options["repo_id"])
    for name in ("limit", "eval_limit", "fid_reference_limit"):
        if options[name] is not None:
            check_positive_int(f"`{name}`", options[name])
    if options["fid_samples"] not in (None, 0):
        check_positive_int("`fid_samples`", options["fid_samples"])


def _prepare(preset: str, **options: Any) -> _Job:
    """Every check before work, and the names resolved once: the entry into its plan, the data,
    the run folder and its stage record, the device and the FID Inception weight file."""
    _check_options(options)
    device = resolve_device(options["device"])
    plan = recipes.plan(preset, model_overrides=options["model_overrides"],
                        **(options["overrides"] or {}))
    if plan.recipe is None:
        raise ConfigError(f"zoo entry {preset!r} has no training recipe; train it with "
                          "train_preset and explicit settings")
    dataset = options["dataset"] if options["dataset"] is not None else plan.recipe.dataset
    if dataset is None:
        raise ConfigError(f"{preset}'s recipe names no dataset; pass `dataset` (a name or a "
                          "local folder)")
    out_dir = options["out_dir"]
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(preset)
    main = DistContext.from_env().is_main
    fid_samples = options["fid_samples"]
    num_fid = (plan.recipe.fid_num_samples if fid_samples is None else fid_samples) or 0
    weights = options["inception_weights"]
    if num_fid and not options["random_inception"] and main and options["until"] != "train":
        weights = resolve_inception_weights(weights)  # missing weights: said before training
    return _Job(
        plan, dataset, run_dir, StageRecord(run_dir / STATE_NAME, STAGES, write=main),
        options["limit"] if options["limit"] is not None else plan.recipe.train_limit,
        options["eval_limit"], num_fid, options["fid_reference_limit"], weights,
        options["random_inception"], device, options["show_progress"],
        options["log"] or (lambda _line: None), main, ReproduceResult(run_dir))


def train(job: _Job) -> Checkpoint | None:
    """Stage 1: train (or resume) the entry's recipe into the run folder; None on a rank of a
    torchrun job other than 0."""
    plan, state, run_dir = job.plan, job.state, job.run_dir
    inputs = {"preset": plan.name, "dataset": datasets.dataset_label(job.dataset),
              "recipe": job.recipe.name, "train_config": plan.config.to_dict(),
              "model_overrides": plan.model_overrides, "limit": job.limit,
              "eval_limit": job.eval_limit}
    previous = state.inputs("train")
    has_run = bool(checkpoint.step_folders(run_dir))
    if previous is not None and previous != inputs:
        diff = "; ".join(_differences(previous, inputs))
        raise ConfigError(f"{run_dir} holds a reproduce run with other settings ({diff}); rerun "
                          "with the same ones to continue it, or pick another `out_dir`")
    if previous is None and has_run:
        raise ConfigError(f"{run_dir} already holds a training run not started by "
                          "reproduce; pick another `out_dir`")
    ckpt = Checkpoint.open(run_dir) if has_run else None
    if state.done("train", inputs) is not None and ckpt is not None:
        job.say(f"train: done ({ckpt.name}), skipped")
        job.result.skipped.append("train")
        return ckpt
    state.record("train", inputs, False,
                 started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    total = plan.config.total_steps(0 if plan.config.steps is not None else len(
        datasets.load_for_shape(job.dataset, "train", plan.input_shape(), limit=job.limit)))
    step = (ckpt.step or 0) if ckpt is not None else 0
    if step < total:
        job.say(f"train: {'resuming from step ' + str(step) if ckpt else 'starting'}, "
                f"{total} steps of batch {plan.config.batch_size} ({job.recipe.name})")
        fit = train_preset(plan, job.dataset, out_dir=run_dir, resume=ckpt is not None,
                           limit=job.limit, eval_limit=job.eval_limit, device=job.device,
                           show_progress=job.show_progress)
        if fit.checkpoint is None:  # another rank of a torchrun job: rank 0 goes on
            return None
    ckpt = Checkpoint.open(run_dir)
    state.record("train", inputs, True, checkpoint=ckpt.name)
    job.result.ran.append("train")
    return ckpt


def evaluate(job: _Job, ckpt: Checkpoint) -> dict[str, Any]:
    """Stage 2: held-out bits/dim and the standard FID into ``metrics.json``."""
    recipe, dataset = job.recipe, job.dataset
    split = recipe.eval_split if datasets.dataset_spec(dataset) else datasets.heldout_split(dataset)
    if split is None:
        raise DataError(f"{dataset} has no held-out split (test, valid or validation) to score "
                        "the run on; pass a `dataset` that has one, or `until` train")
    weights = job.inception_weights
    inputs = {"checkpoint": ckpt.name, "split": split, "eval_limit": job.eval_limit,
              "fid_samples": job.num_fid, "fid_temperature": recipe.fid_temperature,
              "fid_reference_split": recipe.fid_reference_split,
              "fid_reference_limit": job.fid_reference_limit,
              "inception_weights": str(weights) if weights else None,
              "random_inception": job.random_inception}
    path = job.run_dir / METRICS_NAME
    job.result.metrics_path = path
    if job.state.done("evaluate", inputs, path):
        job.say(f"evaluate: done ({path.name}), skipped")
        job.result.skipped.append("evaluate")
        return results.load_metrics(path)
    fid = f" + FID of {job.num_fid} samples" if job.num_fid else ""
    if job.num_fid and job.random_inception:
        fid += " (random Inception weights: a pipeline test, kept off the card)"
    job.say(f"evaluate: {split} bits/dim{fid}")
    metrics = scores.score_checkpoint(
        ckpt, dataset, split, device=job.device, limit=job.eval_limit, num_fid=job.num_fid,
        temperature=recipe.fid_temperature, fid_reference_split=recipe.fid_reference_split,
        fid_reference_limit=job.fid_reference_limit, inception_weights=weights,
        random_inception=job.random_inception,
        statistics_out=job.run_dir / "fid" / f"reference-{recipe.fid_reference_split}.npz",
        show_progress=job.show_progress)
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    job.state.record("evaluate", inputs, True, metrics=path.name)
    job.result.ran.append("evaluate")
    return metrics


def card(job: _Job, ckpt: Checkpoint, metrics: dict[str, Any], repo_id: str | None) -> str:
    """Stage 3: the model card ``README.md`` (the entry's recipe beside the run, the measured
    numbers beside the papers'); returns its text."""
    path = job.run_dir / publish.CARD_NAME
    job.result.card_path = path
    inputs = {"checkpoint": ckpt.name, "metrics": _digest(metrics), "run": _digest(ckpt.run or {}),
              "repo_id": repo_id or publish.PLACEHOLDER_REPO}
    if job.state.done("card", inputs, path):
        job.say(f"card: done ({path.name}), skipped")
        job.result.skipped.append("card")
        return path.read_text(encoding="utf-8")
    text = str(publish.make_card(ckpt, job.plan.entry.recipe, repo_id or publish.PLACEHOLDER_REPO,
                                 run_metrics=metrics))
    atomic_write_text(path, text)
    job.state.record("card", inputs, True, card=path.name)
    job.result.ran.append("card")
    return text


def push(job: _Job, ckpt: Checkpoint, text: str, repo_id: str, private: bool) -> str:
    """Stage 4: the checkpoint and exactly that card to ``repo_id``, in one commit."""
    inputs = {"checkpoint": ckpt.name, "repo_id": repo_id, "card": _digest(text),
              "private": private}
    entry = job.state.done("push", inputs)
    if entry is not None:
        job.say(f"push: done ({entry.get('url')}), skipped")
        job.result.skipped.append("push")
        return entry.get("url")
    job.say(f"push: {ckpt.name} + {publish.CARD_NAME} -> {repo_id}")
    url = publish.upload(ckpt, repo_id, text, private=private)
    job.state.record("push", inputs, True, url=url)
    job.result.ran.append("push")
    return url


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
    """Train zoo entry ``preset`` with its recipe, score it, write its card, push it: the
    stages ``train``, ``evaluate``, ``card`` and ``push`` over the entry resolved once.

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
    job = _prepare(preset, dataset=dataset, out_dir=out_dir, repo_id=repo_id, overrides=overrides,
                   model_overrides=model_overrides, fid_samples=fid_samples,
                   fid_reference_limit=fid_reference_limit, limit=limit, eval_limit=eval_limit,
                   inception_weights=inception_weights, random_inception=random_inception,
                   device=device, until=until, show_progress=show_progress, log=log)
    result = job.result
    ckpt = train(job)
    if ckpt is None:
        return result
    result.checkpoint = ckpt.directory
    if not job.main or until == "train":
        return result
    result.metrics = evaluate(job, ckpt)
    if until == "evaluate":
        return result
    text = card(job, ckpt, result.metrics, repo_id)
    if until != "card" and repo_id is not None:
        result.url = push(job, ckpt, text, repo_id, private)
    return result
