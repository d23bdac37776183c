"""A run folder while a run writes it: the lock, ``metrics.jsonl``, ``run.json``, TensorBoard,
the step checkpoints, ``best/`` and the pictures at the end. Only rank 0 of a run with an
output folder writes; everywhere else every method is a no-op."""

from __future__ import annotations

import copy
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from .._io import remove_leftovers
from ..errors import TrainingError
from ..progress import note
from .lock import RunLock
from .record import METRICS, MetricsLog, RunRecord, metric
from .report import (
    CURVES_NAME,
    SAMPLES_NAME,
    Board,
    read_metrics,
    sample_grid,
    save_curves,
    save_grid,
)
from .state import BEST_NAME, save_best, save_training_checkpoint

#: Samples in the TensorBoard grid of each evaluation and in the final ``samples.png``.
BOARD_SAMPLES = 16
FINAL_SAMPLES = 64
#: Where run folders go when none is given: ``runs/<name>``.
RUNS_ROOT = Path("runs")


def default_run_dir(name: str) -> Path:
    """The run folder of ``name`` (a zoo entry, or ``quickstart``) when none is given."""
    return RUNS_ROOT / name


def holds_run(out: Path) -> bool:
    """True if ``out`` already holds a training run's checkpoints."""
    return out.is_dir() and bool(checkpoint.step_folders(out)
                                 or (out / checkpoint.LATEST_NAME).exists())


def check_fresh(out: Path) -> None:
    """``TrainingError`` if a new run would write over the run in ``out``."""
    if holds_run(out):
        raise TrainingError(f"{out} already holds a training run; pass `resume` to continue it "
                            "or choose another `out_dir`")


class RunFolder:
    """The writer of one run (see the module docstring)."""

    def __init__(self, out: Path | None, writes: bool) -> None:
        self.out = out if writes else None
        self.stack = ExitStack()
        self.log = MetricsLog(None)
        self.board = Board(None)
        self.record: RunRecord | None = None
        self.measured: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None

    # --- opening and closing -----------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder (before anything in it is read for the run or written), then remove
        what a killed run left half-written in it (hidden ``.step-*.tmp`` folders and the like,
        ``_io.remove_leftovers``), saying so."""
        if self.out is None:
            return
        self.stack.enter_context(RunLock(self.out))
        removed, size = remove_leftovers(self.out)
        if removed:
            names = ", ".join(p.name for p in removed[:3]) + (" …" if len(removed) > 3 else "")
            note(f"removed {len(removed)} unfinished write(s) left in {self.out} by a run that "
                 f"was killed ({size / 1e6:.1f} MB: {names})")

    def start(self, start_step: int, base: dict[str, Any], previous: dict[str, Any] | None
              ) -> None:
        """Begin writing: logs from ``start_step`` on, ``run.json`` with status running."""
        if self.out is None:
            return
        self.log = MetricsLog(self.out / METRICS)
        self.log.truncate_after(start_step if start_step else -1)
        self.board = Board(self.out, purge_step=start_step + 1 if start_step else None)
        self.stack.callback(self.board.close)
        self.record = RunRecord(self.out, base, previous, start_step)
        self.record.update()
        self.record.write()

    def close(self) -> None:
        self.stack.close()

    @property
    def best(self) -> dict[str, Any] | None:
        return self.record.data.get("best") if self.record is not None else None

    # --- during the run ----------------------------------------------------------------------
    def log_record(self, record: dict[str, Any]) -> None:
        self.log.append(record)
        step = record["step"]
        self.board.scalars(step, {"train/bpd": record.get("train_bpd"),
                                  "train/lr": record.get("lr"),
                                  "train/grad_norm": record.get("grad_norm"),
                                  "train/images_per_s": record.get("images_per_s"),
                                  "validation/bpd": record.get("val_bpd"),
                                  "test/bpd": record.get("eval_bpd")})
        split = {"train_bpd": "train", "val_bpd": "validation", "eval_bpd": "test"}
        for key, name in split.items():
            if record.get(key) is not None and record.get("event") is None:
                self.measured.append(metric("bits_per_dim", name, record[key], step,
                                            record.get("num_images", 0)))

    def metrics_at(self, step: int) -> list[dict[str, Any]]:
        return [m for m in self.measured if m["step"] == step]

    def grid(self, net: nn.Module, step: int, device: torch.device) -> None:
        if self.board.writer is not None:
            self.board.grid("samples", sample_grid(net, BOARD_SAMPLES, device), step)

    def consider_best(self, net: nn.Module, step: int, val_bpd: float, num_images: int) -> None:
        """Make ``net`` the ``best`` checkpoint if its validation bits/dim is the lowest yet."""
        if self.record is None:
            return
        best = self.best
        if best is not None and best["bpd"] <= val_bpd:
            return
        info = {"step": step, "split": "validation", "bpd": val_bpd, "num_images": num_images,
                "path": BEST_NAME}
        self.record.update(best=info)
        self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        save_best(self.out, net, self.record.snapshot(step=step, metrics=self.metrics_at(step)))

    def checkpoint(self, step: int, raw: nn.Module, ema_model: nn.Module | None,
                   optimizer: torch.optim.Optimizer, scaler: Any, train_config: dict[str, Any],
                   keep: int, extra: dict[str, Any], status: str = "running",
                   stop_reason: str | None = None) -> Path | None:
        """A step checkpoint with its ``run.json`` (``stop_reason``: why a finished run ended,
        recorded with status finished)."""
        if self.out is None or self.record is None:
            return None
        self.record.update(step=step, status=status, metrics=self.metrics_at(step),
                           **({"stop_reason": stop_reason} if stop_reason else {}))
        path = save_training_checkpoint(self.out, step, raw, ema_model, optimizer, scaler,
                                        train_config, keep, extra, self.record.data)
        self.record.write()
        return path

    def score_best_on_test(self, net: nn.Module, final_step: int, score: Any) -> None:
        """At the end: the held-out score of ``best/`` too (when it is not the final weights),
        written into its ``run.json`` (scored, never used to choose)."""
        best = self.best
        if self.out is None or best is None or best["step"] == final_step:
            return
        state = self.best_state
        if state is None:
            state = checkpoint.read_tensors(self.out / BEST_NAME / checkpoint.WEIGHTS_NAME)
        twin = copy.deepcopy(net)
        twin.load_state_dict(state, strict=False)
        result = score(twin)
        if result is None:
            return
        value, num_images = result
        best["test_bpd"] = value
        entries = [m for m in self.measured if m["step"] == best["step"]]
        entries.append(metric("bits_per_dim", "test", value, best["step"], num_images))
        checkpoint.write_run_record(self.out / BEST_NAME, self.record.snapshot(  # type: ignore
            step=best["step"], metrics=entries, best=best))

    def finish(self, net: nn.Module, device: torch.device, title: str, status: str) -> None:
        """The pictures and the final ``run.json``."""
        if self.out is None or self.record is None:
            return
        save_curves(read_metrics(self.out / METRICS), self.out / CURVES_NAME, title)
        if status == "finished":
            save_grid(sample_grid(net, FINAL_SAMPLES, device), self.out / SAMPLES_NAME)
        self.record.update(status=status)
        self.record.write()

    def fail(self, error: BaseException) -> None:
        """Record a run that stopped on an error (best effort: never hides the error)."""
        if self.record is None:
            return
        try:
            self.record.update(status="failed", error=str(error).splitlines()[0] if str(error)
                               else type(error).__name__)
            self.record.write()
        except Exception:  # noqa: BLE001 - the original error is what the user must see
            pass
