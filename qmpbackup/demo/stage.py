"""The demo's stage (:class:`Demo`): what every section of the demo works with.

The throwaway QEMU, the API connected to it, what the guest has dirtied, and
the actions every section takes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ..api import VM
from ..images.pull_copy import CopyResult, pull_copy
from ..planner import naming
from ..planner.plan import Step
from ..qmp.jobs import query_jobs
from ..request import ServerSpec
from ..state.active import ActiveBackup
from .show import (
    CLUSTER,
    CheckFailed,
    MiB,
    check,
    dirty_extents,
    extent_clusters,
    extents_picture,
    mib,
    say,
    size_text,
)
from .throwaway import ThrowawayVM

DISKS = ("vda", "vdb")
NUMBER = {"vda": 1, "vdb": 2}  # vda is Active1.qcow2 / Backup1.*, vdb is Active2 / Backup2.*


class Demo:
    """The walk through the slides on one throwaway QEMU: its state and its actions."""

    def __init__(self, workdir: Path, machine: ThrowawayVM, vm: VM, verbose: bool) -> None:
        self.workdir = workdir
        self.machine = machine
        self.vm = vm
        self.verbose = verbose
        # The pull backups' NBD server.
        self.server = ServerSpec(transport="unix", socket=str(workdir / "nbd.sock"))
        # Clusters the guest dirtied since each live checkpoint, per disk.
        self.dirty: dict[str, dict[str, set[int]]] = {}

    def show_step(self, number: int, step: Step) -> None:
        """Print a QMP command as it is sent (``on_step`` callback)."""
        say(f"  -> {json.dumps(step.command.to_qmp())}")
        if self.verbose:
            say(f"     # {step.reason}")

    def track(self, checkpoint: str) -> None:
        """Start counting the clusters dirtied since ``checkpoint``."""
        self.dirty[checkpoint] = {disk: set() for disk in DISKS}

    async def write(self, disk: str, letter: str, offset: int, length: int) -> None:
        """The guest writes ``length`` bytes of ``letter`` at ``offset`` on ``disk``."""
        await self.machine.write(disk, ord(letter), offset, length)
        first, last = offset // CLUSTER, (offset + length - 1) // CLUSTER
        for disks in self.dirty.values():
            disks[disk].update(range(first, last + 1))

    async def paint(self, disk: str, drawing: str) -> None:
        """The guest writes a slide picture on ``disk``: each letter one MiB, ``-`` untouched."""
        start = 0
        while start < len(drawing):
            end = start
            while end < len(drawing) and drawing[end] == drawing[start]:
                end += 1
            if drawing[start] != "-":
                await self.write(disk, drawing[start], start * MiB, (end - start) * MiB)
            start = end

    async def paint_all(self, drawings: dict[str, str], when: str) -> None:
        """Paint one picture per disk and say so."""
        for disk, drawing in drawings.items():
            await self.paint(disk, drawing)
        written = ", ".join(f"{drawing} on {disk}" for disk, drawing in drawings.items())
        say(f"guest writes {written}{' ' if when else ''}{when}")

    async def references(self, tag: str) -> dict[str, Path]:
        """Raw copies of both disks as they are now."""
        return {
            disk: await self.machine.reference(disk, self.workdir / f"ref-{disk}-{tag}.raw")
            for disk in DISKS
        }

    async def end_backup(self, backup_id: int) -> None:
        """Wait for the copy, show jobinfo, then ``backup-end``."""
        await self.vm.wait_backup(backup_id)
        info = await self.vm.job_info(backup_id)
        say("$ qmpbackup jobinfo   (once JOB_STATUS_CHANGE says concluded)")
        say(f"Job type: Backup, {info.status}, {mib(info.processed)} of {mib(info.total)}")
        await self.end_pull(backup_id)

    async def check_clean(self) -> None:
        """Check that QEMU holds no qmpbackup- node, bitmap or job, and no export."""
        graph = await self.vm.graph()
        jobs = await query_jobs(self.vm.session)
        exports = await self.vm.session.execute("query-block-exports")
        left = graph.nodes_with_prefix(naming.PREFIX)
        left += [f"bitmap {b.bitmap.name}" for b in graph.bitmaps_with_prefix(naming.PREFIX)]
        left += [f"job {j}" for j in jobs]
        left += [f"export {e['id']}" for e in exports]
        found = f": {', '.join(left)}" if left else ""
        check(not left, f"QEMU holds no {naming.PREFIX} node, bitmap, job or export{found}")

    async def end_pull(self, backup_id: int) -> None:
        """``backup-end``: a push copy is done, or a pull reader is; check nothing is left."""
        say(f"$ qmpbackup backup-end {backup_id}")
        ended = await self.vm.backup_end(backup_id, on_step=self.show_step)
        say(f"Backup id {ended.id} {ended.outcome}")
        if ended.outcome != "completed":
            raise CheckFailed(f"backup id {ended.id} {ended.outcome}: {ended.errors}")
        await self.check_clean()

    def show_uris(self, record: ActiveBackup) -> dict[str, str]:
        """Print one NBD URI per disk, as ``backup-begin`` does; return them."""
        uris = {d.disk: d.uri for d in record.disks if d.uri}
        for disk, uri in uris.items():
            say(f"{disk} {uri}")
        return uris

    async def copy(
        self, uri: str, out: Path, backing: Path | None = None, bitmap: str | None = None
    ) -> CopyResult:
        """Copy an export with the built-in NBD client (``pull_copy``), printed as called."""
        args = f'"{uri}", Path("{out.name}")'
        if backing is not None:
            args += f', backing=Path("{backing.name}"), bitmap="{bitmap}"'
        say(f">>> pull_copy({args})")
        result = await asyncio.to_thread(pull_copy, uri, out, backing=backing, bitmap=bitmap)
        zeroes = f", {mib(result.zero_bytes)} as zeroes" if result.zero_bytes else ""
        say(f"{out.name}: {mib(result.data_bytes)} of data copied{zeroes}")
        return result

    async def show_dirty(
        self, uri: str, bitmap: str, disk: str, since: str, dirty: set[int]
    ) -> None:
        """Print the export's dirty extents from NBD block status; check them."""
        context = f"qemu:dirty-bitmap:{bitmap}"
        say(f"$ NBD_CMD_BLOCK_STATUS on {context}   (built-in client: NBDClient.extents)")
        extents = await asyncio.to_thread(dirty_extents, uri, context)
        for extent in extents:
            say(f"  dirty: offset {mib(extent.offset)}, length {mib(extent.length)}")
        say(f"  {extents_picture(extents)}   (! = dirty MiB)")
        found = extent_clusters(extents)
        check(found == dirty, f"exactly the {size_text(dirty)} of {disk} dirtied since {since}")

    def machine_pid(self) -> int:
        """The QEMU process id."""
        assert self.machine.process is not None
        return self.machine.process.pid
