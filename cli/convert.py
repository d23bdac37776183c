"""``attnflow convert``: import a peer's checkpoint as a zoo checkpoint (no code unpickled)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Import a peer's checkpoint as a zoo checkpoint (config.json + "
                       "model.safetensors); its tensors are read without unpickling code.",
                  no_args_is_help=True)


@app.command("ml-tarflow")
def ml_tarflow(
    file: Annotated[Path, typer.Argument(help="The .pth that apple/ml-tarflow's train.py wrote "
                                         "(model.state_dict()).")],
    out: Annotated[Path, typer.Option("--out", help="The zoo checkpoint directory to write.")],
    in_channels: Annotated[int, typer.Option(help="Image channels C (the patch size follows "
                                             "from the token size C·P²).")] = 3,
    head_dim: Annotated[int, typer.Option(help="Attention head width (ml-tarflow: 64).")] = 64,
    noise_std: Annotated[float | None, typer.Option(help="Training noise σ in ml-tarflow's "
                                                    "[-1, 1] units (0: uniform "
                                                    "dequantisation); default: read from "
                                                    "ml-tarflow's file name.")] = None,
) -> None:
    """Convert an apple/ml-tarflow checkpoint into a zoo TarFlow checkpoint at --out."""
    from rich.console import Console

    from attnflow_zoo.models.tarflow_convert import convert_ml_tarflow

    model = convert_ml_tarflow(file, out, in_channels=in_channels, head_dim=head_dim,
                               noise_std=noise_std)
    cfg = model.config
    kind = (f"sample-quality checkpoint (noise σ = {cfg.noise_std:g} in model space)"
            if cfg.noise_std else "likelihood checkpoint (uniform dequantisation)")
    params = sum(p.numel() for p in model.parameters())
    Console().print(f"wrote {out}: TarFlow {cfg.in_channels}×{cfg.image_size}×{cfg.image_size}, "
                    f"P={cfg.patch_size}, width {cfg.width}, {cfg.num_blocks} blocks × "
                    f"{cfg.layers_per_block} layers, {params / 1e6:.2f}M parameters"
                    + (f", {cfg.num_classes} classes" if cfg.num_classes else "")
                    + f"; a {kind}")
