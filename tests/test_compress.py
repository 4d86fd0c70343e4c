"""``backup --compress`` on a real QEMU: full + 2 incrementals, push and pull, into
qcow2 images with zstd compressed clusters that stock ``qemu-img`` checks, reads as
zstd and compares equal to the guest's disk at each instant; restore, verify and
prune on the compressed chain, read by this process (no ``qemu-nbd``); a flipped byte
of a compressed cluster found by verify; a change of compression mid-chain starts a
new full (auto) or is refused (inc)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.errors import PlanError
from qmpbackup.images.qemu_img import qemu_img
from qmpbackup.repo.backup import backup_to_repository
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.prune import prune
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore
from qmpbackup.repo.verify import verify

from .support import Cli

MiB = 1 << 20
COMPRESSED = 1 << 62


def info(image: Path) -> dict[str, object]:
    found: dict[str, object] = json.loads(
        qemu_img("info", "--output=json", "-U", str(image)).stdout
    )
    return found


def compressed_offsets(image: Path) -> list[int]:
    """Host offsets of the compressed clusters ``image`` holds (its L2 entries)."""
    raw = image.read_bytes()
    cluster_bits, _, _, l1_size, l1_offset = struct.unpack_from(">IQIIQ", raw, 20)
    mask = (1 << (62 - (cluster_bits - 8))) - 1
    found = []
    for (l1,) in struct.iter_unpack(">Q", raw[l1_offset : l1_offset + 8 * l1_size]):
        l2 = l1 & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        for (entry,) in struct.iter_unpack(">Q", raw[l2 : l2 + (1 << cluster_bits)]):
            if entry & COMPRESSED:
                found.append(entry & mask)
    return found


async def compressed_chain(
    vm: ThrowawayVM, api: VM, root: Path, mode: str, tmp_path: Path
) -> dict[str, Path]:
    """Full + 2 incrementals with --compress; each backup's reference of vda, the guest
    writing on after each (what the next backup holds, this one must not)."""
    references: dict[str, Path] = {}
    await vm.write("vda", 0x2A, "1M", "3M")  # data for the full to compress
    for step in range(3):
        done = await backup_to_repository(
            api,
            root,
            mode=mode,  # type: ignore[arg-type]
            disks=["vda"],
            compress=True,
        )
        assert done.decisions[0].level == ("full" if step == 0 else "inc")
        assert done.record.compression == "zstd"
        references[done.record.id] = await vm.reference("vda", tmp_path / f"ref-{step}.raw")
        await vm.write("vda", 0x30 + step, f"{step * 3}M", "2M")
    return references


def through_qemu_nbd(entries: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(e.get("image")) for e in entries if e["event"] == "qemu-nbd.serve"]


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_a_compressed_chain_opens_with_stock_tools_and_restores(
    vm: ThrowawayVM, tmp_path: Path, mode: str, debug_logs: list[MutableMapping[str, Any]]
) -> None:
    root = tmp_path / "repo"
    repo = Repository(root, "testvm")
    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        references = await compressed_chain(vm, api, root, mode, tmp_path)
    for backup_id, reference in references.items():
        image = repo.image_path(repo.get(backup_id), "vda")
        qemu_img("check", "-U", str(image))
        specific = info(image)["format-specific"]
        assert isinstance(specific, dict) and specific["data"]["compression-type"] == "zstd"
        qemu_img("compare", "-U", "-F", "raw", str(image), str(reference))
        out = restore(repo, "vda", tmp_path / f"{backup_id}.qcow2", backup_id).out
        qemu_img("compare", "-F", "raw", str(out), str(reference))
    for backup_id in references:
        image = repo.image_path(repo.get(backup_id), "vda")
        assert compressed_offsets(image), f"{image.name} holds no compressed cluster"
    report = verify(repo)
    assert report.ok, report.problems
    prune(repo, keep=1)
    newest, reference = list(references.items())[-1]
    flattened = repo.image_path(repo.get(newest), "vda")
    assert compressed_offsets(flattened), "the flattened image is no longer compressed"
    qemu_img("check", "-U", str(flattened))
    out = restore(repo, "vda", tmp_path / "pruned.qcow2", newest).out
    qemu_img("compare", "-F", "raw", str(out), str(reference))
    assert verify(repo).ok
    # Sealing, restoring, verifying and pruning read the compressed images themselves.
    assert through_qemu_nbd(debug_logs) == []
    assert not [e for e in debug_logs if e["event"] == "restore.through-qemu-img"]


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_verify_names_a_compressed_image_with_a_flipped_byte(
    vm: ThrowawayVM, tmp_path: Path, mode: str
) -> None:
    root = tmp_path / "repo"
    repo = Repository(root, "testvm")
    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        ids = list(await compressed_chain(vm, api, root, mode, tmp_path))
    image = repo.image_path(repo.get(ids[1]), "vda")
    offset = compressed_offsets(image)[0] + 20
    with open(image, "r+b") as handle:
        byte = os.pread(handle.fileno(), 1, offset)
        os.pwrite(handle.fileno(), bytes([byte[0] ^ 0xFF]), offset)
    report = verify(repo)
    assert not report.ok
    errors = [p for p in report.problems if p.severity == "error"]
    said = [str(p) for p in errors]
    assert any(p.path == image and "changed since the backup" in p.message for p in errors), said
    # The next incremental reads through the damaged layer: it says it cannot.
    assert all(p.path == image or "cannot read through the chain" in p.message for p in errors)


async def test_a_change_of_compression_starts_a_new_full(vm: ThrowawayVM, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    events: list[BackupEvent] = []

    def on_event(event: BackupEvent) -> None:
        events.append(event)

    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        first = await backup_to_repository(api, root, disks=["vda"], on_event=on_event)
        assert first.record.compression is None
        with pytest.raises(PlanError) as refused:
            await backup_to_repository(api, root, level="inc", disks=["vda"], compress=True)
        message = str(refused.value)
        assert "\n" not in message and "uncompressed" in message and "zstd" in message
        assert len(Repository(root, "testvm").backups()) == 1
        events.clear()
        second = await backup_to_repository(
            api, root, disks=["vda"], compress=True, on_event=on_event
        )
        assert second.decisions[0].level == "full"
        assert "a new compression starts a full" in second.decisions[0].reason
        said = [e.message for e in events if e.kind == "compression"]
        assert said == ["images compressed with zstd"]
        third = await backup_to_repository(api, root, disks=["vda"], compress=True)
        assert third.decisions[0].level == "inc" and third.record.compression == "zstd"
        fourth = await backup_to_repository(api, root, disks=["vda"])
        assert fourth.decisions[0].level == "full" and fourth.record.compression is None


async def test_the_cli_says_the_compression(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    done = await cli("backup", "--repo", str(root), "--compress", "--no-progress")
    assert done.rc == 0, done.err
    assert "images compressed with zstd" in done.out, done.out
    refused = await cli("backup", "--repo", str(root), "--level", "inc")
    lines = refused.err.strip().splitlines()
    assert refused.rc in (1, 2) and len(lines) == 1, refused.err
    assert "a new compression starts a full" in lines[0], lines
    pull = await cli("backup", "--repo", str(root), "--compress", "--mode", "pull", "--no-progress")
    assert pull.rc == 0, pull.err
    assert "images compressed with zstd" in pull.out, pull.out
