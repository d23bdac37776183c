"""One run per run folder: a lock file holding the owner's PID, host and start time.

The lock is an exclusive ``flock`` on ``<out>/.lock``, held while the run lives: the kernel
drops it when the process dies however it dies, so a lock file left by a killed run is
recognised as stale and taken over (with a note). Where the filesystem has no ``flock`` the
file is created with ``O_EXCL`` and a leftover one is stale when its PID is gone on this host.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from .._io import make_dir
from ..errors import OutputError, TrainingError
from ..progress import note

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def _describe(info: dict[str, Any]) -> str:
    return (f"process {info.get('pid', '?')} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        info = json.loads(text) if text.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(out):`` holds ``out`` for this process (``out`` is created if needed).

    A folder held by a live run is refused with a ``TrainingError`` naming its owner.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created_folder = False

    def __enter__(self) -> RunLock:
        self.created_folder = not self.folder.exists()
        make_dir(self.folder)
        try:
            self._acquire()
        except BaseException:
            if self.created_folder:
                _rmdir_quietly(self.folder)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _info(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.now().isoformat(timespec="seconds")}).encode()

    def _refuse(self, info: dict[str, Any]) -> TrainingError:
        return TrainingError(f"{self.folder} is in use by another training run ({_describe(info)}"
                             "); wait for it to finish, or choose another `out_dir`")

    def _acquire(self) -> None:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(f"cannot create the lock {self.path}: {err.strerror}; choose a "
                                  "writable `out_dir`") from err
            try:
                if fcntl is None:
                    raise OSError("no flock")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise self._refuse(info) from None
            except OSError:
                os.close(fd)
                self._acquire_exclusive()
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (unlinked) by its owner between our open and flock
                os.close(fd)
                continue
            old = _read(fd)
            if old:
                note(f"taking over the lock of {self.folder} left by {_describe(old)}, which is "
                     "no longer running")
            self._write(fd)
            self.fd = fd
            return
        raise self._refuse(_read_path(self.path))

    def _acquire_exclusive(self) -> None:
        """Without flock: O_EXCL creation, a leftover file is stale if its PID is gone here."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_path(self.path)
                pid = info.get("pid")
                if (info.get("host") == socket.gethostname() and isinstance(pid, int)
                        and not _pid_alive(pid)):
                    note(f"taking over the lock of {self.folder} left by {_describe(info)}, "
                         "which is no longer running")
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refuse(info) from None
            self._write(fd)
            self.fd = fd
            return
        raise self._refuse(_read_path(self.path))

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, self._info())

    def release(self) -> None:
        """Give the folder up (the lock file is removed)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def check_unlocked(folder: str | os.PathLike[str]) -> None:
    """``TrainingError`` if a live run holds ``folder`` (a quick early check: nothing is taken
    and nothing written; ``RunLock`` takes the folder for real later)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLock(folder)._refuse(_read(fd)) from None
            except OSError:
                return
    finally:
        os.close(fd)


def _read_path(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _rmdir_quietly(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
