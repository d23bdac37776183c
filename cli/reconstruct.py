"""``attnflow reconstruct``: images -> latents -> images, with the largest error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .source import CheckpointOption, RepoOption, checkpoint_source


def reconstruct(
    image: Annotated[list[Path], typer.Option("--image", help="An image file (PNG, JPEG); "
                                              "repeat for more. Fitted to the model's size.")],
    checkpoint: CheckpointOption = None,
    repo: RepoOption = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG: inputs in the first row, "
                                         "reconstructions in the second.")
                      ] = Path("reconstruction.png"),
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")
                      ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Encode images to every per-level latent and decode them back; print the largest error.

    The images are taken at their 8-bit bins' centres; the error is max |f⁻¹(f(x)) − x| in
    units of the [0, 1] intensity (1/256 is one grey level). It reports how many
    reconstructions were non-finite or out of range before the uint8 conversion (drawn marked).
    """
    from rich.console import Console

    from attnflow_zoo.data.quantize import describe_unrepresentable
    from attnflow_zoo.evaluation.latents import reconstruct_files
    from attnflow_zoo.factory import load_model

    source = checkpoint_source(checkpoint, repo)
    model = load_model(source)
    result = reconstruct_files(model, image, output, device=device)
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"{result['num_images']} images: max error {result['max_error']:.3e}, "
                  f"{result['num_changed']} of the 8-bit values changed; wrote "
                  f"{result['path']}")
    nonfinite, out_of_range = result["num_nonfinite"], result["num_out_of_range"]
    console.print(("warning: " if nonfinite or out_of_range else "")
                  + describe_unrepresentable(result["num_images"], nonfinite, out_of_range))
