"""What the API's calls return: a backup begun or ended, a backup's progress, a VM's info."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from .qmp.graph import BlockGraph
from .qmp.jobs import JobState
from .state.active import ActiveBackup
from .state.checkpoints import Checkpoint


class BackupBegun(BaseModel):
    """What ``backup-begin`` started: the backup (in pull mode its disks' URIs) and the
    checkpoint made at its instant."""

    model_config = ConfigDict(frozen=True)

    record: ActiveBackup
    checkpoint: Checkpoint | None
    frozen_seconds: float | None = None  # with quiesce: how long the guest was frozen


class BackupEnded(BaseModel):
    """How a backup ended."""

    model_config = ConfigDict(frozen=True)

    id: int
    outcome: str
    errors: dict[str, str]
    dropped_checkpoint: str | None
    # Push targets qmpbackup created for a backup that did not complete, now deleted.
    removed_partial: tuple[str, ...] = ()
    # What became of a live migration started while the backup ran, in one line.
    migration: str | None = None


class DiskProgress(BaseModel):
    """Progress of one disk's copy."""

    model_config = ConfigDict(frozen=True)

    disk: str
    status: str
    processed: int
    total: int
    error: str | None = None
    uri: str | None = None


class JobInfo(BaseModel):
    """State of one backup job, as ``jobinfo`` shows it."""

    model_config = ConfigDict(frozen=True)

    id: int
    mode: str
    status: str
    elapsed: float
    processed: int
    total: int
    disks: tuple[DiskProgress, ...]

    @property
    def rate(self) -> float:
        """Bytes per second since the backup began."""
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0

    @classmethod
    def of(cls, backup: ActiveBackup, jobs: Mapping[str, JobState], now: float) -> JobInfo:
        """The state of ``backup`` from its jobs as QEMU reports them at ``now``."""
        disks = tuple(_disk_progress(d.disk, d.job_id, d.uri, jobs) for d in backup.disks)
        statuses = {d.status for d in disks}
        if any(d.error for d in disks):
            status = "failed"
        elif statuses <= {"concluded", "gone"}:
            status = "completed"
        else:
            status = "running"
        return cls(
            id=backup.id,
            mode=backup.mode,
            status=status,
            elapsed=now - backup.started,
            processed=sum(d.processed for d in disks),
            total=sum(d.total for d in disks),
            disks=disks,
        )


def _disk_progress(
    disk: str, job_id: str, uri: str | None, jobs: Mapping[str, JobState]
) -> DiskProgress:
    job = jobs.get(job_id)
    if job is None:
        return DiskProgress(
            disk=disk,
            status="gone",
            processed=0,
            total=0,
            error=f"job {job_id} is gone (QEMU restarted?)",
            uri=uri,
        )
    return DiskProgress(
        disk=disk,
        status=job.status,
        processed=job.current_progress,
        total=job.total_progress,
        error=job.error,
        uri=uri,
    )


class VMInfo(BaseModel):
    """What ``info`` shows: QEMU version, capabilities, disks."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    version: str
    name: str | None
    capabilities: dict[str, bool]
    graph: BlockGraph
    # The guest agent's socket as QEMU connects it, why it cannot be used, or None.
    guest_agent: str | None = None
    # "disk/bitmap" -> whose it is (qmpbackup.planner.ownership.bitmap_owner).
    owners: Mapping[str, str] = {}
