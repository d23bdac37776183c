"""``attnflow sample``: draw images from a checkpoint (Hub repo or local directory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .source import CheckpointOption, RepoOption, checkpoint_source

OUTPUT = "Output"
GUIDE = "Guidance and denoising"
GuidanceOption = Annotated[float, typer.Option(
    help="Guidance weight w (0: none): classifier-free for class-conditional models trained "
    "with label dropout; attention-temperature guidance for an unconditional TarFlow (with "
    "--attention-temperature).", rich_help_panel=GUIDE)]
AttentionTemperatureOption = Annotated[float | None, typer.Option(
    help="TarFlow: the unguided pass divides its attention logits by this τ.",
    rich_help_panel=GUIDE)]
AnnealedOption = Annotated[bool, typer.Option(
    "--annealed-guidance", help="TarFlow: ramp the guidance weight linearly over the tokens.",
    rich_help_panel=GUIDE)]
DenoiseOption = Annotated[bool, typer.Option(
    "--denoise", help="One score-based denoising step after sampling (checkpoints trained "
    "with Gaussian noise).", rich_help_panel=GUIDE)]


def sample(
    repo: RepoOption = None,
    checkpoint: CheckpointOption = None,
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", help="How many images "
                                             "(≥ 1).",
                                             rich_help_panel=OUTPUT)] = 64,
    label: Annotated[str | None, typer.Option(
        "--class", metavar="K|all", help="Class-conditional models: draw class K, or 'all' "
        "(⌈n / classes⌉ images per class, one grid row per class). Default: every class in "
        "turn.", rich_help_panel=OUTPUT)] = None,
    temperature: Annotated[float, typer.Option(help="Prior standard-deviation scale T (> 0, "
                                               "finite; 1 is the model's distribution).",
                                               rich_help_panel=OUTPUT)] = 1.0,
    guidance: GuidanceOption = 0.0,
    attention_temperature: AttentionTemperatureOption = None,
    annealed_guidance: AnnealedOption = False,
    denoise: DenoiseOption = False,
    seed: Annotated[int, typer.Option(help="Seed of the sampling generator.",
                                      rich_help_panel=OUTPUT)] = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="grid.png (image grid) or "
                                         "samples.npz (uint8 array B×H×W×C).",
                                         rich_help_panel=OUTPUT)] = Path("samples.png"),
    nrow: Annotated[int | None, typer.Option(help="Images per grid row (default √n).",
                                             rich_help_panel=OUTPUT)] = None,
    batch_size: Annotated[int, typer.Option(help="Images drawn per forward pass (≥ 1).",
                                            rich_help_panel=OUTPUT)] = 256,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N or "
                                        "mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 (CPU and CUDA) or fp16 (CUDA): "
                                           "autocast of the conditioners and prior "
                                           "convolutions.")] = "fp32",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the "
                                          "sampler (first batch slower).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Draw seeded samples at a temperature and save them as a PNG grid or an NPZ array.

    Every option (count, temperature, batch size, output path, device) is checked before the
    model is loaded or any sample drawn. It reports how many images were non-finite or out of
    range before the uint8 conversion; those are drawn marked (a checkerboard, a dotted frame).
    """
    from rich.console import Console

    from attnflow_zoo.evaluation.sampling import (
        check_output,
        check_request,
        class_labels,
        draw_checked_samples,
        resolve_device,
        save_samples,
    )
    from attnflow_zoo.factory import load_model
    from attnflow_zoo.precision import autocast_for

    source = checkpoint_source(checkpoint, repo)
    check_request(num_samples, temperature, batch_size)
    check_output(output)
    dev = resolve_device(device)
    autocast_for(dev, precision)  # an unknown precision or fp16 off CUDA: refused before loading
    model = load_model(source)
    labels, per_class = class_labels(model, label, num_samples)
    if labels is not None:
        num_samples = len(labels)
    options = {k: v for k, v in (("attention_temperature", attention_temperature),
                                 ("annealed", annealed_guidance or None)) if v is not None}
    drawn = draw_checked_samples(model, num_samples, temperature=temperature, seed=seed,
                                 batch_size=batch_size, device=dev, precision=precision,
                                 compile=compile, labels=labels, guidance=guidance,
                                 denoise=denoise, options=options)
    images = drawn.images
    path = save_samples(images, output, nrow=nrow or per_class)
    if as_json:
        typer.echo(json.dumps({"path": str(path), "temperature": temperature, "seed": seed,
                               "class": label, "guidance": guidance, "denoise": denoise,
                               **drawn.counts()}))
        return
    console = Console()
    console.print(f"wrote {images.shape[0]} samples ({'×'.join(map(str, images.shape[1:]))}, "
                  f"T={temperature}, seed={seed}"
                  + (f", class {label}" if label is not None else "")
                  + (f", guidance {guidance:g}" if guidance else "")
                  + (", denoised" if denoise else "") + f") to {path}")
    flagged = drawn.num_nonfinite or drawn.num_out_of_range
    console.print(("warning: " if flagged else "") + drawn.summary())
