"""Every disk of a VM in the one-shot ``backup``, against a real QEMU: a qcow2 disk
attached with the legacy ``-drive``, a qcow2 under a throttle filter, a raw disk and a
pflash NVRAM (with the firmware's code as pflash0, which is left out)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpbackup.api import VM
from qmpbackup.cli.progress import describe
from qmpbackup.demo.throwaway import Attach, DiskImage, ThrowawayVM, firmware_code, qemu_img
from qmpbackup.repo.backup import backup_to_repository
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.repository import Repository

from .conftest import block_state
from .support import Cli, allocated_clusters, clusters_of
from .test_repository_backup import restored_equals

pytestmark = pytest.mark.qemu

MiB = 1 << 20
KiB = 1 << 10
NVRAM_SIZE = 540672  # OVMF_VARS.fd's size: 132 pages of 4 KiB, not a whole cluster
DISKS = ("vda", "vdb", "vdc", "pflash1")
RAW = ("vdc", "pflash1")
VOLATILE = "; raw disk: a non-persistent bitmap, valid while this QEMU runs"


def every_disk(workdir: Path, flash: Attach = "pflash") -> list[DiskImage]:
    """vda (qcow2, -drive), vdb (qcow2, throttled), vdc (raw), pflash0 (the firmware's
    code, read-only) and pflash1 (a raw NVRAM)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, fmt, size in (
        ("a.qcow2", "qcow2", "32M"),
        ("b.qcow2", "qcow2", "32M"),
        ("c.raw", "raw", "16M"),
        ("VARS.fd", "raw", str(NVRAM_SIZE)),
    ):
        qemu_img("create", "-q", "-f", fmt, str(workdir / name), size)  # fmt: skip
    return [
        DiskImage(name="vda", path=workdir / "a.qcow2", attach="drive"),
        DiskImage(name="vdb", path=workdir / "b.qcow2", attach="throttle"),
        DiskImage(name="vdc", path=workdir / "c.raw", fmt="raw"),
        DiskImage(name="pflash0", path=firmware_code(workdir / "CODE.fd"), fmt="raw",
                  attach=flash, read_only=True),
        DiskImage(name="pflash1", path=workdir / "VARS.fd", fmt="raw", attach=flash),
    ]  # fmt: skip


@pytest.fixture
async def evm(tmp_path: Path) -> AsyncIterator[ThrowawayVM]:
    machine = ThrowawayVM(tmp_path / "vm", every_disk(tmp_path / "vm"), name="testvm")
    await machine.start()
    try:
        yield machine
    finally:
        await machine.stop()


async def write_all(vm: ThrowawayVM, pattern: int, offset: int) -> None:
    """A 4 KiB guest write on every disk at ``offset`` (NVRAM: within its size)."""
    for disk in DISKS:
        at = offset % (NVRAM_SIZE - 4 * KiB) if disk == "pflash1" else offset
        await vm.write(disk, pattern, at, 4 * KiB)


async def references(vm: ThrowawayVM, where: Path, tag: str) -> dict[str, Path]:
    return {d: await vm.reference(d, where / f"ref-{d}-{tag}.raw") for d in DISKS}


@pytest.mark.parametrize("mode", ["pull", "push"])
async def test_every_disk_twice_at_its_instant(evm: ThrowawayVM, tmp_path: Path, mode: str) -> None:
    """Two auto backups with guest writes between them and right after each instant:
    every disk, the NVRAM included, restores to its instant; the raw disks' second
    backup is an incremental from their non-persistent bitmap."""
    repo = Repository(tmp_path / "repo", "testvm")
    refs: dict[str, dict[str, Path]] = {}
    lines: list[list[str]] = []
    async with await VM.connect(str(evm.qmp_path), tmp_path / "state") as api:
        for run in range(2):
            await write_all(evm, 0x20 + run, (run + 1) * MiB)
            instant = await references(evm, tmp_path, str(run))
            during: list[asyncio.Future[None]] = []
            seen: list[str] = []

            def on_event(
                event: BackupEvent,
                run: int = run,
                seen: list[str] = seen,
                during: list[asyncio.Future[None]] = during,
            ) -> None:
                if (line := describe(event)) is not None and event.kind != "progress":
                    seen.append(line)
                if event.kind == "begin":
                    during.append(asyncio.ensure_future(write_all(evm, 0x70 + run, 8 * MiB)))

            done = await backup_to_repository(
                api,
                repo.root,
                level="auto",
                mode=mode,  # type: ignore[arg-type]
                on_event=on_event,
            )
            await asyncio.gather(*during)
            refs[done.record.id] = instant
            lines.append(seen)
            assert {d.name for d in done.record.disks} == set(DISKS)  # not pflash0
    first, second = lines
    assert "pflash0: not backed up (read-only firmware code from the host's firmware package, " \
        "not the VM's data)" in first  # fmt: skip
    for disk in DISKS:
        assert f"{disk}: full (no earlier backup of {disk})" in first
    checkpoint = f"backup-{next(iter(refs))}"
    for disk in ("vda", "vdb"):
        assert f"{disk}: incremental (changes since {checkpoint})" in second
    for disk in RAW:
        assert f"{disk}: incremental (changes since {checkpoint}{VOLATILE})" in second
    # The raw disk's incremental holds only what was written since the first instant.
    last = repo.backups()[-1]
    assert allocated_clusters(repo.image_path(last, "vdc")) == clusters_of(
        2 * MiB, 4 * KiB
    ) | clusters_of(8 * MiB, 4 * KiB)
    for backup_id, disk_refs in refs.items():
        for disk, ref in disk_refs.items():
            out = tmp_path / f"restored-{disk}-{backup_id}.qcow2"
            assert restored_equals(repo, disk, backup_id, ref, out), (disk, backup_id)


async def test_restarted_qemu_gives_raw_disks_a_full(tmp_path: Path) -> None:
    """The NVRAM given as -blockdev nodes to -machine pflash1=: a QEMU restart loses the
    raw disks' non-persistent bitmaps (full, saying why); the qcow2 disks go on."""
    vm = ThrowawayVM(tmp_path / "vm", every_disk(tmp_path / "vm", "pflash-blockdev"), "testvm")
    cli = Cli(vm, tmp_path / "state")
    repo = Repository(tmp_path / "repo", "testvm")
    await vm.start()
    try:
        await write_all(vm, 0x31, MiB)
        await cli.ok("backup", "--repo", str(repo.root), "--mode", "push")
        first = repo.backups()[-1]
        await vm.stop()
        await vm.start()
        await write_all(vm, 0x32, 2 * MiB)
        refs = await references(vm, tmp_path, "after")
        run = await cli.ok("backup", "--repo", str(repo.root), "--mode", "pull")
        for disk in ("vda", "vdb"):
            assert f"{disk}: incremental (changes since {first.checkpoint})" in run.out
        for disk in RAW:
            assert (
                f"{disk}: full (raw disk: its bitmap of checkpoint {first.checkpoint} was not "
                "persistent and is gone (QEMU restarted since))"
            ) in run.out
        second = repo.backups()[-1]
        assert {d.name: d.level for d in second.disks} == {
            "vda": "inc", "vdb": "inc", "vdc": "full", "pflash1": "full",
        }  # fmt: skip
        for disk, ref in refs.items():
            assert restored_equals(repo, disk, second.id, ref, tmp_path / f"r-{disk}.qcow2")
        xml = await cli.ok("checkpoint-dumpxml", str(second.checkpoint))
        assert f"<disk name='vdc' checkpoint='bitmap' bitmap='{second.checkpoint}' " \
            "persistent='no'/>" in xml.out  # fmt: skip
    finally:
        await vm.stop()


async def test_backup_begin_refuses_a_checkpoint_on_a_raw_disk(
    evm: ThrowawayVM, tmp_path: Path
) -> None:
    """As libvirt: a checkpoint needing a persistent bitmap on a raw disk is refused, naming
    the disk and how to leave it out; QEMU is unchanged. Left out, the backup begins."""
    cli = Cli(evm, tmp_path / "state")
    spec = tmp_path / "backup.xml"
    spec.write_text(
        "<domainbackup mode='push'><disks><disk name='vdb' backup='no'/>"
        "<disk name='pflash1' backup='no'/>"
        f"<disk name='vda' type='file'><target file='{tmp_path}/a.qcow2'/></disk>"
        f"<disk name='vdc' type='file'><target file='{tmp_path}/c.qcow2'/></disk>"
        "</disks></domainbackup>"
    )
    check = tmp_path / "check.xml"
    check.write_text("<domaincheckpoint><name>c1</name></domaincheckpoint>")
    before = await block_state(evm)
    refused = await cli("backup-begin", str(spec), str(check))
    assert refused.rc == 1
    assert refused.err == (
        "error: disk 'vdc': checkpoints need a qcow2 top layer, not raw (persistent bitmaps "
        "live in qcow2 files); leave it out of the checkpoint with checkpoint='no' for that "
        "disk\n"
    )
    assert await block_state(evm) == before
    assert not (tmp_path / "a.qcow2").exists()
    listed = await cli.ok("checkpoint-list", "--name")
    assert listed.out == ""
    check.write_text(
        "<domaincheckpoint><name>c1</name><disks><disk name='vda'/>"
        "<disk name='vdc' checkpoint='no'/></disks></domaincheckpoint>"
    )
    begun = await cli.ok("backup-begin", str(spec), str(check))
    assert "Backup id 1 created" in begun.out
    await cli.finish(1)
