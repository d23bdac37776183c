"""A resumable record of named stages (``reproduce.json``): per stage, the inputs it ran on,
whether it finished and what it wrote, so that a rerun skips what is done and redoes what
changed. A stage that starts again forgets the stages after it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..errors import ConfigError

FORMAT = 1


class StageRecord:
    """The stages of one run folder, in their order (``stages``), read from and written to
    ``path`` (written only when ``write``: rank 0 of a torchrun job)."""

    def __init__(self, path: Path, stages: Sequence[str], write: bool) -> None:
        self.path = path
        self.order = tuple(stages)
        self.write = write
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.stages = json.loads(self.path.read_text(encoding="utf-8"))["stages"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{self.path} is damaged ({err}); delete it to redo every "
                                  "stage after training (training resumes from its "
                                  "checkpoints)") from err

    def inputs(self, stage: str) -> dict[str, Any] | None:
        """The inputs ``stage`` last ran on (None: it never started)."""
        return self.stages.get(stage, {}).get("inputs")

    def done(self, stage: str, inputs: dict[str, Any], *outputs: Path) -> dict[str, Any] | None:
        """The stage's entry if it finished on these ``inputs`` and its ``outputs`` exist."""
        entry = self.stages.get(stage)
        if entry and entry.get("done") and entry.get("inputs") == inputs and all(
                p.exists() for p in outputs):
            return entry
        return None

    def record(self, stage: str, inputs: dict[str, Any], done: bool, **outputs: Any) -> None:
        """Record ``stage`` (started, or ``done`` with its ``outputs``)."""
        self.stages[stage] = {"inputs": inputs, "done": done, **outputs}
        if not done:
            for later in self.order[self.order.index(stage) + 1:]:
                self.stages.pop(later, None)
        if self.write:
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "stages": self.stages},
                                                    indent=2, sort_keys=True))
