"""Backup repositories of real qcow2 images, built with qemu-img and qemu-io, no VM."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from qmpbackup.repo.digests import Digests
from qmpbackup.repo.digests_nbd import digest_all
from qmpbackup.repo.records import BackupRecord, DiskRequest
from qmpbackup.repo.repository import Repository
from qmpbackup.request.models import Level

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

# (pattern, offset, length); pattern None writes zeroes (qemu-io write -z).
Write = tuple[int | None, int, int]


def qemu_img(*args: str) -> str:
    """Run qemu-img; its stdout."""
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def write(image: Path, writes: Sequence[Write], fmt: str = "qcow2") -> None:
    """Apply ``writes`` to ``image`` with one qemu-io run."""
    if not writes:
        return
    argv = ["qemu-io", "-f", fmt]
    for pattern, offset, length in writes:
        op = (
            f"write -z {offset} {length}"
            if pattern is None
            else f"write -P {pattern} {offset} {length}"
        )
        argv += ["-c", op]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def reference(path: Path, *layers: Sequence[Write]) -> Path:
    """A standalone qcow2 with ``layers`` of writes applied in order: the expected content."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(SIZE))
    write(path, [w for layer in layers for w in layer])
    return path


def add_backup(
    repo: Repository, disks: Mapping[str, tuple[Level, Sequence[Write]]], hour: int
) -> BackupRecord:
    """Begin, materialize (image on its relative parent, writes, digests) and commit."""
    requests = [DiskRequest(name=n, virtual_size=SIZE, level=lv) for n, (lv, _) in disks.items()]
    entry = repo.begin_backup(
        requests, mode="push", checkpoint="backup-{id}", now=T0 + timedelta(hours=hour)
    )
    for target in entry.targets:
        backing = ["-b", target.backing, "-F", "qcow2"] if target.backing else []
        qemu_img("create", "-q", "-f", "qcow2", *backing, str(target.image), str(SIZE))
        write(target.image, disks[target.name][1])
        block = entry.record.disk(target.name).digest_block_size  # type: ignore[union-attr]
        digest_all(target.image, block_size=block, algorithm="blake3").save(target.digests)
    return repo.commit(entry)


def flip_byte(path: Path, offset: int) -> None:
    """Invert the bits of the byte at ``offset`` of ``path``."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def flip_data_byte(image: Path, guest_offset: int) -> None:
    """Flip the byte of guest offset ``guest_offset`` in the data cluster ``image`` itself
    holds for it (not its backing file)."""
    mapping = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(image)))
    entry = next(
        e
        for e in mapping
        if e["depth"] == 0 and e["data"] and e["start"] <= guest_offset < e["start"] + e["length"]
    )
    flip_byte(image, entry["offset"] + guest_offset - entry["start"])


def same_content(image: Path, expected: Path, fmt: str = "qcow2") -> bool:
    """``qemu-img compare`` of ``image`` (``fmt``) with the qcow2 ``expected``."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", fmt, "-F", "qcow2", str(image), str(expected)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def edit_digest(path: Path, block: int, digest: bytes = b"\x5a" * 32) -> None:
    """Replace the digest of ``block`` in the digests file ``path``."""
    old = Digests.load(path)
    blocks = dict(old.items())
    blocks[block] = digest
    Digests.from_map(old.block_size, old.size, old.algorithm, blocks).save(path)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (lock files aside) with a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }
