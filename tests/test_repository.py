"""The backup repository: layout, relative chains, atomic records, ordering, names."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qmpbackup.errors import InvalidInputError
from qmpbackup.repo.digests import Digests, file_digest
from qmpbackup.repo.records import BackupEntry, BackupRecord, DiskRequest, RepositoryError
from qmpbackup.repo.repository import Repository
from qmpbackup.request.models import Level

MiB = 1 << 20
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def materialize(entry: BackupEntry) -> None:
    """Create every target image (backed by its relative parent) and its digests."""
    for target in entry.targets:
        backing = ["-b", target.backing, "-F", "qcow2"] if target.backing else []
        qemu_img("create", "-q", "-f", "qcow2", *backing, str(target.image), str(4 * MiB))
        Digests.from_map(MiB, 4 * MiB, "blake3", dict.fromkeys(range(4), bytes(32))).save(
            target.digests
        )


def backup(
    repo: Repository, levels: dict[str, Level], when: datetime = T0, commit: bool = True
) -> BackupEntry:
    disks = [DiskRequest(name=d, virtual_size=4 * MiB, level=lv) for d, lv in levels.items()]
    entry = repo.begin_backup(disks, mode="push", checkpoint="chk", now=when)
    materialize(entry)
    if commit:
        repo.commit(entry)
    return entry


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo", "vm1")


def test_layout_and_relative_backing_chain(repo: Repository, tmp_path: Path) -> None:
    full = backup(repo, {"vda": "full", "vdb": "full"})
    inc = backup(repo, {"vda": "inc", "vdb": "inc"}, T0 + timedelta(hours=1))
    diff = backup(repo, {"vda": "diff"}, T0 + timedelta(hours=2))
    assert full.id == "20260102T030405Z-1" and inc.id == "20260102T040405Z-2"
    base = tmp_path / "repo" / "vm1"
    assert full.target("vda").image == base / "vda" / f"{full.id}.qcow2"
    assert full.target("vda").digests == base / "vda" / f"{full.id}.digests"
    record = json.loads((base / "backups" / f"{inc.id}.json").read_text())
    assert record["complete"] is True and record["level"] == "inc"
    assert record["parent"] == full.id and record["checkpoint"] == "chk"
    assert record["disks"][0]["parent_file"] == f"{full.id}.qcow2"
    assert inc.target("vda").backing == f"{full.id}.qcow2"  # relative
    assert diff.record.parent == full.id and diff.target("vda").backing == f"{full.id}.qcow2"

    chain = repo.chain(inc.id, "vda")
    assert chain == [base / "vda" / f"{full.id}.qcow2", base / "vda" / f"{inc.id}.qcow2"]
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(chain[-1])))
    assert [Path(i["filename"]) for i in info] == chain[::-1]
    assert info[0]["backing-filename"] == f"{full.id}.qcow2"
    assert repo.chain(diff.id, "vda")[0] == chain[0] and len(repo.chain(diff.id, "vda")) == 2

    latest_a = repo.latest("vda")
    assert latest_a is not None and latest_a.id == diff.id and latest_a.complete
    assert latest_a.disks[0].file_digest == file_digest(base / "vda" / f"{diff.id}.qcow2")
    latest_b = repo.latest("vdb")
    assert latest_b is not None and latest_b.id == inc.id
    assert repo.latest("vdc") is None
    parent = repo.parent_for("vda", "diff")
    assert parent is not None and parent.id == full.id
    assert repo.parent_for("vda", "full") is None


def test_level_per_disk(repo: Repository) -> None:
    backup(repo, {"vda": "full"})
    mixed = backup(repo, {"vda": "inc", "vdb": "full"}, T0 + timedelta(hours=1))
    assert mixed.record.level == "inc"
    vdb = mixed.record.disk("vdb")
    assert vdb is not None and vdb.level == "full" and vdb.parent is None
    assert mixed.target("vdb").backing is None
    assert len(repo.chain(mixed.id, "vdb")) == 1
    with pytest.raises(RepositoryError, match="no complete full backup of disk vdc"):
        backup(repo, {"vdc": "diff"})


def test_incomplete_backup_is_never_listed_nor_a_parent(repo: Repository) -> None:
    full = backup(repo, {"vda": "full"})
    crashed = backup(repo, {"vda": "inc"}, T0 + timedelta(hours=1), commit=False)
    # A crash mid-way through a record write leaves a temporary file.
    temp = repo.records_dir / f".{crashed.id}.json.x1y2z3"
    temp.write_text('{"id": "half')
    assert [r.id for r in repo.backups()] == [full.id]
    assert [r.id for r in repo.backups(complete_only=False)] == [full.id, crashed.id]
    latest = repo.latest("vda")
    assert latest is not None and latest.id == full.id
    with pytest.raises(RepositoryError, match="not complete"):
        repo.chain(crashed.id, "vda")

    nxt = backup(repo, {"vda": "inc"}, T0 + timedelta(hours=2))
    assert nxt.record.parent == full.id and nxt.id.endswith("-3")

    repo.discard(crashed)
    assert not crashed.target("vda").image.exists()
    assert not crashed.target("vda").digests.exists()
    assert not repo.record_path(crashed.id).exists() and not temp.exists()
    assert [r.id for r in repo.backups(complete_only=False)] == [full.id, nxt.id]
    with pytest.raises(RepositoryError, match="refusing to discard"):
        repo.discard(nxt)


def test_commit_needs_every_file(repo: Repository) -> None:
    entry = repo.begin_backup(
        [DiskRequest(name="vda", virtual_size=MiB, level="full")], mode="pull"
    )
    with pytest.raises(RepositoryError, match="missing"):
        repo.commit(entry)
    assert repo.backups() == []
    materialize(entry)
    done = repo.commit(entry)
    assert done.complete and repo.get(entry.id) == done
    with pytest.raises(RepositoryError, match="complete already"):
        repo.commit(entry)


def test_order_comes_from_metadata_not_file_times(repo: Repository) -> None:
    # The clock went backwards between backups and file times are reversed.
    first = backup(repo, {"vda": "full"}, T0)
    second = backup(repo, {"vda": "inc"}, T0 - timedelta(days=1))
    third = backup(repo, {"vda": "inc"}, T0 - timedelta(days=2))
    for age, entry in enumerate([first, second, third]):
        stamp = 1_000_000_000 - age * 1000
        for path in (repo.record_path(entry.id), entry.target("vda").image):
            os.utime(path, (stamp, stamp))
    assert [r.id for r in repo.backups()] == [first.id, second.id, third.id]
    latest = repo.latest("vda")
    assert latest is not None and latest.id == third.id
    assert third.record.parent == second.id
    assert repo.chain(third.id, "vda") == [
        first.target("vda").image,
        second.target("vda").image,
        third.target("vda").image,
    ]


@pytest.mark.parametrize("vm", ["../x", "a/b", ".hidden", "", "x" * 65])
def test_bad_vm_names_are_refused(tmp_path: Path, vm: str) -> None:
    with pytest.raises(InvalidInputError):
        Repository(tmp_path, vm)


@pytest.mark.parametrize("disk", ["..", "../vdb", "a/b", ".x", "backups"])
def test_bad_disk_names_are_refused(repo: Repository, disk: str) -> None:
    with pytest.raises(InvalidInputError):
        repo.begin_backup([DiskRequest(name=disk, virtual_size=MiB, level="full")], mode="push")
    with pytest.raises(InvalidInputError):
        repo.disk_dir(disk)
    assert repo.backups(complete_only=False) == []


def test_path_escapes_are_refused(repo: Repository, tmp_path: Path) -> None:
    entry = backup(repo, {"vda": "full"})
    # A record naming a file outside its folder is refused when loaded.
    path = repo.record_path(entry.id)
    data = json.loads(path.read_text())
    data["disks"][0]["file"] = "../../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match="unreadable backup record"):
        repo.backups()
    with pytest.raises(InvalidInputError):
        repo.record_path("../x")
    # A disk folder that is a symlink out of the repository is refused.
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo.base / "vdz").symlink_to(outside)
    with pytest.raises(InvalidInputError, match="escapes"):
        repo.disk_dir("vdz")


def test_record_model_round_trip(repo: Repository) -> None:
    entry = backup(repo, {"vda": "full"})
    text = repo.record_path(entry.id).read_text()
    assert BackupRecord.model_validate_json(text) == repo.get(entry.id)
