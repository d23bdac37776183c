"""``attnflow quickstart``: a few minutes of training on the embedded digits, offline, with
everything a run leaves in one folder and the commands to try next."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from .threads import ThreadsOption


def quickstart(
    model: Annotated[str, typer.Option(help="Zoo preset to train (1×32×32 images).")
                     ] = "attnflow_imap_digits",
    minutes: Annotated[float, typer.Option(help="Time budget of the training, in minutes of "
                                           "wall time (the final evaluation, pictures and card "
                                           "come after it).")] = 3.0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/quickstart, or "
                                             "runs/quickstart-N if that holds a run).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out with a fresh time "
                                         "budget.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, the batches and the "
                                      "noise.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")
                      ] = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Train a small AttnFlow on 5,000 digits that ship with attnflow_zoo (no download), score
    it on 1,000 held-out digits against the uniform baseline (8 bits/dim), and write its
    checkpoint, samples.png, samples-t0.7.png, curves.png, metrics.json, run.json, TensorBoard
    events and model card (README.md) into one run folder. It takes about --minutes plus a
    minute on 2 CPU cores.
    """
    from rich.console import Console

    from attnflow_zoo.resources import use_threads

    use_threads(threads)  # first: the line that says it is the run's first
    from attnflow_zoo.training import TrainingInterrupted
    from attnflow_zoo.workflows import quickstart as qs

    console = Console(highlight=False)
    folder = qs.run_folder(out, resume)
    after = _next_commands(folder, model)
    try:
        result = qs.quickstart(model, minutes=minutes, out_dir=folder, device=device, seed=seed,
                               resume=resume, log=lambda line: console.print(line, markup=False))
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        again = ["attnflow", "quickstart", "--model", model, "--minutes", f"{minutes:g}",
                 "--out", str(folder), "--seed", str(seed), "--device", device, "--resume",
                 *(["--threads", str(threads)] if threads else [])]
        typer.echo(f"resume with: {shlex.join(again)}", err=True)
        raise typer.Exit(err.exit_code) from None
    why = "its time budget" if result.stop_reason == "max_seconds" else "its recipe's steps"
    # Plain lines (no wrapping of long paths): scripts and tests read them.
    echo = typer.echo
    echo(f"trained {result.steps} steps (stopped by {why}); done in "
         f"{result.seconds / 60:.1f} min")
    echo(f"held-out bits/dim: {result.heldout_bpd:.3f} on {result.num_heldout} test digits "
         f"(uniform baseline: {qs.UNIFORM_BPD:.3f}; lower is better)")
    echo(f"run folder: {result.run_dir}")
    echo(f"  checkpoint: {result.checkpoint}")
    echo(f"  samples:    {result.samples} (T=1), {result.samples_t} (T={qs.TEMPERATURE})")
    echo(f"  curve:      {result.curves}")
    echo(f"  metrics:    {result.metrics}")
    echo(f"  card:       {result.card}")
    echo("next:")
    for command, what in after:
        echo(f"  {command}")
        echo(f"      # {what}")


def _next_commands(run_dir: Path, preset: str) -> list[tuple[str, str]]:
    """What to try after a quickstart run in ``run_dir``: (command, what it does)."""
    from attnflow_zoo.training.run import default_run_dir
    from attnflow_zoo.workflows.quickstart import DATASET

    d = shlex.quote(str(run_dir))
    return [
        (f"attnflow sample --checkpoint {d} -n 64 --temperature 0.7 -o grid.png",
         "draw new digits from the trained model"),
        (f"attnflow evaluate --checkpoint {d} --dataset {DATASET}",
         "score the held-out digits again (the same noise seed: the same bits/dim)"),
        (f"tensorboard --logdir {d}", "the training curves and sample grids"),
        (f"attnflow reproduce {preset} --out {default_run_dir(preset)}",
         "the entry's whole recipe, then its score and card (offline too)"),
        ("attnflow train --model attnflow_imap_cifar10_small --dataset cifar10",
         "a real dataset (downloads CIFAR-10 once; needs the internet)"),
    ]
