"""Stopping a run cleanly: SIGINT / SIGTERM finish the current step, a checkpoint is written,
and ``TrainingInterrupted`` says where it is (exit status 128 + signal: 130 / 143)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import TrainingError
from ..progress import note

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(TrainingError):
    """A run stopped by a signal after its checkpoint was written.

    Attributes:
        signum: the signal; ``exit_code`` = 128 + signum (the shell's convention: 130 for
            SIGINT, 143 for SIGTERM).
        step: the step the checkpoint holds; ``checkpoint``: its folder.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint written to {checkpoint}")


@contextmanager
def stop_requests() -> Iterator[Callable[[], int | None]]:
    """While active, SIGINT / SIGTERM only record a stop request; yields a function returning the
    signal received (None before any). A second signal aborts at once (``KeyboardInterrupt``).

    Outside the main thread (where Python cannot handle signals) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        note(f"{signal.Signals(signum).name} received: finishing the current step and writing a "
             "checkpoint (send it again to abort at once)")

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
