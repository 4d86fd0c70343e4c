"""The per-VM state directory and its lock."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import QmpBackupError


def default_state_root() -> Path:
    """``$XDG_STATE_HOME/qmpbackup`` (``~/.local/state/qmpbackup`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "qmpbackup"


def state_key(vm_name: str | None, uuid: str | None, address: str) -> str:
    """The folder name for a VM: its name, else its UUID, else its QMP address."""
    if vm_name:
        raw = vm_name
    elif uuid and uuid.strip("0-"):
        raw = uuid
    else:
        raw = "qmp-" + address
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", raw).strip("._") or "default"


@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's lock: one qmpbackup run changes a VM at a time."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise QmpBackupError(
                f"another qmpbackup run is working on this VM ({state_dir})"
            ) from exc
        yield
    finally:
        os.close(fd)
