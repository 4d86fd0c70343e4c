"""Format 2 digests against a real QEMU: taken while copying (pull) or in one read
(push), equal to digests computed independently from the instant's raw content, and
``verify`` naming the file with a flipped byte in its data or its qcow2 metadata."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import blake3
import pytest

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import (
    DiskImage,
    ThrowawayVM,
    images_equal,
    make_slides_images,
    qemu_img,
    qemu_io,
)
from qmpbackup.images.qcow2_reader import read_map
from qmpbackup.repo.backup import backup_to_repository
from qmpbackup.repo.digests import Digests
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.records import BackupRecord
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore
from qmpbackup.repo.verify import verify

from .repo_builder import flip_byte, flip_data_byte
from .support import Cli, CliResult

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB


def raw_digests(raw: Path) -> dict[int, bytes]:
    """BLAKE3 of every 64 KiB block of ``raw`` that is not all zeroes, by index."""
    data = raw.read_bytes()
    found = {}
    for index in range(0, -(-len(data) // BLOCK)):
        block = data[index * BLOCK : (index + 1) * BLOCK]
        if block.count(0) != len(block):
            found[index] = blake3.blake3(block).digest()
    return found


async def backup_at(
    api: VM, vm: ThrowawayVM, repo: Path, mode: str, level: str, after: int
) -> BackupRecord:
    """A one-shot backup; the guest writes ``after`` over vda once it has begun."""
    during: list[asyncio.Future[None]] = []

    def write_during(event: BackupEvent) -> None:
        if event.kind == "begin":
            during.append(asyncio.ensure_future(vm.write("vda", after, 5 * MiB, 192 * KiB)))

    done = await backup_to_repository(
        api,
        repo,
        level=level,
        mode=mode,
        on_event=write_during,  # type: ignore[arg-type]
    )
    await asyncio.gather(*during)
    return done.record


@pytest.mark.parametrize("mode", ["pull", "push"])
async def test_recorded_digests_equal_the_instants_raw_content(
    vm: ThrowawayVM, tmp_path: Path, mode: str
) -> None:
    """Full then incremental: each record's digests are those of the raw content at its
    instant, computed here from ``qemu-img convert`` output; the write made after each
    instant is in neither."""
    repo = Repository(tmp_path / "repo", "testvm")
    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        for run, level in enumerate(["full", "inc"]):
            await vm.write("vda", 0x31 + run, (run + 1) * MiB + 4 * KiB, 200 * KiB)
            await vm.guest_io("vda", f"write -z {(run + 2) * MiB} {BLOCK}")
            ref = await vm.reference("vda", tmp_path / f"ref{run}.raw")
            record = await backup_at(api, vm, repo.root, mode, level, 0x71 + run)
            assert record.format == 2 and record.disk("vda").level == level  # type: ignore[union-attr]
            recorded = Digests.load(repo.digests_path(record, "vda"))
            assert (recorded.block_size, recorded.algorithm) == (BLOCK, "blake3")
            assert dict(recorded.items()) == raw_digests(ref), (mode, level)
            now = await vm.reference("vda", tmp_path / f"now{run}.raw")
            assert raw_digests(now) != raw_digests(ref)  # the later write is not in it
    assert verify(repo).problems == []


def l2_entry_offset(image: Path) -> int:
    """The file offset of the first non-empty L2 entry of a qcow2 ``image``."""
    with image.open("rb") as handle:
        header = handle.read(48)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        handle.seek(l1_offset)
        l2 = struct.unpack(">Q", handle.read(8))[0] & 0x00FFFFFFFFFFFE00
        handle.seek(l2)
        table = handle.read(BLOCK)
    index = next(i for i in range(0, BLOCK, 8) if any(table[i : i + 8]))
    return l2 + index


@pytest.mark.parametrize("where", ["pull data", "push data", "qcow2 metadata"])
async def test_verify_names_the_file_with_a_flipped_byte(
    vm: ThrowawayVM, tmp_path: Path, where: str
) -> None:
    """A push full, then a pull incremental: one byte flipped in one of them is found by
    ``verify``, which names that file and no other."""
    repo = Repository(tmp_path / "repo", "testvm")
    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        await vm.write("vda", 0x41, MiB, 256 * KiB)
        full = await backup_at(api, vm, repo.root, "push", "full", 0x61)
        await vm.write("vda", 0x42, 3 * MiB, 128 * KiB)
        inc = await backup_at(api, vm, repo.root, "pull", "inc", 0x62)
    assert verify(repo).problems == []
    damaged = repo.image_path(inc if where == "pull data" else full, "vda")
    if where == "qcow2 metadata":
        # The low byte of an L2 entry's host offset: the cluster now points elsewhere.
        flip_byte(damaged, l2_entry_offset(damaged) + 6)
    else:
        flip_data_byte(damaged, (3 if where == "pull data" else 1) * MiB + 100)
    report = verify(repo)
    assert not report.ok
    named = {p.path for p in report.problems if p.severity == "error"}
    assert damaged in named, report.problems
    others = {repo.image_path(r, d.name) for r in (full, inc) for d in r.disks} - {damaged}
    assert not named & others, report.problems
    assert any("changed since the backup" in p.message for p in report.problems)


async def test_a_sparse_disk_costs_its_data(tmp_path: Path) -> None:
    """A 64 GiB qcow2 without backing file holding 3 clusters: its push full holds those
    clusters and no table of zero clusters (``sync: top``: QEMU's ``full`` writes a zero
    cluster over every hole), its digests file three entries; a disk with a backing
    file gets zero clusters from QEMU, read as runs; both verify and restore."""
    work = tmp_path / "vm"
    work.mkdir()
    sparse = work / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(sparse), "64G")
    for k, offset in enumerate((0, 7 << 30, (64 << 30) - BLOCK)):
        qemu_io(str(sparse), f"write -P {k + 1} {offset} 64k", fmt="qcow2")
    disks = [DiskImage(name="vda", path=sparse), *make_slides_images(work)[1:]]
    repo = Repository(tmp_path / "repo", "sparse")
    async with ThrowawayVM(work, disks, name="sparse") as vm:
        ref = await vm.reference("vda", tmp_path / "ref.raw")
        async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
            record = (await backup_to_repository(api, repo.root, level="full")).record
    image = repo.image_path(record, "vda")
    found = read_map(image)
    assert len(found.data) == 3 and not found.zero and image.stat().st_size < 2 * MiB
    assert len(Digests.load(repo.digests_path(record, "vda")).indexes) == 3
    backed = read_map(repo.image_path(record, "vdb"))  # 100 MiB over an empty raw base
    assert not backed.data and sum(n for _, n in backed.zero) == 100 * MiB // BLOCK
    assert verify(repo).problems == []
    out = restore(repo, "vda", tmp_path / "out.raw", record.id, "raw").out
    assert images_equal(out, ref, fmt_a="raw")


async def test_the_one_shot_writes_push_targets_through_the_page_cache(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """``backup-begin`` writes a push full's target with O_DIRECT where the folder takes
    it; the one-shot ``backup``, which reads its target right after, does not."""

    def target_caches(run: CliResult) -> list[object]:
        return [
            c["arguments"].get("cache")
            for c in run.qmp_commands()
            if c["execute"] == "blockdev-add" and c["arguments"].get("driver") == "file"
            and "qmpbackup" not in c["arguments"].get("filename", "qmpbackup")
        ]  # fmt: skip

    target = tmp_path / "b.qcow2"
    spec = tmp_path / "b.xml"
    spec.write_text(
        "<domainbackup><disks><disk name='vda' backup='no'/>"
        f"<disk name='vdb' type='file'><target file='{target}'/><driver type='qcow2'/></disk>"
        "</disks></domainbackup>"
    )
    begun = await cli.ok("backup-begin", str(spec), verbose=True)
    assert target_caches(begun) == [{"direct": True}]
    await cli.ok("backup-end", "1")
    one_shot = await cli.ok("backup", "--repo", str(tmp_path / "repo"), "--disk", "vdb",
                            verbose=True)  # fmt: skip
    assert target_caches(one_shot) == [None]
