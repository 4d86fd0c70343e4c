"""Several VMs backed up at once from one process, one QMP session each: no cross-talk.

Four QEMUs share one repository root. Each VM's disks differ in size, data, write
offsets and patterns, so anything of one VM that reaches another (data, events, byte
counts, checkpoints, nodes) shows as a mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img, qemu_io
from qmpbackup.images.pull_copy import pull_copy
from qmpbackup.repo.backup import RepositoryBackup, backup_to_repository
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.records import BackupRecord
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore
from qmpbackup.request.models import BackupSpec, CheckpointSpec, DiskBackupSpec, ServerSpec

from .support import CLUSTER, allocated_clusters, clusters_of, qemu_img_info, rebase

pytestmark = pytest.mark.qemu

MiB = 1 << 20
KiB = 1 << 10
COUNT = 4
DISKS = ("vda", "vdb")
Mode = Literal["push", "pull"]
Level = Literal["full", "auto"]
T = TypeVar("T")


async def all_of(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` at once; if one fails, the others are cancelled and waited for."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c) for c in coros]
    return [t.result() for t in tasks]


def make_images(workdir: Path, index: int) -> list[DiskImage]:
    """vda: a qcow2 over a raw base holding data; vdb: a qcow2 with data of its own.
    Sizes and data depend on ``index``."""
    workdir.mkdir(parents=True)
    base, active, data = workdir / "base.raw", workdir / "active.qcow2", workdir / "data.qcow2"
    qemu_img("create", "-q", "-f", "raw", str(base), f"{32 + 4 * index}M")
    qemu_io(str(base), f"write -P {0x10 + index:#x} 0 {index + 1}M")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.name, str(active))
    qemu_img("create", "-q", "-f", "qcow2", str(data), f"{16 + 2 * index}M")
    qemu_io(str(data), f"write -P {0x30 + index:#x} 2M {(index + 1) * 256}k", fmt="qcow2")
    return [DiskImage(name="vda", path=active, backing=base), DiskImage(name="vdb", path=data)]


@dataclass
class Guest:
    """One VM of the test: its QEMU, API handle, repository and the writes not yet backed up."""

    index: int
    machine: ThrowawayVM
    state_dir: Path
    repo: Repository
    api: VM | None = None
    changed: dict[str, set[int]] = field(default_factory=lambda: {d: set() for d in DISKS})
    pending: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def vm(self) -> VM:
        """The connected API handle."""
        assert self.api is not None
        return self.api

    @property
    def work(self) -> Path:
        """The VM's work directory."""
        return self.machine.workdir

    async def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        """A guest write, remembered as changed since the last backup's instant."""
        self.changed[disk] |= clusters_of(offset, length)
        await self.machine.write(disk, pattern, offset, length)

    def write_soon(self, round_: int) -> None:
        """Start a guest write to vda now, without waiting (for the ``begin`` event)."""
        offset, length = 20 * MiB + self.index * 128 * KiB, 4 * KiB * (self.index + 1)
        pattern = 0x70 + 8 * round_ + self.index
        self.pending.append(asyncio.ensure_future(self.write("vda", pattern, offset, length)))

    async def settle(self) -> None:
        """Wait for the writes started during a backup."""
        await asyncio.gather(*self.pending)
        self.pending.clear()

    def take_changes(self) -> dict[str, set[int]]:
        """The clusters changed since the last instant; the next period starts empty."""
        taken, self.changed = self.changed, {d: set() for d in DISKS}
        return taken

    async def references(self, tag: str) -> dict[str, Path]:
        """Each disk's content now, as raw files."""
        return {d: await self.machine.reference(d, self.work / f"ref-{tag}-{d}.raw") for d in DISKS}

    def virtual_size(self, disk: str) -> int:
        """The size this VM's disk was made with."""
        return (32 + 4 * self.index) * MiB if disk == "vda" else (16 + 2 * self.index) * MiB


def make_guest(tmp_path: Path, root: Path, index: int) -> Guest:
    """VM ``vm<index>`` (not started) with its own work and state folders."""
    work = tmp_path / f"vm{index}"
    return Guest(
        index=index,
        machine=ThrowawayVM(work, make_images(work, index), name=f"vm{index}"),
        state_dir=tmp_path / f"state{index}",
        repo=Repository(root, f"vm{index}"),
    )


@dataclass
class Outcome:
    """One repository backup of one VM, with what it must hold."""

    guest: Guest
    mode: Mode
    done: RepositoryBackup
    refs: dict[str, Path]
    expected: dict[str, set[int]]
    events: list[BackupEvent]

    @property
    def record(self) -> BackupRecord:
        """The committed record."""
        return self.done.record

    @property
    def written(self) -> dict[str, int]:
        """Bytes written per disk, as the ``disk-done`` events say."""
        return {e.disk or "": e.done for e in self.events if e.kind == "disk-done"}


async def leftovers(machine: ThrowawayVM) -> list[str]:
    """Every ``qmpbackup-`` node or bitmap, and every job and export QEMU still has."""
    nodes = await machine.session.execute("query-named-block-nodes", {"flat": True})
    found = [n["node-name"] for n in nodes if n["node-name"].startswith("qmpbackup-")]
    found += [
        b["name"]
        for n in nodes
        for b in n.get("dirty-bitmaps", [])
        if b["name"].startswith("qmpbackup-")
    ]
    found += [f"job {j['id']}" for j in await machine.session.execute("query-jobs")]
    found += [f"export {e['id']}" for e in await machine.session.execute("query-block-exports")]
    return found


async def bitmaps(machine: ThrowawayVM) -> dict[str, list[str]]:
    """Bitmap names on each disk's top node."""
    nodes = await machine.session.execute("query-named-block-nodes", {"flat": True})
    by_node: dict[str, Any] = {n["node-name"]: n for n in nodes}
    return {
        d: sorted(b["name"] for b in by_node[f"{d}-fmt"].get("dirty-bitmaps", [])) for d in DISKS
    }


async def assert_clean(guests: list[Guest]) -> None:
    """No QEMU holds anything of a backup; no scratch file is left."""
    for guest in guests:
        assert await leftovers(guest.machine) == [], guest.machine.name
        scratch = guest.state_dir / "scratch"
        assert not scratch.exists() or not list(scratch.iterdir())


async def repository_backup(guest: Guest, root: Path, level: Level, mode: Mode) -> Outcome:
    """Back up ``guest`` into ``root``; its vda is written to at the ``begin`` event."""
    round_ = len(guest.repo.backups())
    refs = await guest.references(f"r{round_}")
    expected = guest.take_changes()
    events: list[BackupEvent] = []

    def on_event(event: BackupEvent) -> None:
        events.append(event)
        if event.kind == "begin":
            guest.write_soon(round_)

    done = await backup_to_repository(guest.vm, root, level=level, mode=mode, on_event=on_event)
    await guest.settle()
    return Outcome(guest, mode, done, refs, expected, events)


def check_outcome(outcome: Outcome, level: str) -> None:
    """The record, the images' clusters and the events are this VM's and only its."""
    guest, record, events = outcome.guest, outcome.record, outcome.events
    assert record.complete and record.mode == outcome.mode
    assert record.checkpoint == f"backup-{record.id}"
    assert {d.name: d.level for d in record.disks} == {d: level for d in DISKS}
    assert {d.name: d.virtual_size for d in record.disks} == {
        d: guest.virtual_size(d) for d in DISKS
    }
    assert [d.source for d in record.disks] == [str(d.path) for d in guest.machine.disks]
    if level == "inc":
        for disk in DISKS:
            image = guest.repo.image_path(record, disk)
            assert allocated_clusters(image) == outcome.expected[disk], (guest.index, disk)

    kinds = [e.kind for e in events if e.kind != "progress"]
    assert kinds == ["level", "level", "begin", "disk-done", "disk-done", "committed"]
    assert {(e.disk, e.level) for e in events if e.kind == "level"} == {(d, level) for d in DISKS}
    begin = next(e for e in events if e.kind == "begin")
    assert begin.backup == record.id and begin.message == f"checkpoint {record.checkpoint}"
    assert {e.backup for e in events if e.kind in ("disk-done", "committed")} == {record.id}
    written = outcome.written
    if level == "inc":
        # Byte counts are this VM's own: its writes differ in size from every other's.
        assert written == {d: len(outcome.expected[d]) * CLUSTER for d in DISKS}, guest.index
    elif outcome.mode == "push":
        # vda, over its base, is copied whole; vdb, a qcow2 without backing file, is
        # copied as what it holds (``sync: top``), all its data.
        assert written["vda"] == guest.virtual_size("vda"), guest.index
        assert written["vdb"] == (guest.index + 1) * 256 * KiB, guest.index
    else:
        # A pull copies what the export does not report as zeroes: all of vdb's data,
        # and at least vda's base data (QEMU reports vda's unallocated top as data).
        assert written["vdb"] == (guest.index + 1) * 256 * KiB, guest.index
        assert (guest.index + 1) * MiB <= written["vda"] <= guest.virtual_size("vda")
    progress = [e for e in events if e.kind == "progress"]
    assert progress and progress[-1].done == progress[-1].total == sum(written.values())


def check_restore(outcome: Outcome, others: list[Outcome]) -> None:
    """Each disk of the backup restores to its VM's reference, and differs from the
    references of the ``others`` taken at the same round."""
    guest = outcome.guest
    for disk in DISKS:
        out = guest.work / f"restored-{outcome.record.id}-{disk}.qcow2"
        result = restore(guest.repo, disk, out, outcome.record.id)
        assert result.virtual_size == guest.virtual_size(disk)
        assert qemu_img_info(out).get("backing-filename") is None
        assert images_equal(out, outcome.refs[disk]), (guest.index, disk)
        for other in others:
            assert not images_equal(out, other.refs[disk]), (guest.index, other.guest.index)


async def libvirt_flow(
    guest: Guest, since: str, bases: dict[str, Path]
) -> tuple[dict[str, Path], set[str]]:
    """backup_begin (incremental from ``since``, new checkpoint), copy or wait, backup_end;
    the images made and the NBD addresses read.

    Push writes to targets; pull serves on TCP (a free port picked at begin) and the
    exports are copied with the built-in client. Each image is an incremental over
    ``bases`` (the restored previous backup)."""
    api, index = guest.vm, guest.index
    mode: Mode = "push" if index % 2 == 0 else "pull"
    targets = {d: guest.work / f"libvirt-{d}.qcow2" for d in DISKS}
    spec = BackupSpec(
        mode=mode,
        incremental=since,
        server=ServerSpec(transport="tcp", name="localhost") if mode == "pull" else None,
        disks=tuple(
            DiskBackupSpec(
                name=d,
                target=str(t) if mode == "push" else None,
                format="qcow2" if mode == "push" else None,
            )
            for d, t in targets.items()
        ),
    )
    name = f"lv-vm{index}"
    begun = await api.backup_begin(spec, CheckpointSpec(name=name, description=f"vm{index}"))
    assert begun.checkpoint is not None and begun.checkpoint.name == name
    assert begun.checkpoint.parent == since and begun.record.checkpoint == name
    assert [d.disk for d in begun.record.disks] == list(DISKS)
    # The guest writes while the backup runs: none of it may reach the copy.
    await guest.write("vda", 0xA0 + index, 24 * MiB, 64 * KiB)
    if mode == "push":
        states = await api.wait_backup(begun.record.id)
        assert {s.status for s in states.values()} == {"concluded"}
        assert not any(s.error for s in states.values())
    else:
        for job in begun.record.disks:
            assert job.uri is not None and job.uri.startswith("nbd://localhost:")
            assert job.uri.endswith(f"/{job.disk}")
            await asyncio.to_thread(
                pull_copy,
                job.uri,
                targets[job.disk],
                fmt="qcow2",
                backing=bases[job.disk],
                bitmap=job.export_bitmap,
            )
    info = await api.job_info(begun.record.id)
    assert info.mode == mode and {d.disk for d in info.disks} == set(DISKS)
    ended = await api.backup_end(begun.record.id)
    assert (ended.outcome, ended.errors, ended.dropped_checkpoint) == ("completed", {}, None)
    if mode == "push":
        for disk, target in targets.items():
            rebase(target, bases[disk])
    return targets, {j.uri.rsplit("/", 1)[0] for j in begun.record.disks if j.uri}


async def test_four_vms_back_up_at_once_without_cross_talk(tmp_path: Path) -> None:
    """Full (push and pull mixed), auto incremental and a libvirt-style round on four
    VMs at once, guest writes during each; everything restores to its own VM's data."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README's setup")
    root = tmp_path / "repo"
    guests = [make_guest(tmp_path, root, i) for i in range(COUNT)]
    async with contextlib.AsyncExitStack() as stack:
        for guest in guests:
            stack.push_async_callback(guest.machine.stop)
        await all_of(g.machine.start() for g in guests)
        apis = await all_of(VM.connect(str(g.machine.qmp_path), g.state_dir) for g in guests)
        for guest, api in zip(guests, apis, strict=True):
            stack.push_async_callback(api.close)
            guest.api = api
            # One QMP session each, keyed by the VM's name: its own repository folder.
            assert (api.name, api.key) == (guest.machine.name, guest.machine.name)
            assert api.session is not guest.machine.session

        # Round 1: full backups, even VMs push, odd VMs pull.
        fulls = await all_of(
            repository_backup(g, root, "full", "push" if g.index % 2 == 0 else "pull")
            for g in guests
        )
        for outcome in fulls:
            check_outcome(outcome, "full")
        # Backup ids are per VM (all likely equal here): byte counts tell the VMs apart.
        assert len({tuple(sorted(o.written.items())) for o in fulls}) == COUNT
        await assert_clean(guests)

        # Each VM writes its own pattern at its own offsets and lengths.
        for g in guests:
            await g.write("vda", 0x50 + g.index, (4 + g.index) * MiB, (g.index + 1) * 64 * KiB)
            await g.write("vdb", 0x60 + g.index, (8 + g.index) * MiB, (4 - g.index) * 64 * KiB)

        # Round 2: auto, which must chain incrementals; the modes swap.
        incs = await all_of(
            repository_backup(g, root, "auto", "pull" if g.index % 2 == 0 else "push")
            for g in guests
        )
        for outcome in incs:
            check_outcome(outcome, "inc")
        # The per-VM byte counts checked above tell every VM apart.
        assert len({tuple(sorted(o.written.items())) for o in incs}) == COUNT
        await assert_clean(guests)

        assert sorted(p.name for p in root.iterdir()) == [f"vm{i}" for i in range(COUNT)]
        for g, full, inc in zip(guests, fulls, incs, strict=True):
            assert g.repo.backups() == [full.record, inc.record]
            assert inc.record.parent == full.record.id
        await all_of(
            asyncio.to_thread(check_restore, o, [x for x in round_ if x is not o])
            for round_ in (fulls, incs)
            for o in round_
        )

        # Round 3: the libvirt-style flow, from each VM's newest repository checkpoint.
        for g in guests:
            await g.write("vda", 0x90 + g.index, (6 + g.index) * MiB, (g.index + 2) * 64 * KiB)
            await g.write("vdb", 0x98 + g.index, (12 - g.index) * MiB, 64 * KiB)
        refs = [await g.references("libvirt") for g in guests]
        expected = [g.take_changes() for g in guests]
        bases = [
            {d: g.work / f"restored-{inc.record.id}-{d}.qcow2" for d in DISKS}
            for g, inc in zip(guests, incs, strict=True)
        ]
        flows = await all_of(
            libvirt_flow(g, f"backup-{inc.record.id}", base)
            for g, inc, base in zip(guests, incs, bases, strict=True)
        )
        await assert_clean(guests)
        # Each pull VM served on a port of its own.
        served = [addresses for _, addresses in flows if addresses]
        assert len(served) == COUNT // 2 and all(len(a) == 1 for a in served)
        assert len(set.union(*served)) == COUNT // 2
        for i in range(COUNT):
            for disk in DISKS:
                image = flows[i][0][disk]
                assert allocated_clusters(image) == expected[i][disk], (i, disk)
                assert images_equal(image, refs[i][disk]), (i, disk)
                for j in range(COUNT):
                    if j != i:
                        assert not images_equal(image, refs[j][disk]), (i, j, disk)

        # Each VM knows its own checkpoints only, and QEMU holds exactly their bitmaps.
        for g, full, inc in zip(guests, fulls, incs, strict=True):
            names = [f"backup-{full.record.id}", f"backup-{inc.record.id}", f"lv-vm{g.index}"]
            checkpoints = g.vm.checkpoints()
            assert [c.name for c in checkpoints] == names
            assert [c.parent for c in checkpoints] == [None, *names[:2]]
            assert [c.description for c in checkpoints] == [
                f"qmpbackup {full.record.id}",
                f"qmpbackup {inc.record.id}",
                f"vm{g.index}",
            ]
            assert checkpoints[0].creation_time == full.record.checkpoint_time
            assert checkpoints[1].creation_time == inc.record.checkpoint_time
            assert await bitmaps(g.machine) == {d: sorted(names) for d in DISKS}
    for g in guests:
        assert g.machine.process is None, g.machine.name
