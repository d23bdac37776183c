"""What of this machine a command may take: CPU threads for torch, and memory for a result it
holds at once.

**Threads.** PyTorch runs one OpenMP thread per core, and at the end of every parallel operation
its threads wait for each other, spinning. When other processes hold the cores, a thread that
waits for a descheduled partner burns the time slice that partner needs, so a small model loses
up to 10× against one thread. ``choose_threads`` counts the cores that other work keeps busy
(``/proc/stat`` over a short window; the 1-minute load average where there is none) and takes
the free ones, at least one: a core is free when more than half of it is idle. ``use_threads``
applies the choice and says what it chose; ``rebalance`` re-counts since its last look (no
waiting) and follows the other work as it comes and goes, for a choice made by measurement.
A count that is asked for (``threads``) or set in ``OMP_NUM_THREADS`` is kept as it is.

**Memory.** ``check_memory`` refuses up front, with the bytes it would need, a result that
cannot fit in the memory available now.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from .errors import ConfigError, check_positive_int
from .progress import note

#: Seconds over which ``choose_threads`` counts the busy cores.
WINDOW = 0.5
#: ``rebalance`` looks again only after this many seconds (a shorter window is noise).
REBALANCE_EVERY = 20.0


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads torch runs on, and why.

    Attributes:
        threads: torch's intra-op threads.
        cores: the cores this process may run on.
        busy: cores kept busy by other processes when it was measured (None: not measured).
        source: "asked" (an explicit count), "environment" (``OMP_NUM_THREADS``) or
            "measured".
    """

    threads: int
    cores: int
    busy: float | None
    source: str

    def describe(self) -> str:
        """One line, e.g. ``threads: 1 (load 1.9 of 2 cores from other processes)``."""
        if self.source == "asked":
            why = f"as asked; {self.cores} cores"
        elif self.source == "environment":
            why = f"OMP_NUM_THREADS; {self.cores} cores"
        else:
            why = f"load {self.busy:.1f} of {self.cores} cores from other processes"
        return f"threads: {self.threads} ({why})"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[float, float, int] | None:
    """(busy, total) jiffies of all CPUs and their count, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    fields = [float(v) for v in lines[0].split()[1:9]]  # user … steal (guest is in user)
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    count = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields) - idle, sum(fields), max(1, count)


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _Meter:
    """Cores busy with other work between two looks: all CPUs' busy share less this process."""

    def __init__(self) -> None:
        self.last = (_cpu_times(), _own_seconds(), time.monotonic())

    def busy(self) -> float | None:
        """Other processes' busy cores since the last look (None: nothing to measure)."""
        (before, own_before, t0), now = self.last, (_cpu_times(), _own_seconds(), time.monotonic())
        self.last = now
        after, own_after, t1 = now
        if before is None or after is None or after[1] <= before[1] or t1 <= t0:
            return None
        share = (after[0] - before[0]) / (after[1] - before[1])
        own = (own_after - own_before) / (t1 - t0)
        return max(0.0, share * after[2] - own)


def _free_threads(cores: int, busy: float) -> int:
    """Whole cores left free by ``busy`` cores of other work (a core more than half idle
    counts), at least one."""
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def choose_threads(threads: int | None = None, window: float = WINDOW) -> ThreadChoice:
    """The threads a command should give torch (see the module docstring).

    Args:
        threads: an explicit count (≥ 1), kept; None: ``OMP_NUM_THREADS`` when it is set, else
            the cores other work leaves free, measured over ``window`` seconds.
    """
    cores = usable_cores()
    if threads is not None:
        check_positive_int("threads", threads)
        return ThreadChoice(threads, cores, None, "asked")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return ThreadChoice(int(env), cores, None, "environment")
    meter = _Meter()
    time.sleep(window)
    busy = meter.busy()
    if busy is None:
        try:
            busy = max(0.0, os.getloadavg()[0])
        except (AttributeError, OSError):
            busy = 0.0
    return ThreadChoice(_free_threads(cores, busy), cores, busy, "measured")


class _Governor:
    """The process's measured choice, kept up to date by ``rebalance``."""

    def __init__(self, choice: ThreadChoice) -> None:
        self.choice = choice
        self.meter = _Meter()
        self.since = time.monotonic()


_GOVERNOR: list[_Governor] = []


def use_threads(threads: int | None = None, window: float = WINDOW) -> ThreadChoice:
    """``choose_threads`` and give torch that many threads, saying so in one line
    (``progress.note``); an ``OMP_NUM_THREADS`` choice is the user's, and torch's already, so it
    is left as it is, silently. Returns the choice."""
    import torch

    choice = choose_threads(threads, window)
    _GOVERNOR.clear()
    if choice.source == "environment":
        return choice
    torch.set_num_threads(choice.threads)
    if choice.source == "measured":
        _GOVERNOR.append(_Governor(choice))
    note(choice.describe())
    return choice


def rebalance() -> ThreadChoice | None:
    """For a measured choice (``use_threads`` without a count): re-count the other work since
    the last look, at most every ``REBALANCE_EVERY`` seconds, and move torch to the cores it
    now leaves free. Returns the new choice when it changed (and says so), else None."""
    if not _GOVERNOR or time.monotonic() - _GOVERNOR[0].since < REBALANCE_EVERY:
        return None
    governor = _GOVERNOR[0]
    governor.since = time.monotonic()
    busy = governor.meter.busy()
    if busy is None:
        return None
    target = _free_threads(governor.choice.cores, busy)
    if target == governor.choice.threads:
        return None
    import torch

    torch.set_num_threads(target)
    governor.choice = ThreadChoice(target, governor.choice.cores, busy, "measured")
    note(governor.choice.describe())
    return governor.choice


# --- memory --------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo, else the free
    physical pages); None when the platform does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def size_text(num_bytes: float) -> str:
    """Bytes as the zoo prints them: ``1.5 GB``, ``320 MB``, ``12 kB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{int(num_bytes)} B"


def check_memory(num_bytes: int, what: str, fewer: str) -> None:
    """``ConfigError`` (before any work) when ``what`` needs more than the memory available
    now. ``fewer`` says how to ask for less (in the caller's argument names)."""
    available = available_memory()
    if available is not None and num_bytes > available:
        raise ConfigError(f"{what} would need about {size_text(num_bytes)} of memory, more than "
                          f"the {size_text(available)} available; {fewer}")
