"""``attnflow push``: check a checkpoint, render its model card, upload it to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def push(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Local checkpoint directory "
                                             "(config.json + model.safetensors).")],
    repo: Annotated[str, typer.Option("--repo", help="Target Hub repo id, user/name.")],
    metrics: Annotated[str | None, typer.Option(help="Measured metrics for the card: a JSON "
                                                "file or a JSON string (keys: dataset, split, "
                                                "bpd, bpd_estimator, fid, fid_num_samples, "
                                                "fid_weights, ...).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    preset: Annotated[str | None, typer.Option(help="Zoo entry whose card to use (default: "
                                               "the one recorded in config.json).")] = None,
) -> None:
    """Upload exactly config.json, model.safetensors and a rendered README.md (model card).

    The checkpoint is loaded strictly and its round trip inverse(forward(x)) = x is checked
    before anything is uploaded.
    """
    import json

    from rich.console import Console

    from attnflow_zoo.errors import ConfigError
    from attnflow_zoo.publish import push_checkpoint

    metrics_dict = None
    if metrics is not None:
        text = metrics if metrics.lstrip().startswith("{") else _read(Path(metrics))
        try:
            metrics_dict = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--metrics is neither a JSON file nor valid JSON: {err}") from err
        if not isinstance(metrics_dict, dict):
            raise ConfigError("--metrics must be a JSON object")
    url = push_checkpoint(checkpoint, repo, metrics=metrics_dict, private=private,
                          preset=preset)
    Console().print(f"pushed {checkpoint} to {repo}: {url}")


def _read(path: Path) -> str:
    from attnflow_zoo.errors import ConfigError

    try:
        return path.read_text()
    except OSError as err:
        raise ConfigError(f"--metrics: cannot read {path} ({err.strerror}); pass a JSON file "
                          "or a JSON object") from err
