"""A backup's data on its way into the repository, with progress reported as events.

Push: QEMU's jobs are followed; pull: the exports are read with the built-in
NBD client into the repository's new images.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from ..api import VM
from ..errors import DisconnectedError, QmpBackupError, ScratchFullError
from ..images.keyed import key_file
from ..images.pull_copy import CopyResult, pull_copy
from ..planner.level import LevelDecision
from ..qapi.commands import JobCancel
from ..results import BackupBegun
from ..runner import run_command
from .events import BackupEvent, EventSink
from .records import BackupEntry

log = structlog.get_logger("qmpbackup.transfer")

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


class _ScratchWatch:
    """The watch over a pull backup's bounded scratches while their exports are read.

    When one passes its write threshold, the watch gives its reserve back (the scratch
    grows into it while the backup ends), stops the reader and every fleecing job at
    once, and holds the ScratchFullError that the copy raises.
    """

    def __init__(self, vm: VM, job: BackupBegun, cancel: threading.Event) -> None:
        self.vm = vm
        self.job = job
        self.cancel = cancel
        self.bounded = {d.target_nodes[-1]: d for d in job.record.disks if d.reserve_file}
        self.full: ScratchFullError | None = None

    async def run(self, events: asyncio.Queue[Mapping[str, Any]]) -> None:
        """Wait for a bounded scratch's ``BLOCK_WRITE_THRESHOLD``; then act as the class
        says and raise ScratchFullError."""
        if not self.bounded:
            await asyncio.get_running_loop().create_future()  # nothing to watch: wait forever
        what = "the scratches' write thresholds"
        while True:
            data = (await self.vm.session.next_event(events, what))["data"]
            disk = self.bounded.get(data.get("node-name", ""))
            if disk is not None:
                break
        assert disk.reserve_file is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(disk.reserve_file)
        self.full = ScratchFullError(
            f"the scratch of {disk.disk} passed the {(disk.write_threshold or 0) >> 20} MiB it "
            "had room for: the backup is abandoned, and the guest's writes went on "
            "(give the scratch more room: free space beside it, or a smaller --scratch-reserve)"
        )
        self.cancel.set()
        # Every further guest write is copied into the scratch until the fleecing stops:
        # stop it now, before the backup's orderly end (locks, queries, a journal on a
        # filesystem this scratch may have filled), which cancels it again harmlessly.
        for fleecing in self.job.record.disks:
            with contextlib.suppress(QmpBackupError):
                await run_command(self.vm.session, JobCancel(id=fleecing.job_id))
        log.info("scratch.full", disk=disk.disk, threshold=disk.write_threshold)
        raise self.full


async def read_exports(
    vm: VM,
    entry: BackupEntry,
    job: BackupBegun,
    levels: dict[str, LevelDecision],
    emit: EventSink,
) -> dict[str, CopyResult]:
    """Copy each export with the built-in client; what was written, per disk.

    A bounded scratch that fills up (see :class:`~qmpbackup.planner.facts.BeginOptions`)
    stops the copy with ScratchFullError; a failed copy raises QmpBackupError naming the
    disk and the image.
    """
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

    written: dict[str, CopyResult] = {}
    watch = _ScratchWatch(vm, job, cancel)
    async with vm.session.watch({"BLOCK_WRITE_THRESHOLD"}) as events:
        watcher = asyncio.ensure_future(watch.run(events))
        try:
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
                    compression=entry.record.compression,
                    on_progress=functools.partial(progressed, disk),
                    on_start=functools.partial(started, disk),
                    encrypt=key_file() is not None,
                )
                # In this task's context: the key of keyed.using_key, if any.
                future = loop.run_in_executor(None, contextvars.copy_context().run, copy)
                result = await _copy_unless_full(future, watch, watcher, disk, target.image)
                written[disk] = result
            if watch.full is not None:
                # Filled as the last copy ended: its fleecing is stopped, the backup too.
                raise watch.full
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
    report()
    return written


async def _copy_unless_full(
    future: asyncio.Future[CopyResult],
    watch: _ScratchWatch,
    watcher: asyncio.Future[None],
    disk: str,
    image: Path,
) -> CopyResult:
    """The copy's result, unless a scratch fills first (its ScratchFullError is raised)."""
    try:
        either: set[asyncio.Future[Any]] = {future, watcher}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            watcher.result()
            raise AssertionError("the scratch watch ended without a reason")
        return future.result()
    except BaseException as exc:
        # The thread cannot be cancelled: stop it at its next request and wait, so that
        # nothing writes into the repository once we have left.
        watch.cancel.set()
        with contextlib.suppress(BaseException):
            await future
        if watch.full is not None and exc is not watch.full:
            # The reads fail once the fleecing stops: the full scratch is the reason.
            raise watch.full from exc
        if isinstance(exc, QmpBackupError) and not isinstance(
            exc, (CopyInterrupted, DisconnectedError, ScratchFullError)
        ):
            raise QmpBackupError(f"could not copy {disk} into {image}: {exc}") from exc
        raise
