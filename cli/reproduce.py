"""``attnflow reproduce``: recipe → training → bits/dim + FID → model card → Hub, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .dataset import dataset_help
from .threads import ThreadsOption

_RUN = "Run"
_EVAL = "Evaluation"


def reproduce(
    name: Annotated[str, typer.Argument(help="Zoo entry (see `attnflow models`).")],
    dataset: Annotated[str | None, typer.Option(help=dataset_help("(default: the recipe's)"),
                                                rich_help_panel=_RUN)] = None,
    out: Annotated[Path | None, typer.Option(help="The run folder (default runs/<name>); rerun "
                                             "the same command to continue it.",
                                             rich_help_panel=_RUN)] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="Push to this Hub repo (user/name) "
                                             "at the end.", rich_help_panel=_RUN)] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="Recipe or training setting key=value (e.g. steps=20, batch_size=128, "
                      "lr=4e-4, seed=1); model.KEY=value changes the architecture (e.g. "
                      "model.in_channels=1). Repeatable.", rich_help_panel=_RUN)] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N training images.",
                                              rich_help_panel=_RUN)] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Score only the first N held-out "
                                                   "images.", rich_help_panel=_EVAL)] = None,
    fid_samples: Annotated[int | None, typer.Option(help="FID samples (default: the recipe's "
                                                    "50000; 0: no FID).",
                                                    rich_help_panel=_EVAL)] = None,
    fid_reference_limit: Annotated[int | None, typer.Option(
        help="Use only the first N reference images for the FID statistics (stated in the "
             "metrics; the standard uses the whole train split).",
        rich_help_panel=_EVAL)] = None,
    inception_weights: Annotated[Path | None, typer.Option(
        help="The FID Inception weights file (else $ATTNFLOW_INCEPTION_WEIGHTS or the torch "
             "hub cache).", rich_help_panel=_EVAL)] = None,
    random_inception: Annotated[bool, typer.Option(
        "--random-inception", hidden=True, help="Random Inception weights: tests the pipeline "
        "only; the number is flagged and never shown on the card.")] = False,
    until: Annotated[str | None, typer.Option(help="Stop after this stage: train, evaluate, "
                                              "card or push.", rich_help_panel=_RUN)] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo as private.",
                                          rich_help_panel=_RUN)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.",
                                        rich_help_panel=_RUN)] = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Train a zoo entry with its recipe, measure test bits/dim and FID-50k, write the model card
    with the measured numbers beside the paper's, and push it if --repo is given.

    Every stage keeps its output in the run folder (step-N/ checkpoints, metrics.json,
    fid/reference-*.npz, README.md, reproduce.json); running the same command again skips the
    finished stages and resumes training. Under torchrun the training runs on every process and
    the rest on rank 0.
    """
    from rich.console import Console

    from attnflow_zoo.resources import use_threads
    from attnflow_zoo.training.recipes import parse_settings
    from attnflow_zoo.workflows.reproduce import reproduce as run_reproduce

    console = Console()
    recipe, model = parse_settings(settings or [])
    use_threads(threads)
    result = run_reproduce(name, dataset=dataset, out_dir=out, repo_id=repo, overrides=recipe,
                           model_overrides=model, fid_samples=fid_samples,
                           fid_reference_limit=fid_reference_limit, limit=limit,
                           eval_limit=eval_limit, inception_weights=inception_weights,
                           random_inception=random_inception, device=device, private=private,
                           until=until, log=console.print)
    if result.checkpoint is None:  # another rank of a torchrun job
        return
    console.print(f"run folder: {result.run_dir} (checkpoint {result.checkpoint.name})")
    if result.metrics is not None:
        m = result.metrics
        line = f"{m['split']} bits/dim {m['bpd']:.4f}"
        if "fid" in m:
            line += f", FID {m['fid']:.2f} ({m['fid_num_samples']} samples, {m['fid_weights']})"
        console.print(line)
    if result.card_path is not None:
        console.print(f"card: {result.card_path}")
    if result.url is not None:
        console.print(f"pushed: {result.url}")
