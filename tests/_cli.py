"""Run the ``attnflow`` console script in-process, as the CLI tests do."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str] | None = None
            ) -> tuple[int, str, str]:
    """``attnflow ARGS`` through ``attnflow_cli.main.main``: (exit status, stdout, stderr).
    The output is read from ``capsys`` when a test has it, else captured here."""
    from attnflow_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["attnflow", *map(str, args)]
    try:
        if capsys is None:
            with redirect_stdout(out), redirect_stderr(err):
                main()
        else:
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        sys.argv = old
    if capsys is None:
        return code, out.getvalue(), err.getvalue()
    captured = capsys.readouterr()
    return code, captured.out, captured.err
