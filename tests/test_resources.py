"""What a command takes of the machine (``attnflow_zoo.resources``): torch's threads chosen
against the other work on the cores, and memory refused up front (issue 23, items 1 and 5)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from attnflow_zoo import resources
from attnflow_zoo.errors import ConfigError


def test_an_asked_count_is_kept_and_a_bad_one_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    choice = resources.choose_threads(3)
    assert (choice.threads, choice.source) == (3, "asked")
    assert choice.describe().startswith("threads: 3 (as asked")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="threads must be a positive integer"):
            resources.choose_threads(bad)  # type: ignore[arg-type]


def test_omp_num_threads_is_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = time.monotonic()
    choice = resources.choose_threads()
    assert (choice.threads, choice.source) == (1, "environment")
    assert time.monotonic() - before < resources.WINDOW  # nothing measured


def test_cores_held_by_other_processes_are_left_to_them(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """One CPU-bound process per core: the measured choice is one thread (the default of one
    thread per core lost 10× here), and the line says what it saw."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = resources.usable_cores()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(1.0)
        choice = resources.choose_threads(window=1.0)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert choice.source == "measured" and choice.threads == 1
    assert choice.busy is not None and choice.busy >= cores - 0.5
    assert choice.describe() == f"threads: 1 (load {choice.busy:.1f} of {cores} cores from " \
                                "other processes)"


def test_use_threads_sets_torch_and_says_so_first(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        choice = resources.use_threads(1)
        assert torch.get_num_threads() == 1 == choice.threads
    finally:
        torch.set_num_threads(before)
        resources._GOVERNOR.clear()
    assert capsys.readouterr().err.splitlines()[0].endswith("threads: 1 (as asked; "
                                                            f"{choice.cores} cores)")


def test_a_measured_choice_follows_the_other_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rebalance`` (called by training at its log steps) moves to one thread once other work
    holds every core, from a choice of all of them."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = resources.usable_cores()
    if cores < 2:
        pytest.skip("one core: there is nothing to rebalance")
    before = torch.get_num_threads()
    monkeypatch.setattr(resources, "REBALANCE_EVERY", 0.5)
    resources._GOVERNOR[:] = [resources._Governor(resources.ThreadChoice(cores, cores, 0.0,
                                                                         "measured"))]
    torch.set_num_threads(cores)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(1.5)
        changed = resources.rebalance()
        assert changed is not None and changed.threads == 1 == torch.get_num_threads()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        torch.set_num_threads(before)
        resources._GOVERNOR.clear()


def test_memory_a_result_cannot_have_is_refused_with_the_amount() -> None:
    available = resources.available_memory()
    if available is None:
        pytest.skip("this platform does not say how much memory is available")
    resources.check_memory(1024, "a small result", "ask for less")
    with pytest.raises(ConfigError, match=r"would need about .* GB of memory, more than the "):
        resources.check_memory(4 * available, "a big result", "ask for less")
