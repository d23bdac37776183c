"""Atomic file replacement: the one place files and folders are written into place.

Everything is first written next to its destination under a hidden temporary name and then
renamed (``os.replace``), so a crash, a full disk or a kill never leaves a half-written file
where a reader would find it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def _describe(err: OSError, path: Path) -> str:
    reason = err.strerror or str(err)
    return (f"cannot write {path}: {reason}; choose a writable location with free space "
            "(nothing was left half-written)")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it is renamed to ``path``.

    The caller writes the temporary file (any library, any format); on an exception it is
    removed and ``path`` is untouched. ``OSError`` becomes ``OutputError`` (one line, what to do).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing
    folder there is removed first). On an exception the temporary folder is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp"))
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
