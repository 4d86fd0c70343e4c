"""Pull scratches of the one-shot backup that grow with what the guest overwrites: a disk
far larger than the free space is pulled, and a scratch that fills its room ends the
backup while the guest's writes go on (real QEMU, on each end of the QEMU range)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img
from qmpbackup.errors import ScratchFullError
from qmpbackup.repo.backup import backup_to_repository
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.repository import Repository

from .test_pull_backup import assert_clean

MiB = 1 << 20
TiB = 1 << 40


async def test_pull_of_a_disk_far_larger_than_the_free_space(
    tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    """A 1 TiB (sparse) disk is pulled, full then incremental, with its scratch in a
    96 MiB filesystem: the scratch grows with the guest's overwrites only."""
    folder = tmp_path / "vm"
    folder.mkdir()
    huge = folder / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(huge), "1T")
    async with ThrowawayVM(folder, [DiskImage(name="vda", path=huge)], name="huge") as vm:
        for n in range(20):  # scattered data: 20 MiB over the whole TiB
            await vm.write("vda", 0x40 + n, n * (TiB // 20), MiB)
        state_dir = tmpfs("state", "96M")
        repo_root = tmp_path / "repo"
        async with await VM.connect(str(vm.qmp_path), state_dir) as api:
            full = await backup_to_repository(
                api, repo_root, level="full", mode="pull", scratch_reserve=16 * MiB
            )
            await vm.write("vda", 0x77, TiB // 2 + 5 * MiB, 3 * MiB)
            ref = await vm.reference("vda", tmp_path / "ref.raw")
            inc = await backup_to_repository(api, repo_root, mode="pull", scratch_reserve=16 * MiB)
        await assert_clean(vm, state_dir)
    assert [d.level for d in full.decisions] == ["full"]
    assert [d.level for d in inc.decisions] == ["inc"]
    repo = Repository.open(repo_root)
    chain = repo.chain(inc.record.id, "vda")
    assert len(chain) == 2
    assert images_equal(chain[-1], ref)
    # Far less than the disk's size was ever needed beside it.
    assert os.statvfs(state_dir).f_blocks * os.statvfs(state_dir).f_frsize < TiB // 10000


async def test_a_full_scratch_ends_the_backup_not_the_guests_writes(
    vm: ThrowawayVM, tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    """The scratches live in a 64 MiB filesystem with 16 MiB of reserve each; the guest
    overwrites 96 MiB during the backup. The scratch passes its room, the backup ends with
    one line (ScratchFullError), every guest write succeeds, and nothing is left: no
    backup in the repository, nothing in QEMU, no scratch or reserve."""
    await vm.write("vdb", 0x58, 0, 96 * MiB)  # so that the copy is still running
    await vm.write("vda", 0x41, 0, 60 * MiB)
    state_dir = tmpfs("state", "64M")
    guest: list[asyncio.Task[None]] = []

    async def overwrite() -> None:
        # A guest writing 4 MiB at a time, 96 MiB in all. The harness writes through the
        # monitor, which holds QEMU's main loop while it writes; a real guest's writes do
        # not, so a short pause lets QEMU answer the backup's commands in between.
        for n in range(24):
            await vm.write("vdb", 0x99, n * 4 * MiB, 4 * MiB)
            await asyncio.sleep(0.002)

    def on_event(event: BackupEvent) -> None:
        if event.kind == "begin":
            guest.append(asyncio.ensure_future(overwrite()))

    async with await VM.connect(str(vm.qmp_path), state_dir) as api:
        with pytest.raises(ScratchFullError) as raised:
            await backup_to_repository(
                api,
                tmp_path / "repo",
                level="full",
                mode="pull",
                on_event=on_event,
                scratch_reserve=16 * MiB,
            )
        # Every write of the guest succeeded (vm.write raises on a failed guest write).
        await asyncio.gather(*guest)
        assert "\n" not in str(raised.value)
        assert str(raised.value).startswith("the scratch of vdb passed the ")
        assert "the backup is abandoned, and the guest's writes went on" in str(raised.value)
        assert api.checkpoints() == []
    assert Repository.open(tmp_path / "repo").backups(complete_only=False) == []
    await assert_clean(vm, state_dir)
