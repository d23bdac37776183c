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
from ..metrics import evaluate_bpd
from ..models.conditioning import training_labels
from ..progress import clock, note, progress
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
            data then defaults to its held-out split). ``config.validation`` images are carved
            out of it (seeded) to choose ``best/``.
        config: the ``TrainConfig``.
        eval_data: uint8 held-out images, scored at the end only (never used to choose).
        out_dir: the run folder (None: nothing is written).
        resume: continue from ``out_dir``'s newest intact checkpoint (exact: same batches, noise,
            optimizer and EMA state as an uninterrupted run).
        device: "auto" (default: CUDA if available; under torchrun cuda:LOCAL_RANK), "cpu", …
        on_log: called with every metrics record (rank 0).
        allow_changes: settings a resume may change (``check_resume``; ``--override KEY``).
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
    dataset = train_data if isinstance(train_data, (str, os.PathLike)) else None
    if dataset is not None:
        shape = model.input_shape  # type: ignore[attr-defined]
        split = datasets.heldout_split(dataset)
        if eval_data is None and split is not None:
            eval_data, eval_labels = datasets.load_labelled(dataset, split, shape)
        train_data, train_labels = datasets.load_labelled(dataset, "train", shape)
        info.setdefault("dataset", data_record(dataset, None, split, None))
    if config.flip is None:
        config = config.replace(flip=datasets.default_flip(dataset))
    model.check_images(train_data[:1])  # type: ignore[attr-defined]
    if eval_data is not None:
        model.check_images(eval_data[:1])  # type: ignore[attr-defined]
    if config.batch_size % ctx.world_size:
        raise TrainingError(f"batch_size {config.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes")
    k = getattr(model, "num_classes", 0)
    named = info.get("dataset") or {}
    source = dataset or named.get("name") or named.get("path") or "the data"
    train_labels = labels_for(k, train_labels, f"{source} (train)", len(train_data))
    if eval_data is not None:
        eval_labels = labels_for(k, eval_labels, f"{source} (held-out)", len(eval_data))
    train_data, val_data = carve_validation(train_data, config)
    train_labels, val_labels = (None, None) if train_labels is None else \
        carve_validation(train_labels, config)
    steps_per_epoch = len(train_data) // config.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_data)} training images are fewer than one batch of "
                        f"{config.batch_size}; lower --batch-size")
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
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
        return _fit_locked(model, (train_data, train_labels), (val_data, val_labels),
                           (eval_data, eval_labels), config, ctx, dev, out, folder, resume,
                           total_steps, steps_per_epoch, settings, allow_changes, info,
                           show_progress, on_log)
    except TrainingInterrupted:
        raise
    except BaseException as err:
        folder.fail(err)
        raise
    finally:
        folder.close()


def _fit_locked(model, train_data, val_data, eval_data, config, ctx, dev, out, folder, resume,
                total_steps, steps_per_epoch, settings, allow_changes, info, show_progress,
                on_log) -> FitResult:
    # Each of train_data, val_data, eval_data is (images, labels or None).
    (train_data, train_labels), (val_data, val_labels), (eval_data, eval_labels) = \
        train_data, val_data, eval_data
    if out is not None and not resume:
        check_fresh(out)
    model.to(dev)
    model.train()
    model.record_noise_std(config.noise_std)  # before the EMA copies the model and its config
    optimizer = make_optimizer(param_groups(model, config), config, dev)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    num_dims = math.prod(model.input_shape)

    start_step = 0
    ema = None
    previous = None
    if resume:
        if config.ema_decay is not None:
            ema = make_ema(model, config)
        where, meta = load_newest_intact(out, model, ema.module if ema is not None else None,
                                         optimizer, scaler)
        # Resuming without EMA from a run that had one: the raw weights load, the EMA is dropped.
        start_step = int(meta["step"])
        changed = check_resume(recorded_settings(where), settings, allow_changes)
        try:
            previous = checkpoint.read_run_record(where)
        except CheckpointError as err:  # the record is rewritten from here on
            note(f"{err}; starting a new run record")
        if ctx.is_main:
            note(f"resuming from step {start_step} ({where})"
                 + (f"; changed: {', '.join(changed)}" if changed else ""))
    else:
        # The explicit data-dependent init (ActNorm) on the first batch, before the EMA copies
        # the weights. Each rank sees its rows of the global batch; ActNorm averages the
        # statistics over ranks, which makes them the global batch's.
        g = _step_generator(config.seed, 0, dev)
        x_u8, y = _batch(train_data, train_labels, 0, config, steps_per_epoch, dev)
        x, y = _local_rows(model_input(x_u8, g, config.noise_std), ctx), _local_rows(y, ctx)
        initialize_from_data(model, lambda: model.log_density(x, y, generator=g))
        if config.ema_decay is not None:
            ema = make_ema(model, config)
    if start_step >= total_steps:
        raise TrainingError(f"the checkpoint is at step {start_step}, already ≥ the {total_steps} "
                            "steps asked for; ask for more --steps to continue")

    dataset = dict(info.get("dataset") or {})
    dataset.update(num_train=len(train_data), num_validation=len(val_data) if val_data is not None
                   else 0, num_heldout=len(eval_data) if eval_data is not None else 0,
                   validation_split="carved from train" if val_data is not None else None,
                   image_shape=list(model.input_shape))
    base = {**info, "dataset": dataset, "architecture": type(model).__name__,
            "train_config": config.to_dict(), "world_size": ctx.world_size,
            "device": device_name(dev), **versions(), "total_steps": total_steps,
            "recipe": info.get("recipe")}
    folder.start(start_step, base, previous)

    trainer: nn.Module = LogDensity(model, config.class_loss_weight)
    if ctx.active:
        trainer = nn.parallel.DistributedDataParallel(
            trainer, device_ids=[dev.index] if dev.type == "cuda" else None)
    if config.compile:  # after the ActNorm init pass (``attnflow_zoo.compilation``)
        trainer = compile_training(trainer)
    train_step = TrainStep(trainer, list(model.parameters()), optimizer, config.precision,
                           num_dims, config.grad_clip, scaler, lambda t: all_mean(t, ctx))
    scheduler = make_scheduler(optimizer, config, total_steps)
    history: list[dict[str, Any]] = []
    net = ema.module if ema is not None else model

    def log(record: dict[str, Any]) -> None:
        if not ctx.is_main:
            return
        history.append(record)
        folder.log_record(record)
        if on_log is not None:
            on_log(record)

    def score(images: Tensor | None, of: nn.Module, labels: Tensor | None) -> float | None:
        if images is None:
            return None
        g = torch.Generator(device=dev).manual_seed(config.eval_seed)
        return evaluate_bpd(of, images, config.eval_batch_size, g, show_progress=False,
                            labels=labels)

    def evaluate(step: int) -> float | None:
        value = None
        if ctx.is_main:
            value = score(val_data, net, val_labels)
            if value is not None:
                log({"step": step, "split": "validation", "val_bpd": value,
                     "num_images": len(val_data)})
                note(f"step {step}: validation bits/dim {value:.4f} ({len(val_data)} images)")
                folder.consider_best(net, step, value, len(val_data))
            folder.grid(net, step, dev)
        barrier(ctx)
        return value

    step = start_step
    window_loss, window_steps = 0.0, 0
    window_start = time.perf_counter()
    window_pause = 0.0
    last_train = last_eval = last_val = None
    checkpoint_path: Path | None = None
    if not resume and config.eval_every is not None:
        last_val = evaluate(0)
    budget = config.max_seconds
    if budget is not None and ctx.is_main:
        note(f"time budget: {clock(budget)} of wall time for this segment (training stops after "
             "the step that crosses it, then evaluates and writes its checkpoint)")
    reason = None
    # With a time budget the end is whichever comes first: no step count to show an ETA for.
    with stop_requests() if out is not None else _no_stop() as stop, \
            progress("train", total=total_steps if budget is None else None,
                     show=show_progress, start=start_step, every=config.log_every) as advance:
        began = time.monotonic()
        while reason is None:
            x_u8, y = _batch(train_data, train_labels, step, config, steps_per_epoch, dev)
            g = _step_generator(config.seed, step + 1, dev)
            if config.augment:
                x_u8 = augment(x_u8, g, max_shift=config.max_shift, flip=config.flip)
            x = model_input(x_u8, g, config.noise_std)
            # Classifier-free label dropout on the global batch, outside the compiled step.
            y = training_labels(model, y, g)
            x, y = _local_rows(x, ctx), _local_rows(y, ctx)
            scheduler.step_update(num_updates=step + 1)
            # No host read in the step (``step.py``): the non-finite guard stays on the device
            # and is read at logging / checkpoint steps.
            train_step.first(x, g, y) if config.compile and step == start_step else \
                train_step(x, g, y)
            signum = stop()
            over = budget is not None and time.monotonic() - began >= budget
            stop_value, over_value = float(signum or 0), float(over)
            if ctx.active:  # every rank stops at the same step: the one per-step read (DDP only)
                flags = torch.tensor([stop_value, over_value], dtype=torch.float64, device=dev)
                stop_value, over_value = all_mean(flags, ctx).tolist()
            if ema is not None:
                ema.update(model, step=step + 1)
            step += 1
            reason = STOP_STEPS if step == total_steps else STOP_TIME if over_value > 0 else None
            last = reason is not None
            stopping = stop_value > 0 and not last
            log_now = step % config.log_every == 0 or last
            save_now = out is not None and (step % config.checkpoint_every == 0 or last
                                            or stopping)
            fields: dict[str, str] = {}
            guard = None
            if log_now or save_now:
                guard = train_step.read()
                window_loss += guard["loss_sum"]
                window_steps += guard["good"]
                if guard["skipped"]:
                    log({"step": step, "event": "nonfinite", "train_bpd": guard["last_loss"],
                         "grad_norm": guard["grad_norm"], "skipped": guard["skipped"],
                         "consecutive": guard["consecutive"]})
                if guard["worst"] >= config.max_nonfinite:
                    raise TrainingError(
                        f"{guard['worst']} consecutive steps gave a non-finite loss or gradient "
                        f"(found at step {step}); lower --lr, set --grad-clip or use "
                        "--precision fp32. No weight was updated by them.")
            if log_now and window_steps:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                elapsed = time.perf_counter() - window_start - window_pause
                last_train = window_loss / window_steps
                ips = window_steps * config.batch_size / max(elapsed, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                log({"step": step, "train_bpd": last_train, "lr": lr,
                     "grad_norm": guard["grad_norm"], "images_per_s": ips,
                     "num_images": window_steps * config.batch_size})
                fields = {"bpd": f"{last_train:.4f}", "lr": f"{lr:.2e}", "img/s": f"{ips:.0f}"}
                if budget is not None:
                    fields["left"] = clock(max(0.0, budget - (time.monotonic() - began)))
                window_loss, window_steps = 0.0, 0
                window_start = time.perf_counter()
                window_pause = 0.0
            advance(1, **fields)
            pause_start = time.perf_counter()
            if last and reason == STOP_TIME and ctx.is_main:
                note(f"time budget of {clock(budget)} reached at step {step}: evaluating and "
                     "writing the final checkpoint")
            if last or (config.eval_every is not None and step % config.eval_every == 0):
                last_val = evaluate(step)
            if last and ctx.is_main:
                last_eval = score(eval_data, net, eval_labels)
                if last_eval is not None:
                    log({"step": step, "split": "test", "eval_bpd": last_eval,
                         "num_images": len(eval_data)})
            # A skipped step changes no weights: its checkpoint waits for the next good step
            # (unless the run is stopping or ending).
            if save_now and (guard["consecutive"] == 0 or last or stopping):
                status = "finished" if last else "interrupted" if stopping else "running"
                checkpoint_path = folder.checkpoint(
                    step, model, ema.module if ema is not None else None, optimizer, scaler,
                    config.to_dict(), config.keep_checkpoints,
                    {"world_size": ctx.world_size, "model_class": type(model).__name__,
                     "eval_bpd": last_eval if last else None}, status, reason)
                barrier(ctx)
            window_pause += time.perf_counter() - pause_start
            if stopping:
                folder.finish(net, dev, _title(info, model), "interrupted")
                raise TrainingInterrupted(signum or int(stop_value) or 15, step,
                                          checkpoint_path or out)  # type: ignore[arg-type]
    if ctx.is_main:
        folder.score_best_on_test(net, step, lambda twin: None if eval_data is None
                                  else (score(eval_data, twin, eval_labels), len(eval_data)))
        folder.finish(net, dev, _title(info, model), "finished")
    return FitResult(step, checkpoint_path, last_eval, last_train, history, last_val,
                     folder.best, reason)


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
