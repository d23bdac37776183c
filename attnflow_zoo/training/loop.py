"""``fit``: maximum-likelihood training with warm-up, EMA, checkpoints, exact resume and DDP.

The recipe is mAR-SCF's (Mahajan et al., CVPR 2020; SPEC §3): Adamax, lr 8e-4, linear warm-up,
random shift ≤ 3 px + flip. Warm-up is counted in optimizer steps here (the original counted
images: ``warmup_steps = warmup_images / batch_size``).

Randomness is counter-based: the generator of step ``s`` is seeded from ``(seed, s)`` and the
shuffling of epoch ``e`` from ``(seed, e)``, so the RNG state of a run is its step count and
resuming is exact.

Multi-GPU: run under ``torchrun``; ``fit`` joins the process group, and every rank draws the
augmentation and dequantisation noise of the whole global batch (``batch_size``) and keeps its
own rows, so N processes train exactly the model one process would train on the same global
batch (up to the order of floating-point sums). Gradients are averaged by DDP, metrics by
all-reduce, and only rank 0 writes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint, data, metrics
from ..core import initialize_from_data, resolve_device
from ..errors import DataError, TrainingError
from ..evaluation import evaluate_bpd
from ..factory import create_model
from ..progress import progress
from .config import TrainConfig
from .distributed import DistContext, all_mean, barrier, init_distributed
from .state import load_training_state, save_training_checkpoint

METRICS = "metrics.jsonl"


@dataclass
class FitResult:
    """What ``fit`` returns: the final step, the checkpoint it wrote and the last metrics."""

    step: int
    checkpoint: Path | None
    eval_bpd: float | None
    train_bpd: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


class _LogDensity(nn.Module):
    """Wraps a FlowModel so DDP sees the training computation as its ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.model.log_density(x, generator)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + step)
    return g


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_images: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch + 1)
    return torch.randperm(num_images, generator=g)


def _batch(images: Tensor, step: int, config: TrainConfig, steps_per_epoch: int,
           dev: torch.device) -> Tensor:
    """The global batch of ``step`` (uint8, on ``dev``): every rank draws the same one."""
    epoch, index = divmod(step, steps_per_epoch)
    perm = _epoch_permutation(len(images), config.seed, epoch)
    chosen = perm[index * config.batch_size:(index + 1) * config.batch_size]
    return images[chosen].to(dev, non_blocking=True)


def _local_rows(x: Tensor, ctx: DistContext) -> Tensor:
    """This rank's share of a global batch."""
    local = x.shape[0] // ctx.world_size
    return x[ctx.rank * local:(ctx.rank + 1) * local]


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    warmup = min(config.warmup_steps, total_steps)
    if config.schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=config.min_lr,
                                 warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=False,
                                 t_in_epochs=False)
    return StepLRScheduler(optimizer, decay_t=float("inf"), decay_rate=1.0, warmup_t=warmup,
                           warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def _make_ema(model: nn.Module, config: TrainConfig):
    from timm.utils import ModelEmaV3

    # Warm-up of the decay (1 − (1 + t)^−3/4, capped at ema_decay) so short runs are not
    # dominated by the initial weights.
    return ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, warmup_power=3 / 4)


def _training_device(device: str | torch.device | None, ctx: DistContext) -> torch.device:
    dev = resolve_device("auto" if device is None else device)
    if dev.type == "cuda" and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return dev


def fit(model: nn.Module, train_data: Tensor | str | os.PathLike[str], config: TrainConfig, *,
        eval_data: Tensor | None = None, out_dir: str | os.PathLike[str] | None = None,
        resume: bool = False, device: str | torch.device | None = None,
        show_progress: bool | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train ``model`` (a FlowModel) by maximum likelihood: minimise the mean bits/dim of the
    dequantised, augmented training batches.

    Args:
        model: the model; trained in place (its raw, non-EMA weights).
        train_data: uint8 images N×C×H×W, or a dataset name/folder (its train split; held-out
            data then defaults to its held-out split).
        config: the ``TrainConfig``.
        eval_data: uint8 held-out images for ``evaluate_bpd`` (of the EMA weights if EMA is on).
        out_dir: where checkpoints and ``metrics.jsonl`` go (None: nothing is written).
        resume: continue from ``out_dir``'s latest checkpoint (exact: same batches, noise,
            optimizer and EMA state as an uninterrupted run).
        device: "auto" (default: CUDA if available; under torchrun cuda:LOCAL_RANK), "cpu", …
        on_log: called with every metrics record (rank 0).

    Returns:
        ``FitResult`` with the final step, the last checkpoint and the last metrics.
    """
    ctx = init_distributed(None if device is None else resolve_device(device))
    dev = _training_device(device, ctx)
    dataset = train_data if isinstance(train_data, (str, os.PathLike)) else None
    if dataset is not None:
        shape = model.input_shape  # type: ignore[attr-defined]
        split = data.heldout_split(dataset)
        if eval_data is None and split is not None:
            eval_data = data.load_for_shape(dataset, split, shape)
        train_data = data.load_for_shape(dataset, "train", shape)
    if config.flip is None:
        config = config.replace(flip=data.default_flip(dataset))
    model.check_images(train_data[:1])  # type: ignore[attr-defined]
    if eval_data is not None:
        model.check_images(eval_data[:1])  # type: ignore[attr-defined]
    if config.batch_size % ctx.world_size:
        raise TrainingError(f"batch_size {config.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes")
    steps_per_epoch = len(train_data) // config.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_data)} training images are fewer than one batch of "
                        f"{config.batch_size}; lower --batch-size")
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise TrainingError("resume needs the output folder of the run to continue")
    if out is not None and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)

    model.to(dev)
    model.train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=config.lr)
    use_amp = dev.type == "cuda" and config.amp != "none"
    amp_dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and config.amp == "fp16" else None
    num_dims = math.prod(model.input_shape)  # type: ignore[attr-defined]

    start_step = 0
    ema = None
    if resume:
        if config.ema_decay is not None:
            ema = _make_ema(model, config)
        meta = load_training_state(checkpoint.resolve_local(out), model,  # type: ignore[arg-type]
                                   ema.module if ema is not None else None, optimizer, scaler)
        # Resuming without EMA from a run that had one: the raw weights load, the EMA is dropped.
        start_step = int(meta["step"])
    else:
        # The explicit data-dependent init (ActNorm) on the first batch, before the EMA copies
        # the weights.
        # Each rank sees its rows of the global batch; ActNorm averages the statistics over
        # ranks, which makes them the global batch's.
        g = _step_generator(config.seed, 0, dev)
        x = _local_rows(data.to_model_space(
            _batch(train_data, 0, config, steps_per_epoch, dev), g), ctx)
        initialize_from_data(model, lambda: model.log_density(x, g))
        if config.ema_decay is not None:
            ema = _make_ema(model, config)
    if start_step >= total_steps:
        raise TrainingError(f"the checkpoint is at step {start_step}, already ≥ the {total_steps} "
                            "steps asked for; ask for more --steps to continue")

    trainer: nn.Module = _LogDensity(model)
    if ctx.active:
        trainer = nn.parallel.DistributedDataParallel(
            trainer, device_ids=[dev.index] if dev.type == "cuda" else None)
    scheduler = _make_scheduler(optimizer, config, total_steps)
    log_path = out / METRICS if out is not None and ctx.is_main else None
    history: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        if not ctx.is_main:
            return
        history.append(record)
        if log_path is not None:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if on_log is not None:
            on_log(record)

    def evaluate(step: int) -> float | None:
        if eval_data is None:
            return None
        value = None
        if ctx.is_main:
            net = ema.module if ema is not None else model
            g = torch.Generator(device=dev).manual_seed(config.eval_seed)
            value = evaluate_bpd(net, eval_data, config.eval_batch_size, g, show_progress=False)
            log({"step": step, "eval_bpd": value, "num_images": len(eval_data)})
        barrier(ctx)
        return value

    step = start_step
    nonfinite = 0
    window_loss = torch.zeros((), dtype=torch.float64, device=dev)
    window_steps = 0
    window_start = time.perf_counter()
    window_pause = 0.0
    last_train = last_eval = None
    checkpoint_path: Path | None = None
    if not resume and step == 0 and config.eval_every is not None:
        last_eval = evaluate(0)
    with progress("train", total=total_steps - start_step, show=show_progress) as advance:
        while step < total_steps:
            x_u8 = _batch(train_data, step, config, steps_per_epoch, dev)
            g = _step_generator(config.seed, step + 1, dev)
            if config.augment:
                x_u8 = data.augment(x_u8, g, max_shift=config.max_shift, flip=config.flip)
            x = _local_rows(data.to_model_space(x_u8, g), ctx)
            scheduler.step_update(num_updates=step + 1)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                log_p = trainer(x, g)
            bpd = metrics.bits_per_dim(log_p.float(), num_dims).mean()
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(bpd) if scaler is not None else bpd).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.grad_clip if config.grad_clip else float("inf"))
            check = all_mean(torch.stack([bpd.detach().double(), grad_norm.double()]), ctx)
            finite = bool(torch.isfinite(check).all())
            if not finite:
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                log({"step": step + 1, "event": "nonfinite", "train_bpd": float(check[0]),
                     "grad_norm": float(check[1]), "consecutive": nonfinite})
                if nonfinite >= config.max_nonfinite:
                    raise TrainingError(
                        f"{nonfinite} consecutive steps gave a non-finite loss or gradient "
                        f"(last at step {step + 1}); lower --lr, set --grad-clip or use amp none. "
                        "No checkpoint was written for them.")
                # Skipped: the batch is consumed without an update and the run goes on.
            else:
                nonfinite = 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update(model, step=step + 1)
                window_loss += check[0]
                window_steps += 1
            step += 1
            advance(1)
            if window_steps and (step % config.log_every == 0 or step == total_steps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                elapsed = time.perf_counter() - window_start - window_pause
                last_train = float(window_loss / window_steps)
                ips = window_steps * config.batch_size / max(elapsed, 1e-9)
                log({"step": step, "train_bpd": last_train, "lr": optimizer.param_groups[0]["lr"],
                     "grad_norm": float(check[1]), "images_per_s": ips})
                advance(0, bpd=f"{last_train:.4f}", img_s=f"{ips:.0f}")
                window_loss.zero_()
                window_steps = 0
                window_start = time.perf_counter()
                window_pause = 0.0
            pause_start = time.perf_counter()
            if step == total_steps or (config.eval_every is not None
                                       and step % config.eval_every == 0):
                last_eval = evaluate(step)
            # A skipped step changes no weights: its checkpoint waits for the next good step.
            if out is not None and ((finite and step % config.checkpoint_every == 0)
                                    or step == total_steps):
                if ctx.is_main:
                    checkpoint_path = save_training_checkpoint(
                        out, step, model, ema.module if ema is not None else None, optimizer,
                        scaler, config.to_dict(), config.keep_checkpoints,
                        {"world_size": ctx.world_size, "model_class": type(model).__name__,
                         "eval_bpd": last_eval if step == total_steps else None})
                barrier(ctx)
            window_pause += time.perf_counter() - pause_start
    return FitResult(step, checkpoint_path, last_eval, last_train, history)


def train_preset(model_name: str, dataset: str | os.PathLike[str], config: TrainConfig, *,
                 out_dir: str | os.PathLike[str], resume: bool = False,
                 overrides: dict[str, Any] | None = None, limit: int | None = None,
                 eval_limit: int | None = None, device: str = "auto",
                 show_progress: bool | None = None) -> FitResult:
    """Build preset ``model_name`` (config ``overrides``), load ``dataset`` at its image size and
    ``fit`` it into ``out_dir``. Every check (preset, device, data, image size, resume
    compatibility) runs before anything is written to ``out_dir``."""
    dev = resolve_device(device)
    model = create_model(model_name, **(overrides or {}))
    out = Path(out_dir)
    if resume:
        checkpoint.check_config_matches(model, checkpoint.resolve_local(out))
    elif out.exists() and (checkpoint.step_folders(out) or (out / checkpoint.LATEST_NAME).exists()):
        raise TrainingError(f"{out} already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    shape = model.input_shape
    train = data.load_for_shape(dataset, "train", shape, limit=limit)
    split = data.heldout_split(dataset)
    heldout = data.load_for_shape(dataset, split, shape, limit=eval_limit) if split else None
    if config.flip is None:
        config = config.replace(flip=data.default_flip(dataset))
    return fit(model, train, config, eval_data=heldout, out_dir=out, resume=resume, device=dev,
               show_progress=show_progress)
