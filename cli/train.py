"""``attnflow train``: train a zoo preset on a dataset, with checkpoints and exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .dataset import dataset_help
from .threads import ThreadsOption

_MODEL = "Model"
_DATA = "Data"
_OPTIM = "Optimisation"
_RUN = "Run"


def train(
    model: Annotated[str, typer.Option(help="Zoo preset (see `attnflow models`).",
                                       rich_help_panel=_MODEL)],
    dataset: Annotated[str, typer.Option(help=dataset_help(), rich_help_panel=_DATA)],
    attn: Annotated[str | None, typer.Option(help="Override the preset's attention: imap, "
                                             "itrans or none.", rich_help_panel=_MODEL)] = None,
    conditional: Annotated[bool, typer.Option("--conditional", help="Make the model "
                                              "class-conditional on the "
                                              "dataset's labels (its `label` column or class "
                                              "folders); `_cond_` presets are already.",
                                              rich_help_panel=_MODEL)] = False,
    image_size: Annotated[int | None, typer.Option(help="Override the model's image size (the "
                                                   "data is cropped/resized/padded to it).",
                                                   rich_help_panel=_MODEL)] = None,
    in_channels: Annotated[int | None, typer.Option(help="Override the model's channels (1 for "
                                                    "grey data).", rich_help_panel=_MODEL)] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps in total.",
                                              rich_help_panel=_OPTIM)] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (if --steps is not given).",
                                               rich_help_panel=_OPTIM)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.",
                                                   rich_help_panel=_OPTIM)] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (of the recipe's optimizer).",
                                             rich_help_panel=_OPTIM)] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up, in optimizer steps.",
                                                     rich_help_panel=_OPTIM)] = None,
    schedule: Annotated[str | None, typer.Option(help="constant or cosine after warm-up.",
                                                 rich_help_panel=_OPTIM)] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm.",
                                                    rich_help_panel=_OPTIM)] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay of the weights, 0 disables.",
                                                    rich_help_panel=_OPTIM)] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Random shift "
                                                 "≤ 3 px.",
                                                 rich_help_panel=_DATA)] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Horizontal flips "
                                              "(default: the dataset's rule: off for digits and "
                                              "local folders).",
                                              rich_help_panel=_DATA)] = None,
    noise_std: Annotated[float | None, typer.Option(help="Train on the bins' centres plus "
                                                    "Gaussian noise of this σ (model space; "
                                                    "TarFlow's sample-quality training; the "
                                                    "checkpoint records it). 0: uniform "
                                                    "dequantisation.",
                                                    rich_help_panel=_DATA)] = None,
    limit: Annotated[int | None, typer.Option(help="Use N training images: a seeded random "
                                              "subset, the same in every command.",
                                              rich_help_panel=_DATA)] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Score N held-out images (a seeded "
                                                   "random subset; `evaluate --limit N` scores "
                                                   "the same).", rich_help_panel=_DATA)] = None,
    validation: Annotated[float | None, typer.Option(help="Validation images carved out of the "
                                                     "training images (seeded by --seed): a "
                                                     "fraction < 1 or a count; 0 for none. They "
                                                     "choose best/ (default 0.02).",
                                                     rich_help_panel=_DATA)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<model>).",
                                             rich_help_panel=_RUN)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly, from its "
                                         "newest intact checkpoint.",
                                         rich_help_panel=_RUN)] = False,
    override: Annotated[list[str] | None, typer.Option(
        "--override", metavar="KEY", help="With --resume: let this recorded setting change "
        "(repeatable, e.g. --override lr); without it a changed setting is refused.",
        rich_help_panel=_RUN)] = None,
    keep_last: Annotated[int | None, typer.Option(help="Keep the newest N step checkpoints "
                                                  "(best/ is kept apart; default 2).",
                                                  rich_help_panel=_RUN)] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.",
                                                         rich_help_panel=_RUN)] = None,
    log_every: Annotated[int | None, typer.Option(help="Log metrics (and, off a terminal, a "
                                                  "progress line) every N steps.",
                                                  rich_help_panel=_RUN)] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validation bits/dim and a sample "
                                                   "grid every N steps (always at the end; the "
                                                   "held-out split is scored at the end only).",
                                                   rich_help_panel=_RUN)] = None,
    eval_batch_size: Annotated[int | None, typer.Option(help="Batch size of the validation and "
                                                        "held-out evaluations.",
                                                        rich_help_panel=_RUN)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the initial weights, the "
                                             "validation split, shuffling, augmentation and "
                                             "noise.",
                                             rich_help_panel=_RUN)] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16 (CPU and CUDA) or fp16 "
                                                  "(CUDA): autocast of the conditioners and "
                                                  "prior convolutions; logdets stay fp32.",
                                                  rich_help_panel=_RUN)] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile "
                                                 "the training step (first step slower).",
                                                 rich_help_panel=_RUN)] = None,
    amp: Annotated[str | None, typer.Option(hidden=True, help="Old name of --precision "
                                            "(none = fp32).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.",
                                        rich_help_panel=_RUN)] = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Train a zoo preset by maximum likelihood with its recipe (optimizer, warm-up, EMA, noise).

    Options left out take the preset's training recipe (`attnflow models` shows it), e.g.
    `attnflow train --model attnflow_imap_cifar10 --dataset cifar10` trains the published
    recipe with no other flag; --steps or --epochs override its length.

    Writes <out>/step-N/ checkpoints (config.json + model.safetensors, loadable with
    from_pretrained; `attnflow evaluate --checkpoint <out>` reads the latest), <out>/best/
    (lowest validation bits/dim), metrics.jsonl, run.json (what the run did), TensorBoard
    events in <out>/tensorboard, and curves.png + samples.png at the end. Ctrl-C or SIGTERM
    finish the step, write a checkpoint and print the resume command. Under
    `torchrun --nproc_per_node G` it trains on G GPUs.
    """
    from attnflow_zoo.resources import use_threads
    from attnflow_zoo.settings import legacy_settings
    from attnflow_zoo.training import TrainingInterrupted, train_preset
    from attnflow_zoo.training.recipes import plan
    from attnflow_zoo.training.run import default_run_dir

    overrides = {k: v for k, v in (("attention", attn), ("image_size", image_size),
                                   ("in_channels", in_channels)) if v is not None}
    given = {"steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "warmup_steps": warmup_steps, "schedule": schedule, "grad_clip": grad_clip,
             "augment": augment, "flip": flip, "noise_std": noise_std,
             "checkpoint_every": checkpoint_every,
             "log_every": log_every, "eval_every": eval_every,
             "eval_batch_size": eval_batch_size, "seed": seed, "compile": compile,
             "precision": precision, "amp": amp, "keep_checkpoints": keep_last,
             "validation": validation}  # one number: a fraction below 1 or a count of images
    settings = legacy_settings({k: v for k, v in given.items() if v is not None})
    if ema_decay is not None:
        settings["ema_decay"] = ema_decay or None  # 0 disables the EMA
    resolved = plan(model, model_overrides=overrides, **settings)
    out = out if out is not None else default_run_dir(model)
    use_threads(threads)
    try:
        result = train_preset(resolved, dataset, out_dir=out, resume=resume, limit=limit,
                              eval_limit=eval_limit, device=device, allow_changes=override or (),
                              conditional=conditional)
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        typer.echo(f"resume with: {_resume_command()}", err=True)
        raise typer.Exit(err.exit_code) from None
    if result.checkpoint is None:  # not rank 0 under torchrun
        return
    parts = [f"step {result.step}: train bits/dim {result.train_bpd:.4f}"]
    if result.val_bpd is not None:
        parts.append(f"validation {result.val_bpd:.4f}")
    if result.eval_bpd is not None:
        parts.append(f"held-out {result.eval_bpd:.4f}")
    # Plain lines (no wrapping of long paths): scripts read them.
    typer.echo(", ".join(parts))
    typer.echo(f"checkpoint: {result.checkpoint}")
    if result.best is not None:
        typer.echo(f"best: {out / 'best'} (step {result.best['step']}, validation bits/dim "
                      f"{result.best['bpd']:.4f})")


def _resume_command() -> str:
    """The command line that continues this run: the same arguments plus --resume."""
    import shlex
    import sys

    args = sys.argv[1:]
    return shlex.join(["attnflow", *args, *([] if "--resume" in args else ["--resume"])])
