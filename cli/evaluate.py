"""``attnflow evaluate``: held-out bits/dim (and FID) of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .source import CheckpointOption, RepoOption, checkpoint_source


def evaluate(
    dataset: Annotated[str, typer.Option(help="cifar10, svhn, mnist, celeba or a local folder.")],
    checkpoint: CheckpointOption = None,
    repo: RepoOption = None,
    split: Annotated[str, typer.Option(help="The split to score.")] = "test",
    batch_size: Annotated[int, typer.Option(help="Batch size (part of the noise stream: "
                                            "use train's --eval-batch-size to reproduce its log)."
                                            )] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the dequantisation noise.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Score N images: a seeded random subset, "
                                              "the same as `train --eval-limit N`.")] = None,
    fid: Annotated[bool, typer.Option("--fid/--no-fid", help="Also compute FID.")] = False,
    num_samples: Annotated[int, typer.Option(help="Samples for FID (50000 for papers).")] = 50_000,
    temperature: Annotated[float, typer.Option(help="Sampling temperature for FID.")] = 1.0,
    inception_weights: Annotated[Path | None, typer.Option(
        help="The pytorch-fid Inception weights file (else $ATTNFLOW_INCEPTION_WEIGHTS or the "
             "torch hub cache).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")
                      ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Score a checkpoint: test-split bits/dim (single-sample dequantisation), a
    class-conditional model's Bayes-rule accuracy argmax_y log p(x | y), optionally FID."""
    from rich.console import Console

    from attnflow_zoo.core import resolve_device
    from attnflow_zoo.errors import ConfigError
    from attnflow_zoo.evaluation.sampling import check_request
    from attnflow_zoo.evaluation.scores import evaluate_checkpoint

    source = checkpoint_source(checkpoint, repo)
    for name, value in (("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if fid:
        from attnflow_zoo.evaluation.fid import resolve_inception_weights

        check_request(num_samples, temperature, batch_size)
        resolve_inception_weights(inception_weights)  # missing FID weights are said before any work
    resolve_device(device)  # a device the machine lacks is refused before any work
    result = evaluate_checkpoint(source, dataset, split, batch_size=batch_size, seed=seed,
                                 limit=limit, device=device, fid=fid, num_samples=num_samples,
                                 temperature=temperature, inception_weights=inception_weights)
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"{dataset} {result['split']} ({result['bpd_num_images']} images): "
                  f"bits/dim {result['bpd']:.4f}")
    if "bayes_accuracy" in result:
        console.print(f"Bayes-rule accuracy {result['bayes_accuracy']:.4f} (argmax over the "
                      f"classes of log p(x | y), {result['bayes_num_images']} images)")
    if result.get("bpd_noise_std"):
        console.print(f"(a sample-quality checkpoint trained with Gaussian noise σ = "
                      f"{result['bpd_noise_std']:g}: this bits/dim is not a discrete-data "
                      "bits/dim and is not comparable with likelihood checkpoints)")
    if "fid" in result:
        console.print(f"FID {result['fid']:.2f} ({result['fid_num_samples']} samples)")
