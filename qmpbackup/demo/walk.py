"""``qmpbackup demo``: the slides' flows on a throwaway QEMU, every result checked.

It builds the slides' two disks, starts QEMU, and walks Part II (full push
backup), Part III (full pull backup read by ``qemu-img`` and by the built-in
NBD client) and Part IV (checkpoint size, then the incremental chain and the
differential, in push and in pull mode) through :class:`qmpbackup.api.VM`,
printing each QMP command and checking each backup with ``qemu-img``.  As on
the slides, one letter of a picture is one MiB of the disk: ``ABBBB---`` is
``A`` in the first MiB, ``B`` in the next four, then zeroes.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from ..api import VM, BackupBegun
from ..errors import InvalidInputError, QmpBackupError
from ..images.pull_copy import CopyResult, pull_copy
from ..nbd import Extent, NBDClient
from ..planner import naming
from ..planner.plan import Step
from ..request import (
    BackupSpec,
    CheckpointSpec,
    DiskBackupSpec,
    ServerSpec,
    backup_to_xml,
    checkpoint_to_xml,
)
from ..runner import query_jobs
from ..state.active import BackupRecord
from .throwaway import ThrowawayVM, images_equal, make_slides_images, qemu_img, remove_tree

MiB = 1024 * 1024
CLUSTER = 64 * 1024  # qcow2 cluster size and dirty-bitmap granularity of the slides' disks
PICTURE = 8  # the slides draw the first 8 MiB of each disk
DISKS = ("vda", "vdb")
NUMBER = {"vda": 1, "vdb": 2}  # vda is Active1.qcow2 / Backup1.*, vdb is Active2 / Backup2.*


class CheckFailed(Exception):
    """A demo check did not hold."""


@dataclass(frozen=True)
class Round:
    """One push backup of Part IV's chain."""

    number: int
    title: str
    incremental: str | None  # the checkpoint it copies the changes since
    checkpoint: str | None  # the checkpoint it creates at its instant
    parent: int | None  # the backup it is rebased onto
    during: dict[str, str]  # what the guest writes while it copies, per disk


ROUNDS = (
    Round(1, "full backup + checkpoint check1", None, "check1", None,
          {"vda": "---DDDD-", "vdb": "---WWWW-"}),
    Round(2, "incremental from check1 + checkpoint check2", "check1", "check2", 1,
          {"vda": "----EEEE", "vdb": "----VVVV"}),
    Round(3, "incremental from check2 + checkpoint check3", "check2", "check3", 2,
          {"vda": "F----FFF", "vdb": "U----UUU"}),
    Round(4, "differential from check1, no checkpoint", "check1", None, 1,
          {"vda": "------!!", "vdb": "------!!"}),
)  # fmt: skip

# The pull chain is the same walk; the guest writes the lowercase letters so that
# each write changes what the disk reads (the push chain left the uppercase ones).
PULL_ROUNDS = tuple(
    replace(r, during={disk: drawing.lower() for disk, drawing in r.during.items()}) for r in ROUNDS
)


def say(text: str = "") -> None:
    """Print one line of the demo's output."""
    print(text, flush=True)


def header(title: str) -> None:
    """Print a section header."""
    say()
    say(f"== {title} ==")


def check(condition: bool, what: str) -> None:
    """Print ``ok: what`` when ``condition`` holds, else raise :class:`CheckFailed`."""
    if not condition:
        raise CheckFailed(what)
    say(f"  ok: {what}")


def picture(raw: Path) -> str:
    """The first MiBs of a raw image as the slides draw them: a letter per MiB, ``-`` for zeroes."""
    letters = []
    with open(raw, "rb") as handle:
        for _ in range(PICTURE):
            chunk = handle.read(MiB)
            if not chunk.strip(b"\0"):
                letters.append("-")
            elif chunk == chunk[:1] * len(chunk) and chr(chunk[0]).isprintable():
                letters.append(chr(chunk[0]))
            else:
                letters.append("?")
    return "".join(letters)


def image_info(image: Path) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of ``image``: the image first, then its backing files."""
    chain: list[dict[str, Any]] = json.loads(
        qemu_img("info", "-U", "--backing-chain", "--output=json", str(image))
    )
    return chain


def chain_text(image: Path) -> str:
    """``image``'s backing chain as the slides write it: ``Base1.img ← Active1.qcow2``."""
    return " ← ".join(Path(entry["filename"]).name for entry in reversed(image_info(image)))


def allocated_clusters(image: Path) -> set[int]:
    """Indexes of the clusters ``image`` itself holds (not its backing files)."""
    extents = json.loads(qemu_img("map", "-U", "--output=json", str(image)))
    clusters: set[int] = set()
    for extent in extents:
        if extent["depth"] == 0 and extent.get("present", extent["data"]):
            start, end = extent["start"], extent["start"] + extent["length"]
            clusters.update(range(start // CLUSTER, (end + CLUSTER - 1) // CLUSTER))
    return clusters


def size_text(clusters: set[int]) -> str:
    """A cluster count in MiB or KiB."""
    size = len(clusters) * CLUSTER
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size // 1024} KiB"


def mib(size: int) -> str:
    """A byte count in MiB."""
    return f"{size / MiB:g} MiB"


def rebase(image: Path, parent: Path) -> None:
    """``qemu-img rebase -u``: make ``parent`` the backing file of ``image``."""
    say(f"$ qemu-img rebase -u -f qcow2 -b {parent.name} -F qcow2 {image.name}")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(parent), "-F", "qcow2", str(image))


def dirty_extents(uri: str, context: str) -> list[Extent]:
    """The dirty extents of an export, from NBD block status on ``context``."""
    with NBDClient.connect(uri, meta_contexts=[context]) as client:
        return [extent for extent in client.extents(context) if extent.flags & 1]


def extents_picture(extents: list[Extent]) -> str:
    """The first MiBs as the slides draw a bitmap: ``!`` where an extent touches the MiB."""
    return "".join(
        "!" if any(e.offset < (i + 1) * MiB and e.end > i * MiB for e in extents) else "-"
        for i in range(PICTURE)
    )


def extent_clusters(extents: list[Extent]) -> set[int]:
    """Indexes of the clusters the extents cover."""
    clusters: set[int] = set()
    for extent in extents:
        clusters.update(range(extent.offset // CLUSTER, (extent.end + CLUSTER - 1) // CLUSTER))
    return clusters


def show_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and print it as ``$ cat`` would."""
    path.write_text(text)
    say(f"$ cat {path.name}")
    say(text.rstrip("\n"))


class Demo:
    """The walk through the slides on one throwaway QEMU."""

    def __init__(self, workdir: Path, machine: ThrowawayVM, vm: VM, verbose: bool) -> None:
        self.workdir = workdir
        self.machine = machine
        self.vm = vm
        self.verbose = verbose
        # The pull backups' NBD server.
        self.server = ServerSpec(transport="unix", socket=str(workdir / "nbd.sock"))
        # Clusters the guest dirtied since each live checkpoint, per disk.
        self.dirty: dict[str, dict[str, set[int]]] = {}

    # -- helpers --------------------------------------------------------------

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

    def show_uris(self, record: BackupRecord) -> dict[str, str]:
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

    # -- slide sections ---------------------------------------------------------

    async def setup(self) -> None:
        """Show the layout and let the guest write the slides' first data."""
        info = await self.vm.info()
        say(f"QEMU {info.version} running (pid {self.machine_pid()})")
        say(f"QMP socket: {self.machine.qmp_path}")
        for disk in DISKS:
            say(f"{disk}: {chain_text(self.machine.disks[NUMBER[disk] - 1].path)}")
        await self.paint_all({"vda": "-BBBB---", "vdb": "XXXX----"}, "(one letter = 1 MiB)")
        await self.paint_all({"vdb": "-YYYY---"}, "")
        refs = await self.references("setup")
        say(f"vda reads {picture(refs['vda'])}, vdb reads {picture(refs['vdb'])}")

    async def push_full(self) -> None:
        """Part II: backup_push_full.xml, shallow qcow2 of vda and raw of vdb, at one instant."""
        header("Part II: full backup, push mode")
        b1, b2 = self.workdir / "Backup1.1.qcow2", self.workdir / "Backup2.full.raw"
        spec_path = self.workdir / "backup_push_full.xml"
        spec = BackupSpec(
            mode="push",
            disks=(
                DiskBackupSpec(name="vda", target=str(b1), format="qcow2", shallow=True),
                DiskBackupSpec(name="vdb", target=str(b2), format="raw"),
            ),
        )
        show_file(spec_path, backup_to_xml(spec))
        refs = await self.references("full")
        top_layer = allocated_clusters(self.machine.disks[0].path)
        say(f"$ qmpbackup backup-begin {spec_path.name}")
        begun = await self.vm.backup_begin(spec, None, self.show_step)
        say(f"Backup id {begun.record.id} created")
        say(f"backup used description from '{spec_path.name}'")
        await self.paint_all({"vda": "--CCCC--", "vdb": "--ZZZZ--"}, "right after backup-begin")
        await self.end_backup(begun.record.id)
        now = await self.references("after-full")

        for backup in (self.machine.disks[0].path, b1, self.machine.disks[1].path, b2):
            say(f"  {chain_text(backup)}")
        check(images_equal(b2, refs["vdb"], "raw"), f"{b2.name} equals vdb at the instant")
        say(f"       vdb then: {picture(refs['vdb'])}, vdb now: {picture(now['vdb'])}")
        check(not images_equal(b2, now["vdb"], "raw"), "the guest's later writes are not in it")
        backing = image_info(b1)[0].get("full-backing-filename")
        base1 = self.machine.disks[0].backing
        check(backing == str(base1), f"{b1.name} is shallow: its backing file is {backing}")
        copied = allocated_clusters(b1)
        layer = f"holds only clusters of Active1.qcow2's top layer ({size_text(copied)})"
        check(copied <= top_layer, f"{b1.name} {layer}")
        check(images_equal(b1, refs["vda"]), f"Base1.img ← {b1.name} equals vda at the instant")
        say(f"       vda then: {picture(refs['vda'])}, vda now: {picture(now['vda'])}")
        check(not images_equal(b1, now["vda"]), "the guest's later writes are not in it")

    async def checkpoint_size(self) -> None:
        """Part IV: how much disk is the guest dirtying? checkpoint c1, dumpxml --size, delete."""
        header("Part IV: how much disk is the guest dirtying?")
        say("$ qmpbackup checkpoint-create-as c1")
        await self.vm.checkpoint_create(CheckpointSpec(name="c1"), self.show_step)
        self.track("c1")
        say("Domain checkpoint c1 created")
        await self.write("vda", "c", 32 * MiB, 128 * 1024)
        say("guest writes 128 KiB on vda at 32 MiB")
        say("$ qmpbackup checkpoint-dumpxml c1 --size")
        xml = await self.vm.checkpoint_xml("c1", size=True)
        say(xml.rstrip("\n"))
        sizes = {
            disk.get("name"): disk.get("size") for disk in ElementTree.fromstring(xml).iter("disk")
        }
        for disk in DISKS:
            expected = len(self.dirty["c1"][disk]) * CLUSTER
            check(sizes.get(disk) == str(expected), f"{disk} size='{expected}'")
        say("$ qemu-img measure --size 131072 -O qcow2")
        say(qemu_img("measure", "--size", "131072", "-O", "qcow2").rstrip("\n"))
        say("$ qmpbackup checkpoint-delete c1")
        names = await self.vm.checkpoint_delete("c1", on_step=self.show_step)
        del self.dirty["c1"]
        for name in names:
            say(f"Domain checkpoint {name} deleted")
        graph = await self.vm.graph()
        left = [d for d in DISKS for layer in graph.chain_nodes(d) if layer.bitmap("c1")]
        check(not left and not self.vm.checkpoints(), "no bitmap c1 and no checkpoint left")

    async def chain(self) -> None:
        """Part IV, push flavour: full + check1, two incrementals, one differential."""
        header("Part IV: incremental and differential backups, push mode")
        folder = self.workdir / "chain"
        folder.mkdir()
        for backup_round in ROUNDS:
            await self.backup_round(folder, backup_round)
        self.check_chains(folder)

    def check_chains(self, folder: Path) -> None:
        """Print the chains as the slides do; check them and the checkpoints."""
        say()
        for disk in DISKS:
            n = NUMBER[disk]
            say(chain_text(self.machine.disks[n - 1].path))
            for last, expected in ((3, [1, 2, 3]), (4, [1, 4])):
                drawn = chain_text(folder / f"Backup{n}.{last}.qcow2")
                want = " ← ".join(f"Backup{n}.{i}.qcow2" for i in expected)
                check(drawn == want, drawn)
        listed = " → ".join(c.name for c in self.vm.checkpoints())
        check(listed == "check1 → check2 → check3", f"checkpoints: {listed}")

    async def backup_round(self, folder: Path, backup: Round) -> None:
        """One backup of the chain: begin, guest writes, end, then rebase and compare."""
        say()
        say(f"-- Backup{{1,2}}.{backup.number}.qcow2: {backup.title} --")
        targets = {disk: folder / f"Backup{NUMBER[disk]}.{backup.number}.qcow2" for disk in DISKS}
        spec_path = folder / f"backup_push_{backup.number}.xml"
        disks = tuple(
            DiskBackupSpec(name=d, target=str(t), format="qcow2") for d, t in targets.items()
        )
        spec = BackupSpec(mode="push", incremental=backup.incremental, disks=disks)
        show_file(spec_path, backup_to_xml(spec))
        refs, expected, begun = await self.begin_round(folder, backup, spec_path, spec)
        await self.paint_all(backup.during, "right after backup-begin")
        await self.end_backup(begun.record.id)
        for disk, target in targets.items():
            self.verify(target, refs[disk], disk, backup, expected.get(disk))

    async def begin_round(
        self, folder: Path, backup: Round, spec_path: Path, spec: BackupSpec
    ) -> tuple[dict[str, Path], dict[str, set[int]], BackupBegun]:
        """Show the round's checkpoint XML, take references, ``backup-begin``.

        Returns the references of the disks at the instant, the clusters dirtied
        since the round's incremental checkpoint, and what began.
        """
        checkpoint: CheckpointSpec | None = None
        command = f"$ qmpbackup backup-begin {spec_path.name}"
        if backup.checkpoint is not None:
            check_path = folder / f"{backup.checkpoint}.xml"
            checkpoint = CheckpointSpec(name=backup.checkpoint)
            show_file(check_path, checkpoint_to_xml(checkpoint))
            command += f" {check_path.name}"
        refs = await self.references(f"{folder.name}-{backup.number}")
        expected = (
            {disk: set(self.dirty[backup.incremental][disk]) for disk in DISKS}
            if backup.incremental
            else {}
        )
        say(command)
        begun = await self.vm.backup_begin(spec, checkpoint, self.show_step)
        if backup.checkpoint is not None:
            self.track(backup.checkpoint)
        say(f"Backup id {begun.record.id} created")
        say(f"backup used description from '{spec_path.name}'")
        if backup.checkpoint is not None:
            say(f"checkpoint created from '{backup.checkpoint}.xml'")
        return refs, expected, begun

    def verify(
        self,
        target: Path,
        reference: Path,
        disk: str,
        backup: Round,
        dirty: set[int] | None,
        pulled: bool = False,
    ) -> None:
        """Check one disk's backup of a round against the disk at the round's instant.

        A push incremental is rebased onto its parent as on the slides; a pulled one
        already has its parent as backing file (``pull_copy`` sets it, relative).
        """
        seen = picture(reference)
        if backup.parent is None or dirty is None:
            check(len(image_info(target)) == 1, f"{target.name} stands alone (no backing file)")
            check(
                images_equal(target, reference),
                f"{target.name} equals {disk} at the instant: {seen}",
            )
            return
        copied = allocated_clusters(target)
        since = f"the {size_text(dirty)} dirtied since {backup.incremental}"
        check(copied == dirty, f"{target.name} holds exactly {since}")
        parent = target.with_name(f"Backup{NUMBER[disk]}.{backup.parent}.qcow2")
        if pulled:
            backing = image_info(target)[0].get("backing-filename")
            check(backing == parent.name, f"{target.name}'s backing file is {backing}")
        else:
            rebase(target, parent)
        check(
            images_equal(target, reference),
            f"{chain_text(target)} equals {disk} at the instant: {seen}",
        )

    # -- pull mode --------------------------------------------------------------

    async def pull_full(self) -> None:
        """Part III: backup_pull_full.xml; vda read by qemu-img, vdb by the built-in client."""
        header("Part III: full backup, pull mode")
        scratch = self.workdir / "scratch.qcow2"
        size = image_info(self.machine.disks[1].path)[0]["virtual-size"]
        say(f"$ qemu-img create -f qcow2 {scratch.name} {size // MiB}M")
        qemu_img("create", "-q", "-f", "qcow2", str(scratch), str(size))
        say("(no -b Active2.qcow2 as on the slides: qmpbackup opens the scratch over vdb itself)")
        spec_path = self.workdir / "backup_pull_full.xml"
        spec = BackupSpec(
            mode="pull",
            server=self.server,
            disks=(DiskBackupSpec(name="vda"), DiskBackupSpec(name="vdb", scratch=str(scratch))),
        )
        show_file(spec_path, backup_to_xml(spec))
        refs = await self.references("pull-full")
        say(f"$ qmpbackup backup-begin {spec_path.name}")
        begun = await self.vm.backup_begin(spec, None, self.show_step)
        say(f"Backup id {begun.record.id} created")
        say(f"backup used description from '{spec_path.name}'")
        uris = self.show_uris(begun.record)
        await self.paint_all({"vda": "--cccc--", "vdb": "--zzzz--"}, "right after backup-begin")
        b1, b2 = self.workdir / "Backup1.full.raw", self.workdir / "Backup2.qcow2"
        say(f"$ qemu-img convert -f raw {uris['vda']} -O raw {b1.name}")
        await asyncio.to_thread(qemu_img, "convert", "-f", "raw", uris["vda"], "-O", "raw", str(b1))
        await self.copy(uris["vdb"], b2)
        now = await self.references("after-pull-full")
        for disk, backup in (("vda", b1), ("vdb", b2)):
            then = picture(refs[disk])
            check(images_equal(backup, refs[disk]), f"{backup.name} equals {disk} at the instant")
            say(f"       {disk} then: {then}, {disk} now: {picture(now[disk])}")
            check(not images_equal(backup, now[disk]), "the guest's later writes are not in it")
        await self.end_pull(begun.record.id)
        check(scratch.exists(), f"{scratch.name} is still there: qmpbackup did not create it")
        made = sorted(p.name for p in (self.vm.state_dir / "scratch").iterdir())
        left = f": {', '.join(made)} left" if made else ""
        check(not made, f"the scratch qmpbackup created for vda is gone{left}")
        say(f"$ rm {scratch.name}")
        scratch.unlink()

    async def pull_chain(self) -> None:
        """Part IV, pull flavour: the same chain, read over NBD with dirty-bitmap block status."""
        header("Part IV: incremental and differential backups, pull mode")
        say("The push chain's checkpoints go first, so the pull chain can use the slides' names:")
        say("$ qmpbackup checkpoint-delete check1 --children")
        names = await self.vm.checkpoint_delete("check1", children=True, on_step=self.show_step)
        for name in names:
            self.dirty.pop(name, None)
            say(f"Domain checkpoint {name} deleted")
        graph = await self.vm.graph()
        left = [d for d in DISKS for layer in graph.chain_nodes(d) for b in layer.bitmaps]
        check(not left and not self.vm.checkpoints(), "no checkpoint and no bitmap left")
        folder = self.workdir / "pull-chain"
        folder.mkdir()
        for backup_round in PULL_ROUNDS:
            await self.pull_round(folder, backup_round)
        self.check_chains(folder)

    async def pull_round(self, folder: Path, backup: Round) -> None:
        """One pull backup of the chain: begin, guest writes, read over NBD, end, compare."""
        say()
        say(f"-- Backup{{1,2}}.{backup.number}.qcow2: {backup.title} --")
        spec_path = folder / f"backup_pull_{backup.number}.xml"
        spec = BackupSpec(mode="pull", incremental=backup.incremental, server=self.server)
        show_file(spec_path, backup_to_xml(spec))
        refs, expected, begun = await self.begin_round(folder, backup, spec_path, spec)
        self.show_uris(begun.record)
        await self.paint_all(backup.during, "right after backup-begin")
        targets: dict[str, Path] = {}
        for job in begun.record.disks:
            assert job.uri is not None
            n = NUMBER[job.disk]
            targets[job.disk] = folder / f"Backup{n}.{backup.number}.qcow2"
            if backup.parent is None or backup.incremental is None:
                await self.copy(job.uri, targets[job.disk])
                continue
            assert job.export_bitmap is not None
            await self.show_dirty(
                job.uri, job.export_bitmap, job.disk, backup.incremental, expected[job.disk]
            )
            parent = folder / f"Backup{n}.{backup.parent}.qcow2"
            await self.copy(job.uri, targets[job.disk], parent, job.export_bitmap)
        await self.end_pull(begun.record.id)
        for disk, target in targets.items():
            self.verify(target, refs[disk], disk, backup, expected.get(disk), pulled=True)


def prepare_workdir(workdir: Path | None) -> Path:
    """A new temporary directory, or ``workdir`` if it is missing or empty."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="qmpbackup-demo-"))
    workdir = workdir.absolute()
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise InvalidInputError(f"work directory {workdir} is not an empty directory")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


async def walk(demo: Demo) -> None:
    """Every slide section, in order."""
    await demo.setup()
    await demo.push_full()
    await demo.checkpoint_size()
    await demo.chain()
    await demo.pull_full()
    await demo.pull_chain()


async def run_demo(workdir: Path | None, keep: bool = False, verbose: bool = False) -> int:
    """Run the demo in ``workdir`` (default: a new temporary directory); 0 when every check held."""
    workdir = prepare_workdir(workdir)
    status = 1
    try:
        header("Setup: the slides' two disks on a throwaway QEMU")
        say(f"work directory: {workdir}")
        machine = ThrowawayVM(workdir, make_slides_images(workdir), name="qmpbackup-demo")
        try:
            await machine.start()
            vm = await VM.connect(str(machine.qmp_path), workdir / "state")
            try:
                await walk(Demo(workdir, machine, vm, verbose))
                status = 0
            finally:
                await vm.close()
        except CheckFailed as failed:
            say(f"FAILED: {failed}")
        except QmpBackupError as error:
            say(f"FAILED: {error}")
        finally:
            await machine.stop()
            say()
            say("QEMU stopped")
    finally:
        if keep:
            say(f"work directory kept: {workdir}")
        else:
            remove_tree(workdir)
            say(f"work directory removed{'' if status == 0 else ' (rerun with --keep to inspect)'}")
    if status == 0:
        say("all checks passed")
    return status


__all__ = ["run_demo"]
