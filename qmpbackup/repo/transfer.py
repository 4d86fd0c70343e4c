"""A backup's data on its way into the repository, with progress reported as events.

Push: QEMU's jobs are followed; pull: the exports are read with the built-in
NBD client into the repository's new images.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading

from ..api import VM
from ..errors import QmpBackupError
from ..images.pull_copy import pull_copy
from ..planner.level import LevelDecision
from ..results import BackupBegun
from .events import BackupEvent, EventSink
from .records import BackupEntry

_POLL = 0.5


class CopyInterrupted(QmpBackupError):
    """The copy was stopped because the backup is being abandoned."""


async def follow_jobs(vm: VM, job: BackupBegun, emit: EventSink) -> dict[str, int]:
    """Wait for QEMU's jobs, reporting their progress; bytes written per disk."""
    waiter = asyncio.ensure_future(vm.wait_backup(job.record.id))
    try:
        while True:
            info = await vm.job_info(job.record.id)
            emit(BackupEvent("progress", done=info.processed, total=info.total))
            if waiter.done():
                break
            await asyncio.wait({waiter}, timeout=_POLL)
        waiter.result()
    finally:
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(BaseException):
                await waiter
    return {d.disk: d.total for d in info.disks}


async def read_exports(
    entry: BackupEntry,
    job: BackupBegun,
    levels: dict[str, LevelDecision],
    emit: EventSink,
) -> dict[str, int]:
    """Copy each export with the built-in client; bytes written per disk."""
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    totals: dict[str, int] = {}
    done: dict[str, int] = {}

    def report() -> None:
        emit(BackupEvent("progress", done=sum(done.values()), total=sum(totals.values())))

    def started(disk: str, total: int) -> None:
        totals[disk] = total
        loop.call_soon_threadsafe(report)

    def progressed(disk: str, copied: int) -> None:
        if cancel.is_set():
            raise CopyInterrupted("copy stopped")
        done[disk] = copied
        loop.call_soon_threadsafe(report)

    written: dict[str, int] = {}
    for disk_job in job.record.disks:
        disk = disk_job.disk
        target = entry.target(disk)
        incremental = levels[disk].level != "full"
        assert disk_job.uri is not None
        copy = functools.partial(
            pull_copy,
            disk_job.uri,
            target.image,
            fmt="qcow2",
            backing=target.image.parent / target.backing if target.backing else None,
            bitmap=disk_job.export_bitmap if incremental else None,
            on_progress=functools.partial(progressed, disk),
            on_start=functools.partial(started, disk),
        )
        future = loop.run_in_executor(None, copy)
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread cannot be cancelled: stop it at its next request and wait,
            # so that nothing writes into the repository once we have left.
            cancel.set()
            with contextlib.suppress(BaseException):
                await future
            raise
        except CopyInterrupted:
            raise
        except QmpBackupError as exc:
            raise QmpBackupError(f"could not copy {disk} into {target.image}: {exc}") from exc
        written[disk] = result.data_bytes + result.zero_bytes
    report()
    return written
