"""Progress of every long loop, on a terminal or not, and one-line notes.

On a terminal (stderr is a TTY) a rich bar is shown on stderr. Off a terminal (``nohup``, Slurm,
CI, ``| tee log``) plain timestamped lines go to stderr instead, flushed, each with the count,
the loop's latest fields (bpd, lr, img/s, …) and the ETA. A loop that gives ``every``
(training: its log interval) logs its first unit (so a log shows at once that the run goes on,
with its first ETA), then every ``every`` units and its end. Any other loop logs once it has run
``FIRST`` seconds, then at most every ``interval`` seconds, then its end; a loop done sooner
says nothing. ``note`` prints one line either way (above a live bar), e.g. "resuming from step
N".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TypeVar

T = TypeVar("T")

_LIVE: list = []  # the rich Progress being shown, so that notes print above it
#: How notes are worded for their reader: empty, the library's words (argument names); a front
#: end sets its own once (``word_notes``): the CLI, its flags.
_WORDING: list[Callable[[str], str]] = []
#: Off a terminal, seconds before a loop without ``every`` shows its first line.
FIRST = 5.0


def enabled() -> bool:
    """Rich bars are shown only when stderr is a terminal."""
    return sys.stderr.isatty()


def _stamp() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def word_notes(wording: Callable[[str], str] | None) -> None:
    """Word every later ``note`` with ``wording`` (None: in the library's words again)."""
    _WORDING[:] = [] if wording is None else [wording]


def note(message: str) -> None:
    """One line on stderr: above the live bar on a terminal, timestamped otherwise."""
    if _WORDING:
        message = _WORDING[0](message)
    if _LIVE:
        _LIVE[-1].console.print(message, markup=False, highlight=False)
    elif enabled():
        print(message, file=sys.stderr, flush=True)
    else:
        print(f"{_stamp()} {message}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (whole seconds), the one way the zoo prints a duration."""
    return str(timedelta(seconds=round(seconds)))


@contextmanager
def progress(description: str, total: int | None, show: bool | None = None, *, start: int = 0,
             every: int | None = None, interval: float = 60.0
             ) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``advance(n=1, **fields)``; ``fields`` (e.g. bpd="3.1") are shown
    after the bar / in the log line. Example::

        with progress("train", total=steps, start=done, every=log_every) as advance:
            for step in range(done, steps):
                advance(1, bpd=f"{bpd:.3f}")

    Args:
        total: the count at the end (None: unknown).
        show: True a rich bar, False nothing, None (default) a bar on a terminal and log lines
            otherwise.
        start: the count already done (a resumed run continues at ``start``/``total``).
        every: off a terminal, a line after the first unit, then whenever the count reaches a
            multiple of ``every`` (and at ``total``); None: a line once the loop has run
            ``FIRST`` seconds, then at most every ``interval`` seconds (and at ``total``).
    """
    if show is None and not enabled():
        yield from _lines(description, total, start, every, interval)
        return
    if show is None:
        show = True
    if not show:
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, completed=start, info="")
        _LIVE.append(bar)

        def advance(n: int = 1, **fields: object) -> None:
            info = "  ".join(f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, **({"info": info} if fields else {}))

        try:
            yield advance
        finally:
            _LIVE.remove(bar)


def _lines(description: str, total: int | None, start: int, every: int | None,
           interval: float) -> Iterator[Callable[..., None]]:
    count = start
    began = last = time.monotonic()
    latest: dict[str, object] = {}
    printed = False

    def advance(n: int = 1, **fields: object) -> None:
        nonlocal count, last, printed
        latest.update(fields)
        before, count = count, count + n
        now = time.monotonic()
        if every is not None:
            due = count // every > before // every or count == total or not printed
        else:
            wait = interval if printed else min(FIRST, interval)
            due = now - last >= wait or (printed and count == total)
        if n <= 0 or not due:
            return
        last, printed = now, True
        where = f"{count}/{total} ({count / total:.0%})" if total else str(count)
        parts = [f"{_stamp()} {description} {where}"]
        parts += [f"{k}={v}" for k, v in latest.items()]
        done = count - start
        if total and done > 0 and count < total:
            parts.append(f"ETA {clock((now - began) / done * (total - count))}")
        print("  ".join(parts), file=sys.stderr, flush=True)

    yield advance
