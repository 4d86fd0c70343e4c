"""Files: durable writes, positioned writes and advisory locks."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a crash leaves the old or the new content, never half."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # Name the file the caller asked for, not a temporary one, nor none.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush folder ``path``, so that names created or removed in it persist."""
    fsync_file(path)


def remove_created_files(paths: Iterable[str]) -> list[str]:
    """Remove files qmpbackup created (partial targets, scratches); the ones removed.

    Only regular files go: whatever else a path names now (a block device, which
    qmpbackup never removes, a folder) is left alone, as is a path that is gone.
    """
    removed = []
    for path in paths:
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


@contextmanager
def advisory_lock(path: Path, busy: Callable[[str], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive flock(2) on ``path``, created 0o600 in a 0o700 folder if need be.

    Without ``busy`` it waits while another process holds the lock. With ``busy`` it
    raises ``busy(holder)`` at once instead, ``holder`` naming the holding run as it
    wrote itself into the file (host, pid, start time; "" if it did not); the run that
    gets the lock writes itself there.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if busy is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy(_read_holder(fd)) from None
            os.ftruncate(fd, 0)
            pwrite_all(fd, _holder().encode(), 0)
        yield
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    """What the holder wrote of itself; it writes right after it gets the lock, so an
    empty file is read again for a moment before "" is taken."""
    for _ in range(10):
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.05)
    return ""


def _holder() -> str:
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n"
