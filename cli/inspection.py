"""``attnflow inspect``: pictures of a model's attention and of its bits/dim on one image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .source import CheckpointOption, RepoOption, checkpoint_source


def _position(text: str | None) -> tuple[int, int] | None:
    from attnflow_zoo.errors import ConfigError

    if text is None:
        return None
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--position takes ROW,COL (pixel indices, e.g. 14,14), got "
                          f"{text!r}") from None
    return row, col


def inspect(
    image: Annotated[Path, typer.Option(help="The image file (PNG, JPEG); fitted to the "
                                        "model's size.")],
    checkpoint: CheckpointOption = None,
    repo: RepoOption = None,
    position: Annotated[str | None, typer.Option(help="ROW,COL: the pixel whose attention row "
                                                 "(iTrans) or map (residual attention) is "
                                                 "drawn over the image (default: the centre).")
                        ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs "
                                      "(attention_level{l}.png, bits_per_dim.png).")
                   ] = Path("inspect"),
    seed: Annotated[int, typer.Option(help="Seed of stochastic log-determinant estimators "
                                      "(residual flows).")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")
                      ] = "auto",
) -> None:
    """Draw, per level, each attention layer's map on an image, and where its bits/dim go.

    iMap: the gate σ(a + b) per position; iTrans: the token attention softmax (rows = query
    tokens) and the chosen token's row over the image; residual attention: its weights between
    positions and the chosen position's map. bits_per_dim.png splits the image's bits/dim by
    level (the flows mix pixels, so per-pixel −log p is not defined): per level, the prior's
    bits per latent dimension at each position; the flow's −log|det| as one number.
    """
    from rich.console import Console

    from attnflow_zoo.evaluation.inspection import inspect_file
    from attnflow_zoo.factory import load_model

    source = checkpoint_source(checkpoint, repo)
    pos = _position(position)
    model = load_model(source)
    result = inspect_file(model, image, out, position=pos, seed=seed, device=device)
    levels = ", ".join(f"{v:+.3f}" for v in result["levels"])
    Console().print(f"{result['bits_per_dim']:.4f} bits/dim = levels ({levels}) + flow "
                    f"{result['flow']:+.3f} + 8; wrote {', '.join(result['files'])}")
