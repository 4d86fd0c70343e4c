"""Push-mode backups of the slides against a real QEMU: full, shallow, incremental, differential."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from qmpbackup.demo.throwaway import ThrowawayVM, images_equal
from qmpbackup.request import BackupSpec, DiskBackupSpec, backup_to_xml

from .conftest import block_state
from .support import Cli, allocated_clusters, clusters_of, qemu_img_info, rebase

MiB = 1024 * 1024


def push_xml(
    path: Path,
    disks: dict[str, tuple[Path, str, bool]],
    incremental: str | None = None,
    skip: Iterable[str] = (),
) -> Path:
    """A ``<domainbackup mode='push'>`` with one target (file, format, shallow) per disk,
    then ``skip``'s disks, not backed up."""
    entries = [
        DiskBackupSpec.model_validate(
            {"name": name, "target": str(target), "format": fmt, "shallow": shallow}
        )
        for name, (target, fmt, shallow) in disks.items()
    ]
    entries += [DiskBackupSpec(name=name, backup=False) for name in skip]
    spec = BackupSpec(mode="push", incremental=incremental, disks=tuple(entries))
    path.write_text(backup_to_xml(spec))
    return path


async def test_slides_push_full_is_point_in_time(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """backup_push_full.xml: vda shallow qcow2, vdb raw; guest overwrites after begin."""
    await vm.write("vda", 0x42, MiB, 64 * 1024)
    await vm.write("vda", 0x43, 20 * MiB, 2 * MiB)
    await vm.write("vdb", 0x58, 0, 4 * MiB)
    ref_a = await vm.reference("vda", tmp_path / "ref-vda.raw")
    ref_b = await vm.reference("vdb", tmp_path / "ref-vdb.raw")
    top_at_instant = allocated_clusters(vm.disks[0].path)
    b1, b2 = tmp_path / "Backup1.1.qcow2", tmp_path / "Backup2.full.raw"
    spec = push_xml(
        tmp_path / "backup_push_full.xml", {"vda": (b1, "qcow2", True), "vdb": (b2, "raw", False)}
    )

    begin = await cli.ok("backup-begin", str(spec), verbose=True)
    assert "Backup id 1 created" in begin.out
    # The guest overwrites what is being copied.
    await vm.write("vda", 0x99, 0, 24 * MiB)
    await vm.write("vdb", 0x99, 0, 8 * MiB)
    end = await cli.finish(1)
    assert "Backup id 1 completed" in end.out

    assert images_equal(b2, ref_b, "raw")
    info = qemu_img_info(b1)
    assert info["backing-filename"] == str(vm.disks[0].backing)
    assert images_equal(b1, ref_a)
    # Shallow: only clusters of the top layer were copied.
    assert allocated_clusters(b1) <= top_at_instant
    assert allocated_clusters(b1) >= clusters_of(MiB, 64 * 1024) | clusters_of(20 * MiB, 2 * MiB)

    # Both disks started in one transaction, and no blockdev-backup outside it.
    sent = begin.qmp_commands()
    transactions = [c for c in sent if c["execute"] == "transaction"]
    assert len(transactions) == 1
    actions = transactions[0]["arguments"]["actions"]
    assert sorted(a["data"]["device"] for a in actions if a["type"] == "blockdev-backup") == [
        "vda-fmt",
        "vdb-fmt",
    ]
    assert not [c for c in sent if c["execute"] == "blockdev-backup"]

    # Nothing of ours is left in QEMU.
    state = await block_state(vm)
    assert not [n for n in state["nodes"] if n[0].startswith("qmpbackup-")]
    assert "qmpbackup-" not in str(state)
    assert state["jobs"] == []


async def test_incremental_chain_and_differential(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """full+check1, inc+check2, inc+check3, diff from check1: each equals its instant."""
    refs: dict[tuple[str, int], Path] = {}
    backups: dict[tuple[str, int], Path] = {}
    written: dict[int, set[int]] = {}

    async def take(n: int, incremental: str | None, checkpoint: str | None) -> None:
        for disk in ("vda", "vdb"):
            refs[(disk, n)] = await vm.reference(disk, tmp_path / f"ref-{disk}-{n}.raw")
        targets = {
            disk: (tmp_path / f"Backup{i}.{n}.qcow2", "qcow2", False)
            for i, disk in ((1, "vda"), (2, "vdb"))
        }
        for disk, (target, _, _) in targets.items():
            backups[(disk, n)] = target
        spec = push_xml(tmp_path / f"backup_{n}.xml", targets, incremental)
        args = ["backup-begin", str(spec)] + ([checkpoint] if checkpoint else [])
        await cli.ok(*args)
        # Writes during the copy belong to the next backup, never to this one.
        await vm.write("vda", 0xE0 + n, 40 * MiB, 128 * 1024)
        await cli.finish(1)

    await vm.write("vda", 0x41, 0, 4 * MiB)
    await take(1, None, "check1")
    await vm.write("vda", 0x42, MiB, 4 * MiB)
    await vm.write("vdb", 0x59, 2 * MiB, 3 * MiB)
    written[2] = clusters_of(40 * MiB, 128 * 1024) | clusters_of(MiB, 4 * MiB)
    await take(2, "check1", "check2")
    await vm.write("vda", 0x43, 3 * MiB, 65536 * 3)
    await vm.write("vdb", 0x5A, 50 * MiB, 65536)
    written[3] = clusters_of(40 * MiB, 128 * 1024) | clusters_of(3 * MiB, 65536 * 3)
    await take(3, "check2", "check3")
    await vm.write("vda", 0x44, 10 * MiB, MiB)
    await take(4, "check1", None)

    for disk in ("vda", "vdb"):
        full, inc2, inc3, diff4 = (backups[(disk, n)] for n in (1, 2, 3, 4))
        assert images_equal(full, refs[(disk, 1)])
        rebase(inc2, full)
        assert images_equal(inc2, refs[(disk, 2)])
        rebase(inc3, inc2)
        assert images_equal(inc3, refs[(disk, 3)])
        rebase(diff4, full)
        assert images_equal(diff4, refs[(disk, 4)])

    # Each incremental holds exactly the clusters dirtied since its checkpoint.
    assert allocated_clusters(backups[("vda", 2)]) == written[2]
    assert allocated_clusters(backups[("vda", 3)]) == written[3]
    assert allocated_clusters(backups[("vdb", 2)]) == clusters_of(2 * MiB, 3 * MiB)
    assert allocated_clusters(backups[("vdb", 3)]) == clusters_of(50 * MiB, 65536)
    # The differential from check1 holds everything dirtied since check1.
    since_check1 = (
        written[2] | written[3] | clusters_of(40 * MiB, 128 * 1024) | clusters_of(10 * MiB, MiB)
    )
    assert allocated_clusters(backups[("vda", 4)]) == since_check1

    listed = await cli.ok("checkpoint-list", "--name")
    assert listed.out.split() == ["check1", "check2", "check3"]
    state = await block_state(vm)
    assert "qmpbackup-" not in str(state)
