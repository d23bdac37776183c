"""``attnflow interpolate``: a spherical path between two images in the whitened latents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .source import CheckpointOption, RepoOption, checkpoint_source


def interpolate(
    a: Annotated[Path, typer.Option("--a", help="The first image file (the strip's left end).")],
    b: Annotated[Path, typer.Option("--b", help="The second image file (the right end).")],
    checkpoint: CheckpointOption = None,
    repo: RepoOption = None,
    steps: Annotated[int, typer.Option(help="Images on the path, the two ends included (≥ 2).")
                     ] = 8,
    output: Annotated[Path, typer.Option("-o", "--output", help="The PNG strip to write.")
                      ] = Path("interpolation.png"),
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")
                      ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Interpolate two images along a great circle of their whitened latents (as Glow does).

    Every level's latent is standardised by its prior given the coarser levels (the mAR prior
    channel by channel), the two vectors are joined by spherical interpolation, and each point
    is decoded through the priors' recurrence and the inverse flow. It reports how many images
    were non-finite or out of range before the uint8 conversion (drawn marked).
    """
    from rich.console import Console

    from attnflow_zoo.data.quantize import describe_unrepresentable
    from attnflow_zoo.evaluation.latents import check_steps, interpolate_files
    from attnflow_zoo.factory import load_model

    source = checkpoint_source(checkpoint, repo)
    check_steps(steps)
    model = load_model(source)
    result = interpolate_files(model, a, b, steps, output, device=device)
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"wrote {result['steps']} images from {a} to {b} to {result['path']}")
    nonfinite, out_of_range = result["num_nonfinite"], result["num_out_of_range"]
    console.print(("warning: " if nonfinite or out_of_range else "")
                  + describe_unrepresentable(steps, nonfinite, out_of_range))
    if nonfinite:
        console.print("the model's inverse overflows between these images, which happens away "
                      "from the data a short training run has seen")
