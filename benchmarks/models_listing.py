"""How long `attnflow models` takes, as a user runs it: the whole process (Python start, imports,
every preset built on the meta device and its parameters counted, the table printed), timed
from outside, ``--runs`` times after one warm-up; the median and the range. With ``--vs`` a
second command line (e.g. another checkout's ``attnflow``) runs in turn with it, A B A B ...,
and the ratio is taken per pair (the machine is shared and noisy: quote the median ratio).

    python benchmarks/models_listing.py [--runs 5] [--vs "/path/to/other/bin/attnflow models"]

Target (issue 22): ≤ 10 s on a quiet 2-core machine. Prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import time


def wall(command: list[str]) -> float:
    """Seconds of one run of ``command`` (its output discarded; a failure stops the benchmark)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--command", default="attnflow models", help="command line A")
    p.add_argument("--vs", default=None, help="command line B, run in turn with A")
    args = p.parse_args()
    a = shlex.split(args.command)
    b = shlex.split(args.vs) if args.vs else None
    print(f"load before: {os.getloadavg()[0]:.2f}")
    wall(a)
    if b:
        wall(b)
    times_a, times_b = [], []
    for _ in range(args.runs):
        times_a.append(wall(a))
        if b:
            times_b.append(wall(b))
    print(f"A {args.command!r}: median {statistics.median(times_a):.2f} s "
          f"(min {min(times_a):.2f}, max {max(times_a):.2f}, {args.runs} runs)")
    if b:
        ratios = [x / y for x, y in zip(times_a, times_b, strict=True)]
        print(f"B {args.vs!r}: median {statistics.median(times_b):.2f} s "
              f"(min {min(times_b):.2f}, max {max(times_b):.2f})")
        print(f"A/B per pair: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
