"""``fit``: maximum-likelihood training with warm-up, EMA, checkpoints, exact resume and DDP.

The default recipe is mAR-SCF's (Mahajan et al., CVPR 2020; SPEC §3): Adamax, lr 8e-4, linear
warm-up, random shift ≤ 3 px + flip; the optimizer (Adamax, Adam, AdamW with betas and weight
decay) and the input noise (uniform dequantisation, or TarFlow's Gaussian noise, which the model's
``noise_std`` then records) are ``TrainConfig`` settings. Warm-up is counted in optimizer steps
here (the original counted images: ``warmup_steps = warmup_images / batch_size``).

Randomness is counter-based: the generator of step ``s`` is seeded from ``(seed, s)`` and the
shuffling of epoch ``e`` from ``(seed, e)``, so the RNG state of a run is its step count and
resuming is exact.

Multi-GPU: run under ``torchrun``; ``fit`` joins the process group, and every rank draws the
augmentation and dequantisation noise of the whole global batch (``batch_size``) and keeps its
own rows, so N processes train exactly the model one process would train on the same global
batch (up to the order of floating-point sums). Gradients are averaged by DDP, metrics by
all-reduce, and only rank 0 writes.

A time budget (``TrainConfig.max_seconds``) is one more way for a run to reach its end: the step
that crosses it is the last, evaluated and checkpointed like the last of ``steps``, and
``run.json`` says why the run finished (``stop_reason``). It is the wall time of one segment (a
resume starts it afresh), decided together by all ranks.

Each step is ``step.TrainStep``: ``config.precision``'s autocast (``attnflow_zoo.precision``),
optionally compiled (``config.compile``), and no host read: the non-finite guard and the loss
window are read at logging and checkpoint steps only.

A run folder (``out_dir``) is locked while a run writes it (``lock``), holds ``metrics.jsonl``,
``run.json``, TensorBoard events, ``step-N/`` checkpoints, ``best/`` (lowest validation bits/dim)
and, at the end, ``curves.png`` and ``samples.png`` (``run``). SIGINT / SIGTERM finish the step,
write a checkpoint and raise ``TrainingInterrupted`` (``interrupt``).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint
from .._io import check_writable
from ..compilation import compile_training
from ..core import initialize_from_data, resolve_device
from ..data import datasets
from ..data.augment import augment
from ..data.labels import labels_for
from ..errors import CheckpointError, DataError, TrainingError
from ..metrics import mean_bpd
from ..models.conditioning import training_labels
from ..progress import clock, note, progress
from ..resources import rebalance
from .config import TrainConfig, check_device, check_resume
from .datasets import carve_validation, data_record, model_input, run_settings
from .distributed import DistContext, all_mean, barrier, init_distributed
from .interrupt import TrainingInterrupted, stop_requests
from .optim import make_ema, make_optimizer, make_scheduler, param_groups
from .record import device_name, versions
from .run import RunFolder, check_fresh
from .state import load_newest_intact, recorded_settings
from .step import LogDensity, TrainStep

#: Why a run finished (``run.json``'s ``stop_reason``): it reached its steps, or its time budget.
STOP_STEPS = "steps"
STOP_TIME = "max_seconds"


@dataclass
class FitResult:
    """What ``fit`` returns: the final step, the checkpoint it wrote and the last metrics
    (``eval_bpd``: the held-out split at the end; ``val_bpd``: the validation split at the end;
    ``best``: run.json's ``best`` entry, or None without a validation split; ``stop_reason``:
    ``STOP_STEPS`` or ``STOP_TIME``, as ``run.json`` records it)."""

    step: int
    checkpoint: Path | None
    eval_bpd: float | None
    train_bpd: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    val_bpd: float | None = None
    best: dict[str, Any] | None = None
    stop_reason: str | None = None


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + step)
    return g


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_images: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch + 1)
    return torch.randperm(num_images, generator=g)


def _batch(images: Tensor, labels: Tensor | None, step: int, config: TrainConfig,
           steps_per_epoch: int, dev: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global batch of ``step`` (uint8, on ``dev``) and its labels (None without): every
    rank draws the same one."""
    epoch, index = divmod(step, steps_per_epoch)
    perm = _epoch_permutation(len(images), config.seed, epoch)
    chosen = perm[index * config.batch_size:(index + 1) * config.batch_size]
    return (images[chosen].to(dev, non_blocking=True),
            None if labels is None else labels[chosen].to(dev, non_blocking=True))


def _local_rows(x: Tensor | None, ctx: DistContext) -> Tensor | None:
    """This rank's share of a global batch (None stays None)."""
    if x is None:
        return None
    local = x.shape[0] // ctx.world_size
    return x[ctx.rank * local:(ctx.rank + 1) * local]


def _training_device(device: str | torch.device | None, ctx: DistContext) -> torch.device:
    dev = resolve_device("auto" if device is None else device)
    if dev.type == "cuda" and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return dev


def fit(model: nn.Module, train_data: Tensor | str | os.PathLike[str], config: TrainConfig, *,
        eval_data: Tensor | None = None, out_dir: str | os.PathLike[str] | None = None,
        resume: bool = False, device: str | torch.device | None = None,
        show_progress: bool | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        allow_changes: Iterable[str] = (), run_info: dict[str, Any] | None = None,
        train_labels: Tensor | None = None, eval_labels: Tensor | None = None) -> FitResult:
    """Train ``model`` (a FlowModel) by maximum likelihood: minimise the mean bits/dim of the
    dequantised, augmented training batches.

    Args:
        model: the model; trained in place (its raw, non-EMA weights).
        train_data: uint8 images N×C×H×W, or a dataset name/folder (its train split; held-out
            data then defaults to its held-out split). ``config.validation_count`` images are carved
            out of it (seeded) to choose ``best/``.
        config: the ``TrainConfig``.
        eval_data: uint8 held-out images, scored at the end only (never used to choose).
        out_dir: the run folder (None: nothing is written).
        resume: continue from ``out_dir``'s newest intact checkpoint (exact: same batches, noise,
            optimizer and EMA state as an uninterrupted run).
        device: "auto" (default: CUDA if available; under torchrun cuda:LOCAL_RANK), "cpu", …
        on_log: called with every metrics record (rank 0).
        allow_changes: settings a resume may change (``check_resume``).
        run_info: entries for ``run.json`` (``preset``, ``dataset`` {name, path, limit, …}).
        train_labels, eval_labels: the class labels of ``train_data`` / ``eval_data`` ((N,)
            integers), needed by a class-conditional model (``num_classes`` > 0) and unused
            otherwise; a dataset given by name brings its own.

    Returns:
        ``FitResult`` with the final step, the last checkpoint and the last metrics.

    Raises:
        TrainingInterrupted: after SIGINT / SIGTERM, once the checkpoint of the step is written.
    """
    ctx = init_distributed(None if device is None else resolve_device(device))
    dev = _training_device(device, ctx)
    check_device(config, dev)
    info = dict(run_info or {})
    data, config = _RunData.prepare(model, train_data, eval_data, train_labels, eval_labels,
                                    config, info)
    if config.batch_size % ctx.world_size:
        raise TrainingError(f"batch_size {config.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes")
    total_steps = config.total_steps(len(data.train))
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise TrainingError("resume needs the output folder of the run to continue")
    if out is not None:
        check_writable(out, is_dir=True)
    settings = {**run_settings(config, info), "total_steps": total_steps}
    folder = RunFolder(out, ctx.is_main)
    try:
        folder.lock()
        barrier(ctx)
        if out is not None and not resume:
            check_fresh(out)
        run = _Run(model, data, config, ctx, dev, folder, out, total_steps, info, on_log)
        run.begin(resume, settings, tuple(allow_changes))
        return run.train(show_progress)
    except TrainingInterrupted:
        raise
    except BaseException as err:
        folder.fail(err)
        raise
    finally:
        folder.close()


@dataclass
class _RunData:
    """The images of a run and their labels (None without): train (the validation images carved
    out, seeded), validation and held-out (None where there is none)."""

    train: Tensor
    train_labels: Tensor | None
    val: Tensor | None
    val_labels: Tensor | None
    heldout: Tensor | None
    heldout_labels: Tensor | None
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train) // self.batch_size

    @classmethod
    def prepare(cls, model: nn.Module, train: Tensor | str | os.PathLike[str],
                heldout: Tensor | None, train_labels: Tensor | None,
                heldout_labels: Tensor | None, config: TrainConfig, info: dict[str, Any]
                ) -> tuple[_RunData, TrainConfig]:
        """Load a dataset given by name, check the images and labels fit the model, carve the
        validation split; the config with the dataset's flip rule where it has none. ``info``
        gains the dataset's record."""
        dataset = train if isinstance(train, (str, os.PathLike)) else None
        if dataset is not None:
            shape = model.input_shape  # type: ignore[attr-defined]
            split = datasets.heldout_split(dataset)
            if heldout is None and split is not None:
                heldout, heldout_labels = datasets.load_labelled(dataset, split, shape)
            train, train_labels = datasets.load_labelled(dataset, "train", shape)
            info.setdefault("dataset", data_record(dataset, None, split, None))
        if config.flip is None:
            config = config.replace(flip=datasets.default_flip(dataset))
        model.check_images(train[:1])  # type: ignore[attr-defined]
        if heldout is not None:
            model.check_images(heldout[:1])  # type: ignore[attr-defined]
        k = model.num_classes
        named = info.get("dataset") or {}
        source = dataset or named.get("name") or named.get("path") or "the data"
        train_labels = labels_for(k, train_labels, f"{source} (train)", len(train))
        if heldout is not None:
            heldout_labels = labels_for(k, heldout_labels, f"{source} (held-out)", len(heldout))
        train, val = carve_validation(train, config)
        train_labels, val_labels = (None, None) if train_labels is None else \
            carve_validation(train_labels, config)
        if len(train) < config.batch_size:
            raise DataError(f"{len(train)} training images are fewer than one batch of "
                            f"{config.batch_size}; lower `batch_size`")
        return cls(train, train_labels, val, val_labels, heldout, heldout_labels,
                   config.batch_size), config

    def record(self, model: nn.Module) -> dict[str, Any]:
        """The sizes ``run.json`` keeps of them."""
        return {"num_train": len(self.train),
                "num_validation": len(self.val) if self.val is not None else 0,
                "num_heldout": len(self.heldout) if self.heldout is not None else 0,
                "validation_split": "carved from train" if self.val is not None else None,
                "image_shape": list(model.input_shape)}


@dataclass
class _Window:
    """The training loss and speed since the last log line (the time spent evaluating and
    checkpointing is left out)."""

    loss: float = 0.0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    pause: float = 0.0

    def reset(self) -> None:
        self.loss, self.steps, self.start, self.pause = 0.0, 0, time.perf_counter(), 0.0


class _Run:
    """One segment of a training run (``fit``): the model, its optimiser, EMA and schedule, the
    data and the run folder, stepped from its first step to its last (``train``).

    ``step`` is the optimizer steps done; ``last_train`` / ``last_val`` / ``last_eval`` the
    latest train, validation and held-out bits/dim; ``history`` what was logged (rank 0)."""

    def __init__(self, model: nn.Module, data: _RunData, config: TrainConfig, ctx: DistContext,
                 dev: torch.device, folder: RunFolder, out: Path | None, total_steps: int,
                 info: dict[str, Any], on_log: Callable[[dict[str, Any]], None] | None) -> None:
        self.model, self.data, self.config, self.ctx, self.dev = model, data, config, ctx, dev
        self.folder, self.out, self.total_steps = folder, out, total_steps
        self.info, self.on_log = info, on_log
        self.step = 0
        self.resumed = False
        self.ema: Any = None
        self.history: list[dict[str, Any]] = []
        self.last_train: float | None = None
        self.last_val: float | None = None
        self.last_eval: float | None = None
        self.checkpoint_path: Path | None = None
        self.window = _Window()

    @property
    def net(self) -> nn.Module:
        """The weights that are evaluated and published: the EMA's where there is one."""
        return self.ema.module if self.ema is not None else self.model

    # --- the start: fresh or resumed ------------------------------------------------------------
    def begin(self, resume: bool, settings: dict[str, Any], allow: tuple[str, ...]) -> None:
        """Optimizer, scaler and EMA; the weights of a fresh run (ActNorm's data init) or of
        the newest intact checkpoint; the run record; the training step and schedule."""
        model, config = self.model, self.config
        model.to(self.dev)
        model.train()
        model.record_noise_std(config.noise_std)  # before the EMA copies the model and its config
        self.optimizer = make_optimizer(param_groups(model, config), config, self.dev)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        previous = self._resume(settings, allow) if resume else self._initialise()
        if self.step >= self.total_steps:
            raise TrainingError(f"the checkpoint is at step {self.step}, already ≥ the "
                                f"{self.total_steps} steps asked for; ask for more `steps` to "
                                "continue")
        info = self.info
        base = {**info, "dataset": {**(info.get("dataset") or {}), **self.data.record(model)},
                "architecture": type(model).__name__, "train_config": config.to_dict(),
                "world_size": self.ctx.world_size, "device": device_name(self.dev), **versions(),
                "total_steps": self.total_steps, "recipe": info.get("recipe")}
        self.folder.start(self.step, base, previous)
        self._build_step()

    def _resume(self, settings: dict[str, Any], allow: tuple[str, ...]) -> dict[str, Any] | None:
        """Load the newest intact checkpoint; the run record it carries (None: a new one)."""
        if self.config.ema_decay is not None:
            self.ema = make_ema(self.model, self.config)
        # Resuming without EMA from a run that had one: the raw weights load, the EMA is dropped.
        where, meta = load_newest_intact(self.out, self.model,
                                         self.ema.module if self.ema is not None else None,
                                         self.optimizer, self.scaler)
        self.step, self.resumed = int(meta["step"]), True
        changed = check_resume(recorded_settings(where), settings, allow)
        previous = None
        try:
            previous = checkpoint.read_run_record(where)
        except CheckpointError as err:  # the record is rewritten from here on
            note(f"{err}; starting a new run record")
        if self.ctx.is_main:
            note(f"resuming from step {self.step} ({where})"
                 + (f"; changed: {', '.join(changed)}" if changed else ""))
        return previous

    def _initialise(self) -> None:
        """The explicit data-dependent init (ActNorm) on the first batch, before the EMA copies
        the weights. Each rank sees its rows of the global batch; ActNorm averages the
        statistics over ranks, which makes them the global batch's."""
        config, model = self.config, self.model
        g = _step_generator(config.seed, 0, self.dev)
        x_u8, y = self._batch(0)
        x = _local_rows(model_input(x_u8, g, config.noise_std), self.ctx)
        y = _local_rows(y, self.ctx)
        initialize_from_data(model, lambda: model.log_density(x, y, generator=g))
        if config.ema_decay is not None:
            self.ema = make_ema(model, config)

    def _build_step(self) -> None:
        """The (DDP-wrapped, maybe compiled) training step and the learning-rate schedule."""
        config, ctx, model = self.config, self.ctx, self.model
        trainer: nn.Module = LogDensity(model, config.class_loss_weight)
        if ctx.active:
            trainer = nn.parallel.DistributedDataParallel(
                trainer, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        if config.compile:  # after the ActNorm init pass (``attnflow_zoo.compilation``)
            trainer = compile_training(trainer)
        self.train_step = TrainStep(trainer, list(model.parameters()), self.optimizer,
                                    config.precision, math.prod(model.input_shape),
                                    config.grad_clip, self.scaler, lambda t: all_mean(t, ctx))
        self.scheduler = make_scheduler(self.optimizer, config, self.total_steps)

    # --- one step -------------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        return _batch(self.data.train, self.data.train_labels, step, self.config,
                      self.data.steps_per_epoch, self.dev)

    def advance(self, first: bool) -> None:
        """One optimizer step on the global batch of ``step`` (augmented, dequantised, labels
        dropped for guidance); no host read (``step.py``)."""
        config, step = self.config, self.step
        x_u8, y = self._batch(step)
        g = _step_generator(config.seed, step + 1, self.dev)
        if config.augment:
            x_u8 = augment(x_u8, g, max_shift=config.max_shift, flip=config.flip)
        x = model_input(x_u8, g, config.noise_std)
        # Classifier-free label dropout on the global batch, outside the compiled step.
        y = training_labels(self.model, y, g)
        x, y = _local_rows(x, self.ctx), _local_rows(y, self.ctx)
        self.scheduler.step_update(num_updates=step + 1)
        self.train_step.first(x, g, y) if config.compile and first else self.train_step(x, g, y)
        if self.ema is not None:
            self.ema.update(self.model, step=step + 1)
        self.step = step + 1

    def agree(self, signum: int | None, over: bool) -> tuple[float, float]:
        """(a stop was asked, the budget is over), the same on every rank: the one per-step
        read, under DDP only."""
        stop_value, over_value = float(signum or 0), float(over)
        if self.ctx.active:
            flags = torch.tensor([stop_value, over_value], dtype=torch.float64, device=self.dev)
            stop_value, over_value = all_mean(flags, self.ctx).tolist()
        return stop_value, over_value

    # --- logging, scoring, checkpoints ----------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Keep a metrics record (rank 0): history, ``metrics.jsonl``, TensorBoard, ``on_log``."""
        if not self.ctx.is_main:
            return
        self.history.append(record)
        self.folder.log_record(record)
        if self.on_log is not None:
            self.on_log(record)

    def guard(self) -> dict[str, Any]:
        """Read the step's device-side guard: log the skipped non-finite steps, stop after
        ``max_nonfinite`` in a row."""
        rebalance()  # a measured thread count follows the machine's other work
        guard = self.train_step.read()
        self.window.loss += guard["loss_sum"]
        self.window.steps += guard["good"]
        if guard["skipped"]:
            self.log({"step": self.step, "event": "nonfinite", "train_bpd": guard["last_loss"],
                      "grad_norm": guard["grad_norm"], "skipped": guard["skipped"],
                      "consecutive": guard["consecutive"]})
        if guard["worst"] >= self.config.max_nonfinite:
            raise TrainingError(
                f"{guard['worst']} consecutive steps gave a non-finite loss or gradient "
                f"(found at step {self.step}); lower `lr`, set `grad_clip` or use "
                "`precision` fp32. No weight was updated by them.")
        return guard

    def log_window(self, guard: dict[str, Any], left: float | None) -> dict[str, str]:
        """Log the window's training bits/dim, lr and speed; the progress line's fields."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        window, batch = self.window, self.config.batch_size
        elapsed = time.perf_counter() - window.start - window.pause
        self.last_train = window.loss / window.steps
        ips = window.steps * batch / max(elapsed, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log({"step": self.step, "train_bpd": self.last_train, "lr": lr,
                  "grad_norm": guard["grad_norm"], "images_per_s": ips,
                  "num_images": window.steps * batch})
        fields = {"bpd": f"{self.last_train:.4f}", "lr": f"{lr:.2e}", "img/s": f"{ips:.0f}"}
        if left is not None:
            fields["left"] = clock(left)
        window.reset()
        return fields

    def score(self, images: Tensor | None, of: nn.Module, labels: Tensor | None) -> float | None:
        """Bits/dim of ``images`` under ``of`` with the run's evaluation noise (None: none)."""
        if images is None:
            return None
        g = torch.Generator(device=self.dev).manual_seed(self.config.eval_seed)
        return mean_bpd(of, images, self.config.eval_batch_size, g, show_progress=False,
                        labels=labels)

    def evaluate(self) -> float | None:
        """Validation bits/dim (choosing ``best/``) and a sample grid, on rank 0."""
        value, data, step = None, self.data, self.step
        if self.ctx.is_main:
            value = self.score(data.val, self.net, data.val_labels)
            if value is not None:
                self.log({"step": step, "split": "validation", "val_bpd": value,
                          "num_images": len(data.val)})
                note(f"step {step}: validation bits/dim {value:.4f} ({len(data.val)} images)")
                self.folder.consider_best(self.net, step, value, len(data.val))
            self.folder.grid(self.net, step, self.dev)
        barrier(self.ctx)
        return value

    def score_heldout(self) -> None:
        """The held-out split, once, at the end (rank 0)."""
        data = self.data
        self.last_eval = self.score(data.heldout, self.net, data.heldout_labels)
        if self.last_eval is not None:
            self.log({"step": self.step, "split": "test", "eval_bpd": self.last_eval,
                      "num_images": len(data.heldout)})

    def save(self, status: str, reason: str | None, last: bool) -> None:
        """A checkpoint of this step (rotating the older ones)."""
        model, ctx = self.model, self.ctx
        self.checkpoint_path = self.folder.checkpoint(
            self.step, model, self.ema.module if self.ema is not None else None, self.optimizer,
            self.scaler, self.config.to_dict(), self.config.keep_checkpoints,
            {"world_size": ctx.world_size, "model_class": type(model).__name__,
             "eval_bpd": self.last_eval if last else None}, status, reason)
        barrier(ctx)

    # --- the loop -------------------------------------------------------------------------------
    def train(self, show_progress: bool | None) -> FitResult:
        """Step until the last step or the time budget; evaluate, log and checkpoint on the way;
        ``TrainingInterrupted`` after a stop request, once the step's checkpoint is written."""
        config, budget = self.config, self.config.max_seconds
        if not self.resumed and config.eval_every is not None:
            self.last_val = self.evaluate()
        if budget is not None and self.ctx.is_main:
            note(f"time budget: {clock(budget)} of wall time for this segment (training stops "
                 "after the step that crosses it, then evaluates and writes its checkpoint)")
        start, reason = self.step, None
        # With a time budget the end is whichever comes first: no step count to show an ETA for.
        with stop_requests() if self.out is not None else _no_stop() as stop, \
                progress("train", total=self.total_steps if budget is None else None,
                         show=show_progress, start=start, every=config.log_every) as advance:
            began = time.monotonic()
            while reason is None:
                self.advance(first=self.step == start)
                signum = stop()
                stop_value, over = self.agree(signum, budget is not None
                                              and time.monotonic() - began >= budget)
                reason = (STOP_STEPS if self.step == self.total_steps
                          else STOP_TIME if over > 0 else None)
                stopping = stop_value > 0 and reason is None
                left = None if budget is None else max(0.0, budget - (time.monotonic() - began))
                guard, fields, save_now = self._report(reason, stopping, left)
                advance(1, **fields)
                self._evaluate_and_save(reason, stopping, guard, save_now)
                if stopping:
                    self.folder.finish(self.net, self.dev, _title(self.info, self.model),
                                       "interrupted")
                    raise TrainingInterrupted(signum or int(stop_value) or 15, self.step,
                                              self.checkpoint_path or self.out)
        return self._end(reason)

    def _report(self, reason: str | None, stopping: bool, left: float | None
                ) -> tuple[dict[str, Any] | None, dict[str, str], bool]:
        """The guard read and the log line due after a step: (the guard, the progress fields,
        whether a checkpoint is due)."""
        config, step, last = self.config, self.step, reason is not None
        log_now = step % config.log_every == 0 or last
        save_now = self.out is not None and (step % config.checkpoint_every == 0 or last
                                             or stopping)
        guard = self.guard() if log_now or save_now else None
        fields = self.log_window(guard, left) if log_now and self.window.steps else {}
        return guard, fields, save_now

    def _evaluate_and_save(self, reason: str | None, stopping: bool,
                           guard: dict[str, Any] | None, save_now: bool) -> None:
        """The evaluations and the checkpoint due after a step (their time is no training)."""
        config, step, last = self.config, self.step, reason is not None
        pause_start = time.perf_counter()
        if reason == STOP_TIME and self.ctx.is_main:
            note(f"time budget of {clock(config.max_seconds)} reached at step {step}: "
                 "evaluating and writing the final checkpoint")
        if last or (config.eval_every is not None and step % config.eval_every == 0):
            self.last_val = self.evaluate()
        if last and self.ctx.is_main:
            self.score_heldout()
        # A skipped step changes no weights: its checkpoint waits for the next good step
        # (unless the run is stopping or ending).
        if save_now and (guard["consecutive"] == 0 or last or stopping):  # type: ignore[index]
            self.save("finished" if last else "interrupted" if stopping else "running", reason,
                      last)
        self.window.pause += time.perf_counter() - pause_start

    def _end(self, reason: str | None) -> FitResult:
        """The best checkpoint scored on the held-out split, the pictures, the result."""
        data = self.data
        if self.ctx.is_main:
            self.folder.score_best_on_test(
                self.net, self.step, lambda twin: None if data.heldout is None
                else (self.score(data.heldout, twin, data.heldout_labels), len(data.heldout)))
            self.folder.finish(self.net, self.dev, _title(self.info, self.model), "finished")
        return FitResult(self.step, self.checkpoint_path, self.last_eval, self.last_train,
                         self.history, self.last_val, self.folder.best, reason)


def _title(info: dict[str, Any], model: nn.Module) -> str:
    ds = info.get("dataset") or {}
    where = ds.get("name") or (f"{Path(ds['path']).name} (local folder)" if ds.get("path")
                               else "in-memory data")
    return f"{info.get('preset') or type(model).__name__} on {where}"


class _no_stop:
    def __enter__(self) -> Callable[[], int | None]:
        return lambda: None

    def __exit__(self, *exc: object) -> None:
        return None
