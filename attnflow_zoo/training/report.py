"""What a run shows: TensorBoard events, sample grids, and the training-curve PNG at the end.

Everything is written by rank 0 into the run folder: ``tensorboard/`` (scalars train/bpd,
train/lr, train/grad_norm, train/images_per_s, validation/bpd, test/bpd and a sample grid at
each evaluation), ``curves.png`` and ``samples.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_path
from ..errors import OutputError
from ..progress import note

TENSORBOARD_DIR = "tensorboard"
CURVES_NAME = "curves.png"
SAMPLES_NAME = "samples.png"
#: Seed and temperature of every grid a run draws (the same latents at every evaluation).
GRID_SEED = 0
GRID_TEMPERATURE = 1.0


class Board:
    """TensorBoard events of a run (``torch.utils.tensorboard``); a no-op without a folder.

    A resumed run purges events after its resume step, so a replayed step is never shown twice.
    Write errors (a full disk) become ``OutputError``.
    """

    def __init__(self, folder: Path | None, purge_step: int | None = None) -> None:
        self.writer = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            note("tensorboard is not installed: no event files (pip install tensorboard)")
            return
        self.folder = folder / TENSORBOARD_DIR
        self._guard(lambda: setattr(self, "writer", SummaryWriter(
            str(self.folder), purge_step=purge_step or None, flush_secs=30)))

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except OSError as err:
            raise OutputError(f"cannot write TensorBoard events to {self.folder}: "
                              f"{err.strerror or err}; choose a writable location with free "
                              "space") from err

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is not None:
            w = self.writer
            self._guard(lambda: [w.add_scalar(k, v, step) for k, v in values.items()
                                 if v is not None and math.isfinite(v)])

    def grid(self, tag: str, images_u8: Tensor, step: int) -> None:
        if self.writer is not None:
            from torchvision.utils import make_grid

            grid = make_grid(images_u8, nrow=math.ceil(math.sqrt(len(images_u8))), pad_value=255)
            w = self.writer
            self._guard(lambda: w.add_image(tag, grid, step))

    def close(self) -> None:
        if self.writer is not None:
            w, self.writer = self.writer, None
            self._guard(w.close)


@torch.no_grad()
def sample_grid(model: nn.Module, num_samples: int, device: torch.device) -> Tensor:
    """``num_samples`` uint8 samples (CPU) from ``model`` with the run's fixed grid seed, so the
    grids of successive evaluations show the same latents."""
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator(device=device).manual_seed(GRID_SEED)
        return model.sample(num_samples, temperature=GRID_TEMPERATURE,  # type: ignore
                            generator=g).cpu()
    finally:
        model.train(was_training)


def save_grid(images_u8: Tensor, path: Path) -> Path:
    """A PNG grid for people to look at: small images enlarged (nearest neighbour, to ≥ 64 px)
    and separated by white lines."""
    from torchvision.utils import make_grid, save_image

    k = max(1, 64 // max(images_u8.shape[-2:]))
    images = images_u8.repeat_interleave(k, -2).repeat_interleave(k, -1)
    grid = make_grid(images.float() / 255, nrow=math.ceil(math.sqrt(len(images))), padding=2,
                     pad_value=1.0)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a damaged last line, from a killed writer, skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def save_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """The training curve as a PNG: bits/dim (train, validation, test) and the learning rate,
    against the step. Drawn with matplotlib's Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    train, val, test, lr = (series(k) for k in ("train_bpd", "val_bpd", "eval_bpd", "lr"))
    if not (train[0] or val[0] or test[0]):
        return None
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if train[0]:
        top.plot(*train, label="train (log window mean)", color="tab:blue", lw=1.2)
    if val[0]:
        top.plot(*val, "o-", label="validation", color="tab:orange", ms=4)
    if test[0]:
        top.plot(*test, "s", label="test (held-out)", color="tab:green", ms=6)
    top.set_ylabel("bits/dim")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend()
    if lr[0]:
        bottom.plot(*lr, color="tab:gray", lw=1.2)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
