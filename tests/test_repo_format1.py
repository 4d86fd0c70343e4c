"""The repository of format 1 kept in ``fixtures/repo-format1`` (made by
``scripts/make-format1-fixture`` from a real QEMU: a push full, a push incremental and a
pull incremental of a 4 MiB ``vda``) still verifies and restores to the content recorded
in its ``expected.json``. Every test works on a copy; the fixture is never changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.repo.digests import Digests
from qmpbackup.repo.digests_nbd import digest_all
from qmpbackup.repo.prune import prune
from qmpbackup.repo.records import DiskRequest, RepositoryError
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore
from qmpbackup.repo.seal import seal
from qmpbackup.repo.verify import verify

from .repo_builder import KiB, MiB, flip_data_byte, qemu_img, snapshot, write

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "repo-format1"
EXPECTED: dict[str, Any] = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
IDS: list[str] = list(EXPECTED["backups"])  # in backup order (the ids sort by time)
DISK: str = EXPECTED["disk"]

# Bytes the fixture's guest writes left at each instant: (guest offset, byte).
PROBES: dict[str, list[tuple[int, int]]] = {
    "full": [(0, 0x11), (MiB, 0x12), (3 * MiB + 64 * KiB, 0x13), (2 * MiB, 0)],
    "inc-push": [(0, 0), (64 * KiB, 0x11), (512 * KiB, 0x21), (2 * MiB, 0x22)],
    "inc-pull": [(0, 0), (MiB + 64 * KiB, 0x31), (3 * MiB + 512 * KiB, 0x32), (MiB, 0x12)],
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """A copy of the fixture's repository, opened as the VM it names; the fixture itself
    must be byte for byte the same afterwards."""
    before = snapshot(FIXTURE)
    root = tmp_path / "repo"
    shutil.copytree(FIXTURE, root)
    copy = Repository.open(root)
    assert copy.vm == EXPECTED["vm"]
    yield copy
    assert snapshot(FIXTURE) == before


def test_the_fixture_holds_a_push_full_a_push_inc_and_a_pull_inc(repo: Repository) -> None:
    records = repo.backups(complete_only=False)
    assert [r.id for r in records] == IDS == sorted(IDS)
    assert [(r.level, r.mode, r.complete) for r in records] == [
        ("full", "push", True), ("inc", "push", True), ("inc", "pull", True),
    ]  # fmt: skip
    assert [(d.name, d.virtual_size) for r in records for d in r.disks] == [
        (DISK, EXPECTED["virtual_size"])
    ] * 3
    assert [r.parent for r in records] == [None, IDS[0], IDS[1]]
    assert [(b["level"], b["mode"]) for b in EXPECTED["backups"].values()] == [
        (r.level, r.mode) for r in records
    ]


def test_verify_reports_the_whole_repository_ok(repo: Repository) -> None:
    report = verify(repo)
    assert report.ok and report.problems == []
    assert report.backup_ids == IDS
    assert report.files == 2 * len(IDS)  # an image and a digests file per backup
    assert report.blocks_read >= EXPECTED["virtual_size"] // MiB  # the full's, at least


@pytest.mark.parametrize("index", range(len(IDS)), ids=list(PROBES))
def test_restore_to_raw_gives_the_content_of_each_instant(
    repo: Repository, tmp_path: Path, index: int
) -> None:
    backup_id = IDS[index]
    out = tmp_path / f"{backup_id}.raw"
    result = restore(repo, DISK, out, backup_id, "raw")
    assert result.backup_id == backup_id and result.out == out and result.fmt == "raw"
    size = EXPECTED["virtual_size"]
    assert result.virtual_size == size and out.stat().st_size == size
    assert result.blocks_checked == size // MiB
    assert sha256_of(out) == EXPECTED["backups"][backup_id]["sha256"]
    data = out.read_bytes()
    probes = PROBES[list(PROBES)[index]]
    assert [(offset, data[offset]) for offset, _ in probes] == probes


def test_verify_names_the_full_image_with_a_flipped_data_byte(
    repo: Repository, tmp_path: Path
) -> None:
    full = repo.image_path(repo.get(IDS[0]), DISK)
    flip_data_byte(full, 100)  # guest offset 100: the full's own 0x11 data
    report = verify(repo)
    assert not report.ok
    errors = [p for p in report.problems if p.severity == "error"]
    assert errors and {p.path for p in report.problems} == {full}
    assert IDS[0] in {p.backup_id for p in errors}
    messages = " | ".join(p.message for p in errors)
    assert "changed since the backup" in messages and "block 0 " in messages
    # A restore through the damaged full is refused, and leaves nothing behind.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RepositoryError, match="block 0"):
        restore(repo, DISK, out_dir / "full.raw", IDS[0], "raw")
    assert list(out_dir.iterdir()) == []


def test_a_format2_backup_chains_onto_format1(repo: Repository, tmp_path: Path) -> None:
    """A backup made now on a format 1 parent is format 2: sealing it digests its whole
    chain once (nothing can be derived from BLAKE2b of 1 MiB), and it restores, verifies
    and prunes with its format 1 parents."""
    size = EXPECTED["virtual_size"]
    entry = repo.begin_backup([DiskRequest(name=DISK, virtual_size=size, level="inc")], mode="push")
    target = entry.target(DISK)
    assert entry.record.format == 2 and target.backing == f"{IDS[-1]}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(target.image), str(size))
    write(target.image, [(0x44, MiB + 4 * KiB, 8 * KiB)])
    sealed = seal(repo, entry, DISK, link=True, hashed=None)
    record = repo.commit(entry, file_digests={DISK: sealed.file_digest})
    recorded = Digests.load(repo.digests_path(record, DISK))
    assert recorded == digest_all(target.image, block_size=64 * KiB, algorithm="blake3")
    assert verify(repo).problems == []
    out = restore(repo, DISK, tmp_path / "now.raw", record.id, "raw").out
    assert out.read_bytes()[MiB + 4 * KiB] == 0x44 and out.read_bytes()[0] == 0
    prune(repo, 1)
    assert [r.id for r in repo.backups()] == [record.id]
    assert verify(repo).problems == []
    again = restore(repo, DISK, tmp_path / "again.raw", record.id, "raw").out
    assert again.read_bytes() == out.read_bytes()
