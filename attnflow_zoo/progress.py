"""Progress bars for every long loop: rich bars on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def enabled() -> bool:
    """Bars are shown only when stderr is a terminal (never in CI logs or pipes)."""
    return sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None, show: bool | None = None
             ) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``advance(n=1, **fields)``; ``fields`` (e.g. bpd=3.1) are shown
    after the bar. Example::

        with progress("train", total=steps) as advance:
            for step in range(steps):
                advance(1, bpd=f"{bpd:.3f}")
    """
    show = enabled() if show is None else show
    if not show:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = "  ".join(f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None,
          show: bool | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a bar (see ``progress``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(description, total, show) as advance:
        for item in items:
            yield item
            advance()
