"""``attnflow push``: check a checkpoint, render its model card, upload it to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def push(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Local checkpoint directory "
                                             "(config.json + model.safetensors) or a `train "
                                             "--out` folder (its latest checkpoint).")],
    repo: Annotated[str, typer.Option("--repo", help="Target Hub repo id, user/name.")],
    metrics: Annotated[str | None, typer.Option(help="Measured metrics for the card: the JSON "
                                                "that `attnflow evaluate --json` prints (a file "
                                                "or the JSON itself).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    preset: Annotated[str | None, typer.Option(help="Zoo entry whose card to use (default: "
                                               "the one recorded in config.json).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Run every check and write the "
                                          "card locally; upload nothing.")] = False,
    card_out: Annotated[Path | None, typer.Option("--card-out", "-o", help="Where --dry-run "
                                                  "writes the card (default: README.md in the "
                                                  "checkpoint).")] = None,
) -> None:
    """Upload exactly config.json, model.safetensors and a rendered README.md (model card).

    The checkpoint is loaded strictly and its round trip inverse(forward(x)) = x is checked
    before anything is uploaded. The card is rendered from the checkpoint's run record (what
    training really did), its recipe and --metrics.
    """
    from rich.console import Console

    from attnflow_zoo.evaluation.results import load_metrics
    from attnflow_zoo.publishing.publish import push_checkpoint

    metrics_dict = load_metrics(metrics) if metrics is not None else None
    result = push_checkpoint(checkpoint, repo, metrics=metrics_dict, private=private,
                             preset=preset, dry_run=dry_run, card_out=card_out)
    if dry_run:
        Console().print(f"dry run: {checkpoint} passed every check; card for {repo} written to "
                        f"{result}; nothing was uploaded")
    else:
        Console().print(f"pushed {checkpoint} to {repo}: {result}")
