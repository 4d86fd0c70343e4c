"""``qmpbackup backup`` into a repository against a real QEMU: chains of auto backups,
per-disk fallback to full, restore, verify, prune and interrupts."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img, qemu_io
from qmpbackup.repo.backup import backup_to_repository
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore

from .support import Cli, allocated_clusters, clusters_of, qemu_img_info

MiB = 1 << 20
KiB = 1 << 10


def repository(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo", "testvm")


def restored_equals(repo: Repository, disk: str, backup_id: str, ref: Path, out: Path) -> bool:
    """Restore ``disk`` at ``backup_id`` to a standalone image and compare it with ``ref``."""
    result = restore(repo, disk, out, backup_id)
    assert result.out == out and qemu_img_info(out).get("backing-filename") is None
    return images_equal(out, ref)


async def test_full_then_three_auto_runs_restore_to_each_instant(
    vm: ThrowawayVM, tmp_path: Path
) -> None:
    """Guest writes between and during runs; push and pull alternate; each incremental
    holds exactly the clusters dirtied since the run before, zeroed ones included."""
    repo = repository(tmp_path)
    refs: dict[str, dict[str, Path]] = {}
    during: list[asyncio.Future[None]] = []
    expected_a: set[int] = set()
    events: list[BackupEvent] = []
    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        for run, mode in enumerate(["push", "pull", "push", "pull"]):
            await vm.write("vda", 0x20 + run, (run * 3 + 1) * MiB, 128 * KiB)
            await vm.write("vdb", 0x30 + run, (run * 5 + 1) * MiB, 64 * KiB)
            expected_a |= clusters_of((run * 3 + 1) * MiB, 128 * KiB)
            if run == 2:
                # Zeroes over the base image's data must hide it in the chain.
                await vm.guest_io("vda", "write -z 0 192k")
                expected_a |= clusters_of(0, 192 * KiB)
            ref_a = await vm.reference("vda", tmp_path / f"ref-a{run}.raw")
            ref_b = await vm.reference("vdb", tmp_path / f"ref-b{run}.raw")

            def write_during(event: BackupEvent, run: int = run) -> None:
                events.append(event)
                if event.kind == "begin":
                    during.append(asyncio.ensure_future(vm.write("vda", 0x70 + run, 40 * MiB, KiB)))

            done = await backup_to_repository(
                api,
                repo.root,
                level="full" if run == 0 else "auto",
                mode=mode,  # type: ignore[arg-type]
                on_event=write_during,
            )
            await asyncio.gather(*during)
            record = done.record
            refs[record.id] = {"vda": ref_a, "vdb": ref_b}
            assert record.complete and record.mode == mode
            levels = {d.disk: d.level for d in done.decisions}
            assert levels == ({"vda": "full", "vdb": "full"} if run == 0 else
                              {"vda": "inc", "vdb": "inc"})  # fmt: skip
            if run:
                image_a = repo.image_path(record, "vda")
                assert allocated_clusters(image_a) == expected_a, run
                image_b = repo.image_path(record, "vdb")
                assert allocated_clusters(image_b) == clusters_of((run * 5 + 1) * MiB, 64 * KiB)
                # Digests of only the one 64 KiB block that changed, not of the disk:
                # read once from a push image, taken from the copy of a pull.
                done_b = [e for e in events if e.kind == "disk-done" and e.disk == "vdb"]
                assert done_b[-1].message == (
                    "checked, digests of 1 blocks read"
                    if mode == "push"
                    else "checked, digests of 1 blocks taken while copying"
                )
            # What was written after the instant belongs to the next run.
            expected_a = clusters_of(40 * MiB, KiB)
        # Only the newest backup's checkpoint and the full's are kept.
        names = [c.name for c in api.checkpoints()]
    ids = list(refs)
    assert names == [f"backup-{ids[0]}", f"backup-{ids[-1]}"]
    for backup_id, disk_refs in refs.items():
        for disk, ref in disk_refs.items():
            out = tmp_path / f"restored-{disk}-{backup_id}.qcow2"
            assert restored_equals(repo, disk, backup_id, ref, out), (disk, backup_id)
    # The during-write of the last run is in no backup, and the disk still has it.
    assert not images_equal(refs[ids[-1]]["vda"], await vm.reference("vda", tmp_path / "now.raw"))


async def test_removed_bitmap_falls_back_to_full_for_that_disk_only(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    repo = repository(tmp_path)
    await cli.ok("backup", "--repo", str(repo.root), "--level", "full")
    first = repo.backups()[-1]
    assert first.checkpoint is not None
    await vm.session.execute(
        "block-dirty-bitmap-remove", {"node": "vdb-fmt", "name": first.checkpoint}
    )
    await vm.write("vda", 0x51, 2 * MiB, 64 * KiB)
    await vm.write("vdb", 0x52, 3 * MiB, 64 * KiB)
    ref_a = await vm.reference("vda", tmp_path / "a.raw")
    ref_b = await vm.reference("vdb", tmp_path / "b.raw")

    # An explicit incremental refuses rather than fall back, and changes nothing.
    refused = await cli("backup", "--repo", str(repo.root), "--level", "inc")
    assert refused.rc == 1 and "no inc backup of vdb" in refused.err
    assert len(repo.backups(complete_only=False)) == 1

    run = await cli.ok("backup", "--repo", str(repo.root))
    assert f"vda: incremental (changes since {first.checkpoint})" in run.out
    assert "vdb: full (" in run.out and "missing" in run.out
    second = repo.backups()[-1]
    assert {d.name: d.level for d in second.disks} == {"vda": "inc", "vdb": "full"}
    assert allocated_clusters(repo.image_path(second, "vda")) == clusters_of(2 * MiB, 64 * KiB)
    assert restored_equals(repo, "vda", second.id, ref_a, tmp_path / "ra.qcow2")
    assert restored_equals(repo, "vdb", second.id, ref_b, tmp_path / "rb.raw")


async def test_qemu_killed_mid_write_makes_that_disks_bitmap_inconsistent(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """QEMU runs vdb alone and is killed while writing; restarted with both disks, vdb's
    bitmap is inconsistent: auto takes a full of vdb and an incremental of vda."""
    repo = repository(tmp_path)
    await cli.ok("backup", "--repo", str(repo.root), "--level", "full")
    await vm.stop()
    (tmp_path / "vm-b").mkdir()
    alone = ThrowawayVM(tmp_path / "vm-b", [vm.disks[1]], name="testvm")
    await alone.start()
    try:
        await alone.write("vdb", 0x66, 5 * MiB, MiB)
    finally:
        await alone.kill()
    await vm.start()
    await vm.write("vda", 0x67, 6 * MiB, 64 * KiB)
    ref_a = await vm.reference("vda", tmp_path / "a.raw")
    ref_b = await vm.reference("vdb", tmp_path / "b.raw")
    info = await cli.ok("info")
    assert "INCONSISTENT" in info.out

    run = await cli.ok("backup", "--repo", str(repo.root))
    assert "vda: incremental" in run.out
    assert "vdb: full (" in run.out and "inconsistent" in run.out
    second = repo.backups()[-1]
    assert {d.name: d.level for d in second.disks} == {"vda": "inc", "vdb": "full"}
    assert restored_equals(repo, "vda", second.id, ref_a, tmp_path / "ra.qcow2")
    assert restored_equals(repo, "vdb", second.id, ref_b, tmp_path / "rb.qcow2")


async def test_resized_disk_and_new_disk_get_a_full(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    repo = repository(tmp_path)
    await cli.ok("backup", "--repo", str(repo.root), "--level", "full")
    await vm.session.execute("block_resize", {"node-name": "vdb-fmt", "size": 164 * MiB})
    await vm.write("vdb", 0x71, 150 * MiB, MiB)
    await vm.write("vda", 0x72, MiB, 64 * KiB)
    run = await cli.ok("backup", "--repo", str(repo.root))
    assert "vda: incremental" in run.out
    assert "vdb: full (vdb was resized from 104857600 to 171966464 bytes)" in run.out
    resized = repo.backups()[-1]
    assert resized.disk("vdb").virtual_size == 164 * MiB  # type: ignore[union-attr]
    ref_b = await vm.reference("vdb", tmp_path / "b.raw")
    assert restored_equals(repo, "vdb", resized.id, ref_b, tmp_path / "rb.qcow2")

    # A disk added since the last backup: the VM restarts with a third disk.
    await vm.stop()
    new = vm.workdir / "Data3.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(new), "32M")
    vm.disks.append(DiskImage(name="vdc", path=new))
    await vm.start()
    await vm.write("vdc", 0x73, 0, 2 * MiB)
    await vm.write("vda", 0x74, 2 * MiB, 64 * KiB)
    refs = {d: await vm.reference(d, tmp_path / f"{d}.raw") for d in ("vda", "vdb", "vdc")}
    run = await cli.ok("backup", "--repo", str(repo.root))
    assert "vda: incremental" in run.out and "vdb: incremental" in run.out
    assert "vdc: full (no earlier backup of vdc)" in run.out
    third = repo.backups()[-1]
    for disk, ref in refs.items():
        assert restored_equals(repo, disk, third.id, ref, tmp_path / f"r-{disk}.qcow2"), disk


def flip_data_byte(image: Path) -> None:
    """Flip one byte inside the first data cluster the image itself holds."""
    extents = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(image)))
    host = next(e["offset"] for e in extents if e["depth"] == 0 and e["data"] and "offset" in e)
    with open(image, "r+b") as handle:
        handle.seek(host + 100)
        byte = handle.read(1)
        handle.seek(host + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))


async def test_verify_names_the_file_with_a_flipped_byte(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    repo = repository(tmp_path)
    first = await cli.ok("backup", "--repo", str(repo.root), "--level", "full", verbose=True)
    emitted = [json.loads(line) for line in first.out.splitlines()]
    assert [e["event"] for e in emitted if e["event"] != "backup.progress"] == [
        "backup.level", "backup.level", "backup.begin",
        "backup.disk-done", "backup.disk-done", "backup.committed",
    ]  # fmt: skip
    assert emitted[-1]["backup"] == repo.backups()[0].id
    await vm.write("vda", 0x81, 3 * MiB, 64 * KiB)
    await cli.ok("backup", "--repo", str(repo.root), "--mode", "pull")
    await vm.write("vda", 0x82, 4 * MiB, 64 * KiB)
    await cli.ok("backup", "--repo", str(repo.root))
    good = await cli.ok("verify", "--repo", str(repo.root))
    assert "verified" in good.out

    middle = repo.backups()[1]
    image = repo.image_path(middle, "vda")
    flip_data_byte(image)
    bad = await cli("verify", "--repo", str(repo.root))
    assert bad.rc == 1
    assert str(image) in bad.out + bad.err
    assert str(repo.image_path(repo.backups()[0], "vda")) not in bad.out + bad.err
    # A restore through the damaged file is refused, and leaves nothing behind.
    out = tmp_path / "restored.qcow2"
    refused = await cli("restore", "--repo", str(repo.root), "--disk", "vda", "--out", str(out))
    assert refused.rc == 1 and "digest" in refused.err and not out.exists()


async def test_prune_keeps_every_remaining_point_restorable(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    repo = repository(tmp_path)
    refs: dict[str, Path] = {}
    for run in range(4):
        await vm.write("vda", 0x90 + run, (run + 1) * MiB, 64 * KiB)
        ref = await vm.reference("vda", tmp_path / f"a{run}.raw")
        await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda")
        refs[repo.backups()[-1].id] = ref
    ids = list(refs)
    newest_bytes = repo.image_path(repo.backups()[-1], "vda").read_bytes()

    pruned = await cli.ok("prune", "--repo", str(repo.root), "--keep", "2")
    assert [r.id for r in repo.backups()] == ids[2:]
    assert ids[0] in pruned.out and ids[1] in pruned.out
    base = repo.backups()[0]
    assert qemu_img_info(repo.image_path(base, "vda")).get("backing-filename") is None
    assert repo.image_path(repo.backups()[-1], "vda").read_bytes() == newest_bytes
    for backup_id in ids[2:]:
        out = tmp_path / f"r-{backup_id}.qcow2"
        assert restored_equals(repo, "vda", backup_id, refs[backup_id], out)
    assert "verified" in (await cli.ok("verify", "--repo", str(repo.root))).out
    # Checkpoints of pruned backups are gone from QEMU; the chain goes on.
    names = (await cli.ok("checkpoint-list", "--name")).out.split()
    assert f"backup-{ids[0]}" not in names and f"backup-{ids[-1]}" in names
    await vm.write("vda", 0x99, 9 * MiB, 64 * KiB)
    ref = await vm.reference("vda", tmp_path / "after.raw")
    run = await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda")
    assert "vda: incremental" in run.out
    latest = repo.backups()[-1]
    assert restored_equals(repo, "vda", latest.id, ref, tmp_path / "after.qcow2")


async def test_interrupted_backup_leaves_the_repository_as_it_was(tmp_path: Path) -> None:
    """SIGINT while a pull copy of a 1 GiB disk runs: the job is aborted, its checkpoint
    dropped, nothing new stays in the repository, and the next backup works."""
    work = tmp_path / "vm"
    work.mkdir()
    big = work / "big.qcow2"
    small = work / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "1G")
    qemu_io(str(big), "write -P 0x5a 0 1G", fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", str(small), "16M")
    disks = [DiskImage(name="vda", path=small), DiskImage(name="vdb", path=big)]
    repo = Repository(tmp_path / "repo", "slowvm")
    async with ThrowawayVM(work, disks, name="slowvm") as vm:
        cli = Cli(vm, tmp_path / "state")
        await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda")
        before = sorted(p.relative_to(repo.root) for p in repo.root.rglob("*") if p.is_file())
        records = repo.backups()
        checkpoints = (await cli.ok("checkpoint-list", "--name")).out

        argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(vm.qmp_path)]
        argv += ["--state-dir", str(cli.state_dir), "backup", "--repo", str(repo.root)]
        proc = await asyncio.create_subprocess_exec(
            *argv, "--mode", "pull", "--level", "full",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        while b"started" not in await proc.stdout.readline():
            pass
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = await proc.communicate()
        assert proc.returncode == 1, (out, err)
        assert b"interrupted" in err and b"aborted" in out

        after = sorted(p.relative_to(repo.root) for p in repo.root.rglob("*") if p.is_file())
        assert after == before
        assert repo.backups() == records
        assert (await cli.ok("checkpoint-list", "--name")).out == checkpoints
        nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
        assert not [n["node-name"] for n in nodes if n["node-name"].startswith("qmpbackup-")]
        assert await vm.session.execute("query-jobs") == []
        assert await vm.session.execute("query-block-exports") == []

        await vm.write("vda", 0x44, MiB, 64 * KiB)
        ref = await vm.reference("vda", tmp_path / "a.raw")
        run = await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda")
        assert "vda: incremental" in run.out
        assert restored_equals(repo, "vda", repo.backups()[-1].id, ref, tmp_path / "r.qcow2")
