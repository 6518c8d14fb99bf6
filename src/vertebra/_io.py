"""Writing files so that a reader never sees half of one (the one atomic writer of the package), and the lock that
keeps two runs out of one run folder."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "RunLock", "RunLockedError", "DISK_FULL_ERRNOS"]

#: the errors of a write that no retry fixes: no space left, over quota, a read-only file system
DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` through a temporary file in the same folder
    and ``os.replace``: an interrupted write leaves the old file (or none), never a truncated one.

    The parent folder is created; the file gets the usual ``0666 & ~umask`` mode. A failed write (the disk full)
    raises ``OSError`` with its errno, ``filename`` the target and a message naming it.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, f"cannot write {p}: {e.strerror or e}", str(p)) from e
        raise
    return p


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock: two runs would write the same checkpoints."""


class RunLock:
    """An exclusive lock on a folder: ``<folder>/.lock`` held with ``flock`` for as long as the run lives. The kernel
    drops the lock when the process ends, however it ends (``kill -9`` included), so a dead run never leaves it stuck;
    the file keeps the holder's pid for the message. Where ``fcntl`` is missing (Windows) nothing is locked."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def holder(self) -> str | None:
        """Whether another process holds the lock now (its pid, or "" if unknown), None if not; writes nothing."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)  # drops the probe's shared lock
        return None

    def busy_error(self, holder: str) -> RunLockedError:
        return RunLockedError(f"{self.path.parent}: another run is using this folder"
                              f"{f' (pid {holder})' if holder else ''}; wait for it to end, or give this run its own "
                              "--out or --name")

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise self.busy_error(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None
