"""The per-VM state directory: where it is, and the lock one run holds on it."""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from pathlib import Path

from ..errors import QmpBackupError
from ..files import advisory_lock


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


def scratch_folder(state_dir: Path) -> Path:
    """Where pull scratches go that the request names no file for."""
    return state_dir / "scratch"


def locked(state_dir: Path) -> AbstractContextManager[None]:
    """Hold the state directory's lock: one qmpbackup run changes a VM at a time.

    Raises QmpBackupError at once if another run holds it.
    """

    def busy(holder: str) -> QmpBackupError:
        by = f": {holder}" if holder else ""
        return QmpBackupError(f"another qmpbackup run is working on this VM ({state_dir}){by}")

    return advisory_lock(state_dir / "lock", busy)
