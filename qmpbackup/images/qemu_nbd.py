"""``qemu-nbd`` serving a local image read-only on a unix socket, and stopping it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from .keyed import image_args, object_args
from .qemu_img import ImageError

logger = structlog.get_logger("qmpbackup.qemu_nbd")


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM ``process``, SIGKILL it if it is still there after ``timeout``; its status."""
    process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_listening(
    process: subprocess.Popen[Any],
    path: Path | str,
    failure: Callable[[], str],
    timeout: float = 10.0,
) -> None:
    """Wait until ``process`` accepts connections on the unix socket ``path``.

    The socket file appears when the process binds it, before it listens: only a
    connection that succeeds says it is ready. RuntimeError with ``failure()`` (the
    process's own words) if it exits, or after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(failure())
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError("did not start listening in time")
        time.sleep(0.01)


def remove_stale_folders(prefix: str) -> None:
    """Remove the private folders named ``<prefix><pid>-…`` of processes that were killed
    (SIGKILL leaves their socket and log): this user's, of processes that are gone."""
    with os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            name = entry.name
            if not name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            pid = name[len(prefix) :].split("-")[0]
            try:
                if not pid.isdigit() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass  # alive and someone else's, or removed meanwhile by another process


@contextlib.contextmanager
def serve_image(path: Path, fmt: str = "qcow2") -> Iterator[str]:
    """Serve a local image (with its backing chain) read-only with ``qemu-nbd`` on a unix
    socket; yield the ``nbd+unix://`` URI.  Raises ImageError if qemu-nbd cannot start."""
    with tempfile.TemporaryDirectory(prefix="qmpbackup-digest-") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        log = Path(tmp) / "qemu-nbd.log"
        argv = ["qemu-nbd", "-r", "-t", "-e", "4", *object_args(), "-k", sock, "-x", "disk"]
        image = image_args(Path(path).absolute(), fmt)
        # -v shows which images are read through a QEMU process rather than in-process.
        logger.debug("qemu-nbd.serve", image=str(path), fmt=fmt)
        with log.open("w") as err:
            proc = subprocess.Popen([*argv, *image], stdout=subprocess.DEVNULL, stderr=err)
        try:
            try:
                wait_listening(proc, sock, lambda: log.read_text().strip())
            except RuntimeError as exc:
                raise ImageError(f"qemu-nbd: {exc}") from None
            yield f"nbd+unix:///disk?socket={sock}"
        finally:
            stop_process(proc)
