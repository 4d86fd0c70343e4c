"""Stopping the helper processes qmpbackup starts (qemu-nbd, qemu-storage-daemon)."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM ``process``, SIGKILL it if it is still there after ``timeout``; its status."""
    process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
