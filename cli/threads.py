"""``--threads``: the option of every command that computes on the CPU (train, quickstart,
reproduce, evaluate, sample, validate). The choice itself is the library's
(``attnflow_zoo.resources.use_threads``): the command passes the option on, first thing."""

from __future__ import annotations

from typing import Annotated

import typer

ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", min=1, help="CPU threads for torch (default: the cores other processes leave "
    "free, measured at the start and followed during training; OMP_NUM_THREADS, when set, is "
    "kept).")]
