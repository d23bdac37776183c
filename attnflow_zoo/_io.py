"""Atomic file replacement: the one place files and folders are written into place.

Everything is first written next to its destination under a hidden temporary name and then
renamed (``os.replace``), so a crash, a full disk or a kill never leaves a half-written file
where a reader would find it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def _umask_mode(mode: int) -> int:
    # mkstemp / mkdtemp create private (0600 / 0700) entries: give the final file the mode an
    # ordinary open() would (0666 / 0777 less the umask), so other users can read checkpoints.
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


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
        os.chmod(tmp, _umask_mode(0o666))
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


def append_text(path: str | os.PathLike[str], text: str) -> Path:
    """Append ``text`` (UTF-8) to ``path`` (an append-only log such as ``metrics.jsonl``), flushed;
    ``OutputError`` instead of ``OSError``."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    return path


def make_dir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p path``; ``OutputError`` (one line, what to do) instead of ``OSError``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    return path


def check_writable(path: str | os.PathLike[str], *, is_dir: bool = False) -> Path:
    """``OutputError`` unless ``path`` could be written, checked before any work and without
    creating anything: its nearest existing ancestor must be a writable folder (a file in the way
    or a read-only folder is caught here, not after an hour of training or sampling)."""
    path = Path(path).expanduser()
    if path.exists():
        if path.is_dir() != is_dir:
            what = "a folder" if path.is_dir() else "a file"
            raise OutputError(f"cannot write {path}: {what} of that name is in the way; "
                              "choose another path")
        folder = path if is_dir else path.parent
    else:
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; choose "
                              "another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {folder} is not writable; choose a writable "
                          "location")
    return path


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
        os.chmod(tmp, _umask_mode(0o777))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(_describe(err, path)) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: The hidden names ``atomic_path`` (``.NAME.XXXXXXXX.tmp``) and ``atomic_directory``
#: (``.NAME-XXXXXXXX.tmp``) write under; ``tempfile``'s random part is 8 characters.
_LEFTOVER = re.compile(r"\..+[.-][a-z0-9_]{8}\.tmp")


def remove_leftovers(folder: str | os.PathLike[str]) -> tuple[list[Path], int]:
    """Remove the hidden temporary files and folders that atomic writes into ``folder`` leave
    when the process is killed mid-write (a crash or SIGKILL skips their clean-up); returns
    (what was removed, their bytes). Call it only while nothing writes into ``folder`` (e.g.
    holding a run's lock): a write under way looks the same."""
    removed, size = [], 0
    folder = Path(folder)
    if not folder.is_dir():
        return removed, size
    for entry in sorted(folder.iterdir()):
        if not _LEFTOVER.fullmatch(entry.name):
            continue
        files = [entry] if not entry.is_dir() else [f for f in entry.rglob("*") if f.is_file()]
        size += sum(f.lstat().st_size for f in files)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed, size
