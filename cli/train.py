"""``attnflow train``: train a zoo preset on a dataset, with checkpoints and exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_MODEL = "Model"
_DATA = "Data"
_OPTIM = "Optimisation"
_RUN = "Run"


def train(
    model: Annotated[str, typer.Option(help="Zoo preset (see `attnflow models`).",
                                       rich_help_panel=_MODEL)],
    dataset: Annotated[str, typer.Option(help="cifar10, svhn, mnist, celeba or a local "
                                         "`datasets` folder (imagefolder / parquet).",
                                         rich_help_panel=_DATA)],
    attn: Annotated[str | None, typer.Option(help="Override the preset's attention: imap, "
                                             "itrans or none.", rich_help_panel=_MODEL)] = None,
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
    lr: Annotated[float | None, typer.Option(help="Adamax learning rate.",
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
    limit: Annotated[int | None, typer.Option(help="Use only the first N training images.",
                                              rich_help_panel=_DATA)] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Use only the first N held-out images.",
                                                   rich_help_panel=_DATA)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<model>).",
                                             rich_help_panel=_RUN)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly.",
                                         rich_help_panel=_RUN)] = False,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.",
                                                         rich_help_panel=_RUN)] = None,
    log_every: Annotated[int | None, typer.Option(help="Log metrics every N steps.",
                                                  rich_help_panel=_RUN)] = None,
    eval_every: Annotated[int | None, typer.Option(help="Held-out bits/dim every N steps "
                                                   "(always at the end).",
                                                   rich_help_panel=_RUN)] = None,
    eval_batch_size: Annotated[int | None, typer.Option(help="Batch size of the held-out "
                                                        "evaluation.",
                                                        rich_help_panel=_RUN)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of shuffling, augmentation and noise.",
                                             rich_help_panel=_RUN)] = None,
    amp: Annotated[str | None, typer.Option(help="none, bf16 or fp16 (CUDA only).",
                                            rich_help_panel=_RUN)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.",
                                        rich_help_panel=_RUN)] = "auto",
) -> None:
    """Train a zoo preset by maximum likelihood (Adamax + warm-up + EMA, mAR-SCF recipe).

    Options left out take TrainConfig's defaults.

    Writes <out>/step-N/ checkpoints (config.json + model.safetensors, loadable with
    from_pretrained; `attnflow evaluate --checkpoint <out>` reads the latest) and
    <out>/metrics.jsonl. Under `torchrun --nproc_per_node G` it trains on G GPUs.
    """
    from rich.console import Console

    from attnflow_zoo.training import TrainConfig, train_preset

    if steps is None and epochs is None:
        raise typer.BadParameter("give --steps or --epochs")
    overrides = {k: v for k, v in (("attention", attn), ("image_size", image_size),
                                   ("in_channels", in_channels)) if v is not None}
    given = {"steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "warmup_steps": warmup_steps, "schedule": schedule, "grad_clip": grad_clip,
             "augment": augment, "flip": flip, "checkpoint_every": checkpoint_every,
             "log_every": log_every, "eval_every": eval_every,
             "eval_batch_size": eval_batch_size, "seed": seed, "amp": amp}
    settings = {k: v for k, v in given.items() if v is not None}
    if ema_decay is not None:
        settings["ema_decay"] = ema_decay or None  # 0 disables the EMA
    config = TrainConfig(**settings)
    out = out if out is not None else Path("runs") / model
    result = train_preset(model, dataset, config, out_dir=out, resume=resume,
                          overrides=overrides, limit=limit, eval_limit=eval_limit, device=device)
    if result.checkpoint is None:  # not rank 0 under torchrun
        return
    console = Console()
    console.print(f"step {result.step}: train bits/dim {result.train_bpd:.4f}"
                  + (f", held-out bits/dim {result.eval_bpd:.4f}" if result.eval_bpd else ""))
    console.print(f"checkpoint: {result.checkpoint}")
