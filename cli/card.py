"""``attnflow card``: write a checkpoint's model card locally (what `push` would upload)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def card(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Local checkpoint directory or "
                                             "a `train --out` folder (its latest checkpoint).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the card "
                                                "(default: README.md in the checkpoint).")] = None,
    metrics: Annotated[str | None, typer.Option(help="Measured metrics: the JSON that `attnflow "
                                                "evaluate --json` prints (a file or the JSON "
                                                "itself).")] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="The Hub repo id the card will live "
                                             "at (shown in its usage snippet).")] = None,
    preset: Annotated[str | None, typer.Option(help="Zoo entry whose card to use (default: "
                                               "the one recorded in config.json).")] = None,
) -> None:
    """Render the model card from the checkpoint's run record, its recipe and --metrics."""
    from rich.console import Console

    from attnflow_zoo.evaluation.results import load_metrics
    from attnflow_zoo.publishing.publish import write_card

    metrics_dict = load_metrics(metrics) if metrics is not None else None
    path = write_card(checkpoint, output, repo, metrics=metrics_dict, preset=preset)
    Console().print(f"card written to {path}")
