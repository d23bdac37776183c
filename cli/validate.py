"""``attnflow validate``: the invertibility check of residual attention (Zha et al. 2021)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .threads import ThreadsOption


def validate(
    attn: Annotated[str, typer.Option("--attn", help="Attention: dot | embedded | gaussian | "
                                      "concat.")] = "dot",
    dataset: Annotated[str, typer.Option(help="cifar10 | svhn | celeba | a local image folder.")
                       ] = "cifar10",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (figures.json, "
                                      "reconstructions.png, checkpoint/).")] = Path("validate"),
    fullscale: Annotated[bool, typer.Option(help="CelebA at 218×178, batch 1, 1 epoch.")] = False,
    lipschitz: Annotated[str, typer.Option(help="faithful (the paper) | certified (provably "
                                           "contractive).")] = "faithful",
    epochs: Annotated[int | None, typer.Option(help="Training epochs, ≥ 1 (default 100; 1 with "
                                               "--fullscale).", rich_help_panel="Training")
                      ] = None,
    limit: Annotated[int, typer.Option(help="Train and test images used, each a seeded random "
                                       "subset (the paper: 1000).",
                                       rich_help_panel="Training")] = 1000,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default 64; 1 with "
                                                   "--fullscale).", rich_help_panel="Training")
                          ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the target, shuffling and noise.",
                                      rich_help_panel="Training")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.",
                                        rich_help_panel="Training")] = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Train squeeze + one residual attention layer to a random target, then invert held-out
    images by fixed-point iteration and report MSE / PSNR after 10, 50 and 100 iterations."""
    from rich.console import Console
    from rich.table import Table

    from attnflow_zoo.resources import use_threads
    from attnflow_zoo.workflows.validation import validate as run

    use_threads(threads)
    result = run(attn, dataset, out, fullscale=fullscale, lipschitz=lipschitz, epochs=epochs,
                 limit=limit, batch_size=batch_size, seed=seed, device=device)

    def fmt(v: float | None, spec: str) -> str:
        return "diverged" if v is None else format(v, spec)

    table = Table(title=f"{attn} ({lipschitz}) on {dataset}: {result['num_train']} train / "
                        f"{result['num_test']} test images, {result['epochs']} epoch(s)")
    for col in ("iterations", "inverse", "PSNR dB", "worst PSNR dB", "MSE", "converged",
                "max residual", "seconds"):
        table.add_column(col, justify="right")
    for k, r in result["inverse"].items():
        table.add_row(f"{k} (used {r['iterations']})", r["verdict"], fmt(r["psnr_db"], ".1f"),
                      fmt(r["min_psnr_db"], ".1f"), fmt(r["mse"], ".2e"),
                      f"{r['converged_fraction']:.0%}", fmt(r["max_residual"], ".2e"),
                      f"{r['seconds']:.2f}")
    console = Console()
    console.print(table)
    jac = result["jacobian_norm"]
    bound = f", certified bound {result['lipschitz_bound']:.3f}" if "lipschitz_bound" in result \
        else ""
    console.print(f"‖J_g‖₂ (power iteration) max {fmt(jac['max'], '.3g')}{bound}; "
                  f"{result['seconds_per_epoch']:.2f} s/epoch; wrote {out}")
    main = result["inverse_main"]
    if result["verdict"] == "diverged":
        console.print(f"the inverse DIVERGED in {main['max_iter']} iterations (residual "
                      f"{fmt(main['max_residual'], '.3g')}): this layer is not invertible by "
                      "fixed-point iteration on these images, so no PSNR is reported; try "
                      "--lipschitz certified")
    elif result["verdict"] == "converged elsewhere":
        console.print(f"the inverse converged, but not to the images (worst PSNR "
                      f"{fmt(main['min_psnr_db'], '.1f')} dB): x + g(x) has another preimage "
                      "there, so the layer is not injective on these images")
    elif result["verdict"] != "converged":
        console.print(f"the inverse has not converged for {1 - main['converged_fraction']:.0%} "
                      f"of the images in {main['max_iter']} iterations (residual still "
                      f"shrinking, {fmt(main['max_residual'], '.3g')})")
