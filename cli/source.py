"""The checkpoint a command reads: ``--checkpoint DIR`` or ``--repo ID``, exactly one (the one
place that rule and the two options' help are written)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PANEL = "Checkpoint"
CheckpointOption = Annotated[Path | None, typer.Option(
    "--checkpoint", help="A checkpoint folder or a `train --out` folder (its latest checkpoint).",
    rich_help_panel=PANEL)]
RepoOption = Annotated[str | None, typer.Option(
    "--repo", help="A Hub repo id, e.g. user/attnflow-x.", rich_help_panel=PANEL)]


def checkpoint_source(checkpoint: Path | None, repo: str | None) -> Path | str:
    """The folder or Hub id to load; ``ConfigError`` unless exactly one is given."""
    from attnflow_zoo.errors import ConfigError

    if (checkpoint is None) == (repo is None):
        raise ConfigError("give exactly one of --checkpoint DIR or --repo ID")
    return checkpoint if checkpoint is not None else repo
