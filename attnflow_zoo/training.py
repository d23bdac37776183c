"""Training: ``TrainConfig`` + ``fit`` (Adamax, warm-up, EMA, checkpoints, exact resume, DDP).

The recipe is mAR-SCF's (Mahajan et al., CVPR 2020; SPEC §3): Adamax, lr 8e-4, linear warm-up,
random shift ≤ 3 px + flip. Warm-up is counted in optimizer steps here (the original counted
images: ``warmup_steps = warmup_images / batch_size``).

Checkpoints are directories ``<out>/step-NNNNNNN/`` in the ``save_pretrained`` layout
(``config.json`` + ``model.safetensors``, the EMA weights when EMA is on, loadable with
``Model.from_pretrained``) plus ``training_state/`` (raw weights, optimizer, scaler, step as
safetensors + JSON; never a pickle). Each is written into a temporary directory and renamed, and
``<out>/latest`` names the newest, so a crash never leaves a half-written checkpoint.

Randomness is counter-based: the generator of step ``s`` on rank ``r`` is seeded from
``(seed, s, r)`` and the shuffling of epoch ``e`` from ``(seed, e)``, so the RNG state of a run is
its step count and resuming is exact.

Multi-GPU: run under ``torchrun``; ``fit`` joins the process group, shards every epoch's
permutation over ranks (``DistributedSampler``-style, global batch = ``batch_size``), averages
gradients with DDP and metrics with all-reduce, and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import data, metrics
from .core import resolve_device
from .errors import CheckpointError, DataError, ShapeError, TrainingError
from .hub import LATEST_NAME as LATEST
from .hub import load_model, resolve_checkpoint
from .progress import progress

STATE_DIR = "training_state"
METRICS = "metrics.jsonl"
_STATE_FORMAT = 1


@dataclass
class TrainConfig:
    """Training settings (JSON-plain; saved with every checkpoint).

    Attributes:
        steps: optimizer steps in total (wins over ``epochs``).
        epochs: passes over the training set (each epoch = N // batch_size steps).
        batch_size: global batch (split evenly over ranks under torchrun).
        lr: Adamax learning rate after warm-up (mAR-SCF: 8e-4).
        warmup_steps: linear warm-up length in optimizer steps (the original counted images).
        schedule: "constant" or "cosine" (timm schedulers) after warm-up.
        min_lr: the cosine schedule's final lr.
        grad_clip: max global grad norm, or None for no clipping.
        ema_decay: EMA decay of the weights (timm ModelEmaV3 with warm-up), None for no EMA.
        augment: random shift ≤ ``max_shift`` px with edge padding (+ flip if ``flip``).
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        keep_checkpoints: how many step directories to keep (the newest).
        log_every: log training metrics every this many steps.
        eval_every: held-out bits/dim every this many steps (and at the end), None: only at end.
        eval_batch_size: batch size of the held-out evaluation (part of its noise stream).
        eval_seed: seed of the held-out evaluation's dequantisation noise.
        seed: seed of shuffling, augmentation and dequantisation noise.
        max_nonfinite: stop with ``TrainingError`` after this many consecutive non-finite steps.
        amp: "none", "bf16" or "fp16" autocast (CUDA only; the log-density is summed in fp32).
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 200
    schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = 0.999
    augment: bool = True
    max_shift: int = 3
    flip: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int | None = None
    eval_batch_size: int = 256
    eval_seed: int = 0
    seed: int = 0
    max_nonfinite: int = 10
    amp: str = "none"

    def __post_init__(self) -> None:
        from .errors import ConfigError

        if self.steps is None and self.epochs is None:
            raise ConfigError("give the training length: steps or epochs")
        for name in ("steps", "epochs", "batch_size", "checkpoint_every", "log_every",
                     "eval_every", "eval_batch_size", "max_nonfinite", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    """What ``fit`` returns: the final step, the checkpoint it wrote and the last metrics."""

    step: int
    checkpoint: Path | None
    eval_bpd: float | None
    train_bpd: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_bpd(model: nn.Module, images_u8: Tensor, batch_size: int = 256,
                 generator: torch.Generator | None = None, show_progress: bool | None = None
                 ) -> float:
    """Mean per-image bits/dim of ``images_u8`` (N×C×H×W uint8), single-sample dequantisation.

    bpd = (1/N) Σ_i model.bits_per_dim(x_i) (SPEC §4). The noise is drawn batch after batch from
    ``generator`` (on the model's device if given on CPU it is used there and moved), so the same
    seed and batch size give the same number — ``fit`` logs with ``eval_seed`` /
    ``eval_batch_size`` and ``attnflow evaluate`` uses the same defaults.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with progress("evaluate", total=len(images_u8), show=show_progress) as advance:
            for start in range(0, len(images_u8), batch_size):
                batch = images_u8[start:start + batch_size]
                bpd = model.bits_per_dim(batch, generator=generator)
                total += bpd.double().sum().cpu()
                advance(len(batch), bpd=f"{total.item() / (start + len(batch)):.4f}")
    finally:
        model.train(was_training)
    return float(total / len(images_u8))


# --- checkpoints -----------------------------------------------------------------------------

def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = model.config  # type: ignore[attr-defined]
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def check_same_architecture(model: nn.Module, checkpoint: Path) -> None:
    """``CheckpointError`` unless ``checkpoint``'s config.json describes ``model``'s architecture
    and config (JSON-compared, extra bookkeeping keys such as a format version ignored)."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {checkpoint / 'config.json'}: {err}") from err
    saved_cfg = saved.get("config", saved) if isinstance(saved.get("config"), dict) else saved
    arch = saved.get("architecture")
    ours = json.loads(json.dumps(_config_dict(model)))
    diff = sorted(k for k in ours if saved_cfg.get(k, object()) != ours[k])
    if (arch is not None and arch != type(model).__name__) or diff:
        what = f"a {arch}" if arch and arch != type(model).__name__ else \
            "a model with different " + ", ".join(diff[:5])
        raise CheckpointError(f"the checkpoint {checkpoint} is {what} than the "
                              f"{type(model).__name__} being trained; resume with the same "
                              "--model/options or pick a new --out")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _save_checkpoint(out_dir: Path, step: int, raw: nn.Module, ema_model: nn.Module | None,
                     optimizer: torch.optim.Optimizer, scaler: Any, config: TrainConfig,
                     extra: dict[str, Any]) -> Path:
    for p in raw.parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"weights became non-finite before the checkpoint at step {step}; "
                                "nothing was written — lower --lr or set grad clipping")
    name = f"step-{step:07d}"
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}-", suffix=".tmp"))
    try:
        (ema_model if ema_model is not None else raw).save_pretrained(tmp)  # type: ignore
        state_dir = tmp / STATE_DIR
        state_dir.mkdir()
        if ema_model is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()},
                      str(state_dir / "model.safetensors"))
        tensors, plain = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        meta = {"format": _STATE_FORMAT, "step": step, "ema": ema_model is not None,
                "optimizer": plain, "scaler": scaler.state_dict() if scaler is not None else None,
                "train_config": config.to_dict(), **extra}
        (state_dir / "state.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(out_dir / LATEST, name + "\n")
    kept = sorted(p for p in out_dir.glob("step-*") if p.is_dir())
    for old in kept[:-config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_state(checkpoint: Path, raw: nn.Module, ema_model: nn.Module | None,
                optimizer: torch.optim.Optimizer, scaler: Any) -> dict[str, Any]:
    state_dir = checkpoint / STATE_DIR
    try:
        meta = json.loads((state_dir / "state.json").read_text())
        weights = load_file(str(checkpoint / "model.safetensors"))
        raw_weights = load_file(str(state_dir / "model.safetensors")) if meta["ema"] else weights
        opt_tensors = load_file(str(state_dir / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{checkpoint} has no complete training state ({err}); it cannot "
                              "be resumed — start a new --out") from err
    if meta.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{checkpoint} has training-state format {meta.get('format')}, "
                              f"this version reads {_STATE_FORMAT}")
    try:
        raw.load_state_dict(raw_weights, strict=True)
        if ema_model is not None:
            ema_model.load_state_dict(weights if meta["ema"] else raw_weights, strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{checkpoint} does not match the model being trained: "
                              f"{str(err).splitlines()[0]}; resume with the same --model/options "
                              "or pick a new --out") from err
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta


# --- distributed -----------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_mean(values: Tensor, ctx: _Dist) -> Tensor:
    if ctx.active:
        values = values.clone()
        dist.all_reduce(values)
        values /= ctx.world_size
    return values


# --- the loop --------------------------------------------------------------------------------

class _LogDensity(nn.Module):
    """Wraps a FlowModel so DDP sees the training computation as its ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.log_density(x)


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return g


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_images: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch + 1)
    return torch.randperm(num_images, generator=g)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    warmup = min(config.warmup_steps, total_steps)
    if config.schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=config.min_lr,
                                 warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=False,
                                 t_in_epochs=False)
    return StepLRScheduler(optimizer, decay_t=float("inf"), decay_rate=1.0, warmup_t=warmup,
                           warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def load_training_data(dataset: str | os.PathLike[str], model: nn.Module, split: str = "train",
                       limit: int | None = None) -> Tensor:
    """``data.load_images`` at the model's image size; ``DataError`` if the images don't fit."""
    c, h, w = model.input_shape  # type: ignore[attr-defined]
    images = data.load_images(dataset, split, image_size=h if h == w else None, limit=limit)
    try:
        model.check_images(images[:1])  # type: ignore[attr-defined]
    except ShapeError as err:
        got = "×".join(map(str, images.shape[1:]))
        raise DataError(f"{dataset} ({split}) gives images of {got} but the model takes "
                        f"{c}×{h}×{w}; pick a model, --image-size or --in-channels that fits "
                        "the data") from err
    return images


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
            data then defaults to its test split).
        config: the ``TrainConfig``.
        eval_data: uint8 held-out images for ``evaluate_bpd`` (of the EMA weights if EMA is on).
        out_dir: where checkpoints and ``metrics.jsonl`` go (None: nothing is written).
        resume: continue from ``out_dir``'s latest checkpoint (exact: same batches, noise,
            optimizer and EMA state as an uninterrupted run).
        device: "cpu", "cuda", … (default: CUDA if available; under torchrun cuda:LOCAL_RANK).
        on_log: called with every metrics record (rank 0).

    Returns:
        ``FitResult`` with the final step, the last checkpoint and the last metrics.
    """
    dev = torch.device(device) if device is not None else None
    ctx = _init_distributed(dev)
    if dev is None:
        dev = torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() \
            else torch.device("cpu")
    elif dev.type == "cuda" and ctx.active:
        dev = torch.device("cuda", ctx.local_rank)
    if isinstance(train_data, (str, os.PathLike)):
        split = heldout_split(train_data)
        if eval_data is None and split is not None:
            eval_data = load_training_data(train_data, model, split)
        train_data = load_training_data(train_data, model, "train")
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
    if out is not None and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if resume and out is None:
        raise TrainingError("resume needs the output folder of the run to continue")

    model.to(dev)
    model.train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=config.lr)
    use_amp = dev.type == "cuda" and config.amp != "none"
    amp_dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and config.amp == "fp16" else None
    num_dims = math.prod(model.input_shape)  # type: ignore[attr-defined]
    local_batch = config.batch_size // ctx.world_size

    start_step = 0
    ema = None
    if resume:
        checkpoint = resolve_checkpoint(out)  # type: ignore[arg-type]
        check_same_architecture(model, checkpoint)
        if config.ema_decay is not None:
            ema = _make_ema(model, config)
        meta = _load_state(checkpoint, model, ema.module if ema is not None else None,
                           optimizer, scaler)
        # Resuming without EMA from a run that had one: the raw weights load, the EMA is dropped.
        start_step = int(meta["step"])
    else:
        # Data-dependent init (ActNorm) on the first batch before the EMA copies the weights.
        with torch.no_grad():
            x_u8 = _batch(train_data, 0, config, steps_per_epoch, ctx, local_batch, dev)
            g = _step_generator(config.seed, 0, ctx.rank, dev)
            model.log_density(data.dequantize(x_u8, g) - 0.5)
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
        if ctx.active:
            dist.barrier()
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
            x_u8 = _batch(train_data, step, config, steps_per_epoch, ctx, local_batch, dev)
            g = _step_generator(config.seed, step + 1, ctx.rank, dev)
            if config.augment:
                x_u8 = data.augment(x_u8, g, max_shift=config.max_shift, flip=config.flip)
            x = data.dequantize(x_u8, g) - 0.5
            scheduler.step_update(num_updates=step + 1)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                log_p = trainer(x)
            bpd = metrics.bits_per_dim(log_p.float(), num_dims).mean()
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(bpd) if scaler is not None else bpd).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.grad_clip if config.grad_clip else float("inf"))
            check = _all_mean(torch.stack([bpd.detach().double(), grad_norm.double()]), ctx)
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
                    checkpoint_path = _save_checkpoint(
                        out, step, model, ema.module if ema is not None else None, optimizer,
                        scaler, config, {"world_size": ctx.world_size,
                                         "model_class": type(model).__name__,
                                         "eval_bpd": last_eval if step == total_steps else None})
                if ctx.active:
                    dist.barrier()
            window_pause += time.perf_counter() - pause_start
    return FitResult(step, checkpoint_path, last_eval, last_train, history)


def _make_ema(model: nn.Module, config: TrainConfig):
    from timm.utils import ModelEmaV3

    # Warm-up of the decay (1 − (1 + t)^−3/4, capped at ema_decay) so short runs are not
    # dominated by the initial weights.
    return ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, warmup_power=3 / 4)


def _batch(images: Tensor, step: int, config: TrainConfig, steps_per_epoch: int, ctx: _Dist,
           local_batch: int, dev: torch.device) -> Tensor:
    epoch, index = divmod(step, steps_per_epoch)
    perm = _epoch_permutation(len(images), config.seed, epoch)
    chosen = perm[index * config.batch_size:(index + 1) * config.batch_size]
    mine = chosen[ctx.rank * local_batch:(ctx.rank + 1) * local_batch]
    return images[mine].to(dev, non_blocking=True)


# --- entry points of `attnflow train` / `attnflow evaluate` ----------------------------------

def heldout_split(dataset: str | os.PathLike[str]) -> str | None:
    """The split held-out bits/dim is reported on: "test" (every named dataset has it), else a
    local folder's test/valid/validation split, else None."""
    spec = data.DATASETS.get(str(dataset).lower())
    if spec is not None:
        return "test"
    folder = Path(dataset)
    for name in ("test", "valid", "validation"):
        if (folder / name).is_dir():
            return name
    return None


def train_preset(model_name: str, dataset: str | os.PathLike[str], config: TrainConfig, *,
                 out_dir: str | os.PathLike[str], resume: bool = False,
                 overrides: dict[str, Any] | None = None, limit: int | None = None,
                 eval_limit: int | None = None, device: str = "auto",
                 show_progress: bool | None = None) -> FitResult:
    """Build preset ``model_name`` (config ``overrides``), load ``dataset`` at its image size and
    ``fit`` it into ``out_dir``. Every check (preset, data, image size, resume compatibility)
    runs before anything is written to ``out_dir``."""
    from .registry import create_model

    model = create_model(model_name, **(overrides or {}))
    out = Path(out_dir)
    if resume:
        check_same_architecture(model, resolve_checkpoint(out))
    elif out.exists() and (any(out.glob("step-*")) or (out / LATEST).exists()):
        raise TrainingError(f"{out} already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    train = load_training_data(dataset, model, "train", limit=limit)
    split = heldout_split(dataset)
    heldout = load_training_data(dataset, model, split, limit=eval_limit) if split else None
    return fit(model, train, config, eval_data=heldout, out_dir=out, resume=resume,
               device=resolve_device(device), show_progress=show_progress)


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], dataset: str | os.PathLike[str],
                        split: str = "test", *, batch_size: int = 256, seed: int = 0,
                        limit: int | None = None, device: str = "auto", fid: bool = False,
                        num_samples: int = 50_000, temperature: float = 1.0,
                        inception_weights: str | os.PathLike[str] | None = None,
                        show_progress: bool | None = None) -> dict[str, Any]:
    """Held-out bits/dim (``evaluate_bpd`` with a generator seeded ``seed`` — the numbers ``fit``
    logs with the same seed and batch size) and, with ``fid``, the FID of ``num_samples``
    samples against the dataset's train split."""
    dev = resolve_device(device)
    model = load_model(checkpoint).to(dev)
    images = load_training_data(dataset, model, split, limit=limit)
    g = torch.Generator(device=dev).manual_seed(seed)
    result: dict[str, Any] = {"bits_per_dim": evaluate_bpd(model, images, batch_size, g,
                                                           show_progress=show_progress),
                              "split": split, "num_images": len(images), "dataset": str(dataset),
                              "estimate": "single-sample dequantisation"}
    if fid:
        try:
            from .inception import load_inception
            from .metrics import dataset_statistics, fid_from_model
        except ImportError as err:
            from .errors import AttnFlowError

            raise AttnFlowError("FID is not available in this version of attnflow_zoo "
                                "(no Inception feature extractor); evaluate without --fid") from err
        extractor = load_inception(inception_weights, device=dev)
        reference = dataset_statistics(dataset, "train", extractor,
                                       image_size=model.input_shape[1])  # type: ignore
        sample_gen = torch.Generator(device=dev).manual_seed(seed)
        res = fid_from_model(model, reference, num_samples=num_samples, temperature=temperature,
                             generator=sample_gen, extractor=extractor,
                             reference=f"{dataset} train")
        result.update(res.as_metrics())
    return result
