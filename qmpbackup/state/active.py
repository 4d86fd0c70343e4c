"""Backups in progress (begun, not yet ended), one JSON file per backup id.

``backup-begin`` writes an :class:`ActiveBackup` once its transaction succeeded;
``backup-end`` reads it to know which jobs, nodes and bitmaps to remove.  (A
finished backup in a repository is another thing: :mod:`qmpbackup.repo.records`.)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import BackupNotFoundError
from ..request.models import Mode
from .store import JsonStore


class NbdServer(BaseModel):
    """The NBD server a pull backup exports through (QEMU runs at most one)."""

    model_config = ConfigDict(frozen=True)

    transport: Literal["tcp", "unix"]
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: bool = False
    objects: tuple[str, ...] = ()

    def uri(self, export: str) -> str:
        """The URI a reader uses for ``export``."""
        scheme = "nbds" if self.tls else "nbd"
        if self.transport == "unix":
            return f"{scheme}+unix:///{export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}"


class DiskJob(BaseModel):
    """What one backup created for one disk."""

    model_config = ConfigDict(frozen=True)

    disk: str
    source_node: str
    job_id: str
    sync: str
    incremental: str | None = None
    target: str | None = None
    format: str | None = None
    target_nodes: tuple[str, ...] = ()
    view_nodes: tuple[str, ...] = ()
    temporary_bitmaps: tuple[tuple[str, str], ...] = ()
    created_files: tuple[str, ...] = ()
    # QOM objects made for this disk (the secret of an encrypted target or scratch),
    # deleted once its nodes are.
    objects: tuple[str, ...] = ()
    # A bounded pull scratch: the file holding its reserve, and the write threshold
    # set on the scratch's file node (target_nodes[-1]).
    reserve_file: str | None = None
    write_threshold: int | None = None
    export: str | None = None
    export_id: str | None = None
    export_bitmap: str | None = None
    uri: str | None = None


class ActiveBackup(BaseModel):
    """One backup in progress: id, mode, checkpoint made with it, and per-disk pieces."""

    model_config = ConfigDict(frozen=True)

    id: int
    mode: Mode
    started: float
    checkpoint: str | None = None
    incremental: str | None = None
    disks: tuple[DiskJob, ...]
    server: NbdServer | None = None
    # Set when the backup lives only as long as one process (``qmpbackup backup``):
    # once that process is gone, ``recover`` treats the backup as left over.
    owner_pid: int | None = None
    # query-migrate's status and error as the backup began: backup-end tells from them
    # whether a live migration was tried while the job ran.
    migration_before: tuple[str | None, str | None] = (None, None)

    def job_ids(self) -> list[str]:
        """Every QEMU job id of this backup."""
        return [d.job_id for d in self.disks]


def running_server(active: Iterable[ActiveBackup]) -> NbdServer | None:
    """The NBD server the backups in progress export through (QEMU runs at most one)."""
    return next((b.server for b in active if b.server is not None), None)


class ActiveBackupStore:
    """The backups not yet ended, under ``<state dir>/backups``."""

    def __init__(self, state_dir: Path) -> None:
        self._files = JsonStore(state_dir / "backups", ActiveBackup)

    def load_all(self) -> list[ActiveBackup]:
        """Every backup not yet ended, by id."""
        return sorted(self._files.items(), key=lambda r: r.id)

    def load(self, backup_id: int | None) -> ActiveBackup:
        """The backup ``backup_id`` (the only one when None); BackupNotFoundError if
        there is no such backup, or several and none named."""
        records = self.load_all()
        if backup_id is None:
            if len(records) == 1:
                return records[0]
            if not records:
                raise BackupNotFoundError("no backup job is active")
            ids = ", ".join(str(r.id) for r in records)
            raise BackupNotFoundError(f"several backup jobs are active ({ids}): name one")
        for record in records:
            if record.id == backup_id:
                return record
        raise BackupNotFoundError(f"no backup job with id {backup_id}")

    def next_id(self) -> int:
        """The id of the next backup: one above the highest active one."""
        return max((r.id for r in self.load_all()), default=0) + 1

    def save(self, backup: ActiveBackup) -> None:
        """Write ``backup`` durably."""
        self._files.write(str(backup.id), backup)

    def delete(self, backup_id: int) -> None:
        """Forget backup ``backup_id``."""
        self._files.remove(str(backup_id))
