"""Starting and stopping the helper processes qmpbackup runs (qemu-nbd, qemu-storage-daemon)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
