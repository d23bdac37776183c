"""``quickstart``: the zoo's first run, on a fresh machine and offline, in a few minutes.

It trains the quickstart entry (``DEFAULT_PRESET``) with its recipe on the embedded ``digits``
(data that ships with the package, so nothing is downloaded) for a time budget
(``TrainConfig.max_seconds``: training stops after the step that crosses it, exactly like a run
that reached its steps), scores the held-out split against the uniform baseline, and leaves one
run folder holding everything, written by the training package's run-folder machinery plus two
files of its own: the checkpoint (``step-N/``, ``latest``, ``best/``), ``run.json``,
``metrics.jsonl``, TensorBoard events, ``curves.png`` and ``samples.png`` (temperature 1, as
every run draws it); then ``samples-t0.7.png``, ``metrics.json`` (the held-out score in the
schema of ``results``: what ``attnflow push --metrics`` takes) and the model card ``README.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..checkpoint import Checkpoint
from ..errors import ConfigError
from ..evaluation import results
from ..evaluation.sampling import draw_samples
from ..factory import load_checkpoint
from ..publishing import publish
from ..training import TrainConfig, recipes, train_preset
from ..training.report import save_grid
from ..training.run import default_run_dir, holds_run
from .reproduce import METRICS_NAME

#: The entry ``attnflow quickstart`` trains, on the data it trains on (embedded, offline).
DEFAULT_PRESET = "attnflow_imap_digits"
DATASET = "digits"
#: The default time budget in minutes (measured on 2 CPU cores; a GPU reaches the recipe's
#: steps sooner).
DEFAULT_MINUTES = 3.0
DEFAULT_OUT = default_run_dir("quickstart")
#: Bits/dim of the uniform density on [0, 1)^D: what a model that learned nothing scores.
UNIFORM_BPD = 8.0
#: The temperature of the extra sample grid (flows look best a little below 1).
TEMPERATURE = 0.7
SAMPLES_T_NAME = "samples-t0.7.png"
#: Steps between two training-log lines (points of the curve).
LOG_EVERY = 10


@dataclass
class QuickstartResult:
    """What ``quickstart`` did: the run folder and what it holds, and the held-out score."""

    run_dir: Path
    checkpoint: Path
    steps: int
    stop_reason: str | None
    heldout_bpd: float
    num_heldout: int
    metrics: Path
    seconds: float
    samples: Path
    samples_t: Path
    curves: Path
    card: Path


def run_folder(out_dir: str | os.PathLike[str] | None, resume: bool = False) -> Path:
    """The run folder: ``out_dir`` as given; by default ``runs/quickstart``, or the first free
    ``runs/quickstart-N`` when it already holds a run (never with ``resume``)."""
    if out_dir is not None:
        return Path(out_dir)
    if resume or not holds_run(DEFAULT_OUT):
        return DEFAULT_OUT
    n = 2
    while holds_run(DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{n}")):
        n += 1
    return DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{n}")


def quickstart(preset: str = DEFAULT_PRESET, *, minutes: float = DEFAULT_MINUTES,
               out_dir: str | os.PathLike[str] | None = None, device: str = "auto",
               seed: int = 0, resume: bool = False, show_progress: bool | None = None,
               log: Callable[[str], None] | None = None) -> QuickstartResult:
    """Train ``preset`` on the embedded digits for ``minutes`` of wall time, score it, draw it and
    write its card, all into one run folder (``run_folder``).

    Args:
        preset: a zoo entry whose images are 1×32×32 (default: the quickstart entry).
        minutes: the time budget of the training (``TrainConfig.max_seconds``); the final
            evaluation, pictures and card come after it. The recipe's steps end it sooner if
            they are reached first.
        out_dir: the run folder (default ``runs/quickstart``, see ``run_folder``).
        device: "auto", "cpu", "cuda", ...
        seed: seed of the initial weights, the validation split, the batches and the noise.
        resume: continue the run in ``out_dir`` with a fresh budget (after Ctrl-C, or to train
            longer).
        log: called with a line at each stage.
    """
    say = log or (lambda _line: None)
    if not (isinstance(minutes, (int, float)) and 0 < minutes < float("inf")):
        raise ConfigError(f"`minutes` must be a positive number, got {minutes}")
    began = time.monotonic()
    out = run_folder(out_dir, resume)
    # Logged every LOG_EVERY steps: a loaded CPU may make only dozens of steps in the budget,
    # and the curve and the progress lines off a terminal should still show them.
    plan = recipes.plan(preset, seed=seed, max_seconds=60.0 * minutes, log_every=LOG_EVERY)
    say(f"training {preset} on {DATASET} (embedded, offline) for up to {minutes:g} min "
        f"of wall time, at most {_length(plan.config)} of {plan.config.batch_size} images, "
        f"into {out}")
    fit = train_preset(plan, DATASET, out_dir=out, resume=resume, device=device,
                       show_progress=show_progress)
    if fit.checkpoint is None or fit.eval_bpd is None:  # another rank of a torchrun job
        raise ConfigError("quickstart runs in one process; start it without torchrun")
    ckpt = Checkpoint.open(fit.checkpoint)
    metrics = _score(ckpt, plan, fit.eval_bpd)
    metrics_path = atomic_write_text(out / METRICS_NAME,
                                     json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    say(f"drawing 64 samples at temperature {TEMPERATURE} and writing the model card")
    samples_t = save_grid(draw_samples(load_checkpoint(ckpt), 64, temperature=TEMPERATURE,
                                       seed=0, device=device), out / SAMPLES_T_NAME)
    card = atomic_write_text(out / publish.CARD_NAME,
                             str(publish.make_card(ckpt, plan.entry.recipe, metrics=metrics)))
    return QuickstartResult(
        run_dir=out, checkpoint=ckpt.directory, steps=fit.step, stop_reason=fit.stop_reason,
        heldout_bpd=fit.eval_bpd, num_heldout=metrics["bpd_num_images"], metrics=metrics_path,
        seconds=time.monotonic() - began, samples=out / "samples.png", samples_t=samples_t,
        curves=out / "curves.png", card=card)


def _score(ckpt: Checkpoint, plan: recipes.Plan, bpd: float) -> dict[str, Any]:
    """The held-out score training measured at its end, in the metrics schema (``results``)."""
    num_heldout = int(((ckpt.run or {}).get("dataset") or {}).get("num_heldout") or 0)
    return results.check_metrics({
        "format": results.FORMAT, "dataset": DATASET, "split": "test", "step": ckpt.step,
        "bpd": bpd, "bpd_estimator": "single-sample", "bpd_num_images": num_heldout,
        "bpd_seed": plan.config.eval_seed, "bpd_batch_size": plan.config.eval_batch_size})


def _length(config: TrainConfig) -> str:
    """The recipe's length in its own unit: steps, or epochs for an epoch recipe (the steps
    of an epoch are known only once the data is loaded)."""
    if config.steps is not None:
        return f"{config.steps:,} steps"
    return f"{config.epochs:,} epoch{'s' if config.epochs != 1 else ''} of batches"
