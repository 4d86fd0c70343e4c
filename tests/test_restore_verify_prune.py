"""Restore, verify and prune on repositories of real qcow2 images (no VM)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmpbackup.errors import InvalidInputError, TargetExistsError
from qmpbackup.repo.digests import file_digest
from qmpbackup.repo.prune import needed_checkpoints, prune, unneeded_checkpoints
from qmpbackup.repo.records import DiskRequest, RepositoryError
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import Format, restore
from qmpbackup.repo.verify import Problem, verify
from qmpbackup.request.models import Level

from .repo_builder import (
    KiB,
    MiB,
    Write,
    add_backup,
    edit_digest,
    flip_byte,
    flip_data_byte,
    qemu_img,
    reference,
    same_content,
    snapshot,
)

# Full, two incrementals and a differential of vda; the comments count 1 MiB, the digest
# blocks are 64 KiB (BLOCK, format 2).
BLOCK = 64 * KiB
A: list[Write] = [(0x11, 0, MiB), (0x12, 3 * MiB, 512 * KiB), (0x13, 6 * MiB + 64 * KiB, 64 * KiB)]
B: list[Write] = [(0x21, 512 * KiB, 64 * KiB), (0x22, 4 * MiB, MiB)]  # blocks 0, 4
C: list[Write] = [(0x31, 3 * MiB + 128 * KiB, 64 * KiB), (None, 6 * MiB, 256 * KiB)]  # 3, 6
C += [(0x32, 7 * MiB, 64 * KiB)]  # 7
E: list[Write] = [(0x41, 2 * MiB, 256 * KiB), (0x42, 4 * MiB + 512 * KiB, 64 * KiB)]  # 2, 4
F: list[Write] = [(0x51, 5 * MiB, 128 * KiB)]  # 5


@dataclass
class Built:
    """A repository, its backups in order and the writes of each point in time."""

    repo: Repository
    ids: list[str]
    layers: dict[str, list[list[Write]]]

    def image(self, backup_id: str, disk: str = "vda") -> Path:
        return self.repo.image_path(self.repo.get(backup_id), disk)

    def digests(self, backup_id: str, disk: str = "vda") -> Path:
        return self.repo.digests_path(self.repo.get(backup_id), disk)


def build_chain(root: Path) -> Built:
    """full (A), inc (B), inc (C), diff on the full (E)."""
    repo = Repository(root, "vm1")
    full = add_backup(repo, {"vda": ("full", A)}, 0)
    inc1 = add_backup(repo, {"vda": ("inc", B)}, 1)
    inc2 = add_backup(repo, {"vda": ("inc", C)}, 2)
    diff = add_backup(repo, {"vda": ("diff", E)}, 3)
    layers = {full.id: [A], inc1.id: [A, B], inc2.id: [A, B, C], diff.id: [A, E]}
    return Built(repo, [full.id, inc1.id, inc2.id, diff.id], layers)


def build_incs(root: Path) -> Built:
    """full (A), inc (B), inc (C), inc (F)."""
    repo = Repository(root, "vm1")
    ids: list[str] = []
    layers: dict[str, list[list[Write]]] = {}
    steps: list[tuple[Level, list[Write]]] = [("full", A), ("inc", B), ("inc", C), ("inc", F)]
    for hour, (level, writes) in enumerate(steps):
        record = add_backup(repo, {"vda": (level, writes)}, hour)
        layers[record.id] = [*(layers[ids[-1]] if ids else []), writes]
        ids.append(record.id)
    return Built(repo, ids, layers)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Repositories built once; tests that change them work on a copy."""
    base = tmp_path_factory.mktemp("pristine")
    build_chain(base / "chain")
    build_incs(base / "incs")
    return {"chain": base / "chain", "incs": base / "incs"}


def copy_of(pristine: dict[str, Path], which: str, tmp_path: Path) -> Built:
    root = tmp_path / which
    shutil.copytree(pristine[which], root)
    repo = Repository(root, "vm1")
    records = repo.backups()
    ids = [r.id for r in records]
    plan = {
        "chain": [[A], [A, B], [A, B, C], [A, E]],
        "incs": [[A], [A, B], [A, B, C], [A, B, C, F]],
    }
    return Built(repo, ids, dict(zip(ids, plan[which], strict=True)))


@pytest.fixture
def chain(pristine: dict[str, Path], tmp_path: Path) -> Built:
    return copy_of(pristine, "chain", tmp_path)


@pytest.fixture
def incs(pristine: dict[str, Path], tmp_path: Path) -> Built:
    return copy_of(pristine, "incs", tmp_path)


def expected(built: Built, backup_id: str, tmp_path: Path) -> Path:
    return reference(tmp_path / f"ref-{backup_id}.qcow2", *built.layers[backup_id])


def paths_named(problems: list[Problem]) -> set[Path | None]:
    return {p.path for p in problems}


# Restore.


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore_every_point_equals_its_reference(
    chain: Built, tmp_path: Path, fmt: Format
) -> None:
    for backup_id in chain.ids:
        out = tmp_path / f"{backup_id}.{fmt}"
        result = restore(chain.repo, "vda", out, backup_id, fmt)
        assert result.backup_id == backup_id and result.out == out and result.fmt == fmt
        assert result.virtual_size == 8 * MiB and result.blocks_checked == 8 * MiB // BLOCK
        assert same_content(out, expected(chain, backup_id, tmp_path), fmt)
        info = json.loads(qemu_img("info", "--output=json", "-f", fmt, str(out)))
        assert "backing-filename" not in info and info["virtual-size"] == 8 * MiB
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_restore_leaves_clusters_of_zeroes_sparse(tmp_path: Path) -> None:
    # A guest's zero-filled data (allocated in the backup) restores as holes in a raw
    # image and as unallocated clusters in a qcow2, as qemu-img convert leaves them.
    repo = Repository(tmp_path / "repo", "vm1")
    writes: list[Write] = [(0x11, 0, MiB), (0, MiB, 2 * MiB), (0x12, 3 * MiB, 64 * KiB)]
    add_backup(repo, {"vda": ("full", writes)}, 0)
    ref = reference(tmp_path / "ref.qcow2", writes)
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        restore(repo, "vda", out, fmt=fmt)  # type: ignore[arg-type]
        assert same_content(out, ref, fmt)
        extents = json.loads(qemu_img("map", "--output=json", "-f", fmt, str(out)))
        data = [(e["start"], e["length"]) for e in extents if e["data"]]
        assert data == [(0, MiB), (3 * MiB, 64 * KiB)], (fmt, extents)


def test_restore_defaults_to_the_newest_backup(chain: Built, tmp_path: Path) -> None:
    result = restore(chain.repo, "vda", tmp_path / "latest.qcow2")
    assert result.backup_id == chain.ids[-1]
    assert same_content(result.out, expected(chain, chain.ids[-1], tmp_path))


def test_restore_refuses_existing_out_and_bad_input(chain: Built, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    out.write_text("mine")
    with pytest.raises(TargetExistsError, match="exists"):
        restore(chain.repo, "vda", out, chain.ids[0])
    assert out.read_text() == "mine"
    dangling = tmp_path / "link.qcow2"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(TargetExistsError):
        restore(chain.repo, "vda", dangling)
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(InvalidInputError, match="no backup"):
        restore(chain.repo, "vda", tmp_path / "a.qcow2", "20990101T000000Z-9")
    with pytest.raises(InvalidInputError, match="no disk vdb"):
        restore(chain.repo, "vdb", tmp_path / "a.qcow2", chain.ids[0])
    with pytest.raises(InvalidInputError, match="no complete backup of disk vdb"):
        restore(chain.repo, "vdb", tmp_path / "a.qcow2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain", "link.qcow2", "out.qcow2"]


def test_restore_of_a_corrupt_chain_fails_naming_the_block(chain: Built, tmp_path: Path) -> None:
    inc1, inc2 = chain.ids[1], chain.ids[2]
    flip_data_byte(chain.image(inc1), 4 * MiB + 100)  # block 4, which inc2 reads from inc1
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    block = 4 * MiB // BLOCK
    with pytest.raises(RepositoryError, match=rf"backup {inc2}, disk vda: block {block} \(bytes"):
        restore(chain.repo, "vda", out_dir / "x.qcow2", inc2)
    assert list(out_dir.iterdir()) == []
    # The full backup does not go through inc1: still restorable.
    restore(chain.repo, "vda", out_dir / "full.raw", chain.ids[0], "raw")


# Verify.


def test_verify_a_good_repository_reads_only_what_each_layer_touches(chain: Built) -> None:
    report = verify(chain.repo)
    assert report.ok and report.problems == []
    assert report.backup_ids == chain.ids and report.backups == 4 and report.files == 8
    # Each file's own data clusters are hashed once, in its one read: the full's 16 + 8 +
    # 1, inc1's 1 + 16, inc2's 1 + 1 (its 4 zero clusters hold no data), the diff's 4 + 1.
    assert report.blocks_read == 25 + 17 + 2 + 5
    one = verify(chain.repo, chain.ids[2])
    assert one.ok and one.backup_ids == chain.ids[:3]
    with pytest.raises(InvalidInputError):
        verify(chain.repo, "20990101T000000Z-9")


@pytest.mark.parametrize(
    ("index", "guest"),
    [(0, 100), (1, 4 * MiB + 100), (2, 7 * MiB + 100), (3, 2 * MiB + 100)],
    ids=["full", "inc1", "inc2", "diff"],
)
def test_verify_names_the_file_with_a_flipped_data_byte(
    chain: Built, index: int, guest: int
) -> None:
    image = chain.image(chain.ids[index])
    flip_data_byte(image, guest)
    report = verify(chain.repo)
    assert not report.ok
    assert paths_named(report.problems) == {image}
    messages = " | ".join(p.message for p in report.problems)
    assert "changed since the backup" in messages and f"block {guest // BLOCK} " in messages


def test_verify_names_a_file_with_damaged_metadata(chain: Built) -> None:
    def table(image: Path, at: int) -> int:
        data = image.read_bytes()
        first = int.from_bytes(data[at : at + 8], "big")
        return int.from_bytes(data[first : first + 8], "big") & ((1 << 56) - 512)

    diff = chain.image(chain.ids[3])
    flip_byte(diff, table(diff, 48) + 1)  # cluster 0's refcount: 1 becomes 254, a leak
    report = verify(chain.repo, chain.ids[3])
    assert paths_named(report.problems) == {diff}
    assert any(p.severity == "warning" and "leaked" in p.message for p in report.problems)

    inc1 = chain.image(chain.ids[1])
    flip_byte(inc1, table(inc1, 40) + 5)  # an L2 entry: a cluster offset now points elsewhere
    report = verify(chain.repo, chain.ids[1])
    assert paths_named(report.problems) == {inc1}
    assert any("qemu-img check: " in p.message for p in report.problems)

    full = chain.image(chain.ids[0])
    flip_byte(full, 2)  # the magic
    report = verify(chain.repo, chain.ids[0])
    assert paths_named(report.problems) == {full}
    assert any("cannot be opened" in p.message for p in report.problems)


def test_verify_reports_an_unreadable_record(chain: Built) -> None:
    bad = chain.repo.records_dir / "20990101T000000Z-9.json"
    bad.write_text('{"id": "half')
    report = verify(chain.repo)
    assert [(p.path, p.message.split(":")[0]) for p in report.problems] == [
        (bad, "unreadable backup record")
    ]
    assert report.backup_ids == chain.ids


def test_verify_names_a_missing_file_and_a_wrong_backing_link(chain: Built) -> None:
    inc1, inc2 = chain.image(chain.ids[1]), chain.image(chain.ids[2])
    qemu_img(
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        chain.image(chain.ids[0]).name,
        "-F",
        "qcow2",
        str(inc2),
    )
    report = verify(chain.repo)
    assert paths_named(report.problems) == {inc2}
    assert any("backing file" in p.message for p in report.problems)

    inc1.unlink()
    chain.digests(chain.ids[3]).unlink()
    report = verify(chain.repo)
    assert paths_named(report.problems) == {inc1, inc2, chain.digests(chain.ids[3])}
    missing = [p for p in report.problems if p.path == inc1]
    assert {p.backup_id for p in missing} == {chain.ids[1], chain.ids[2]}  # inc2 goes through it


def test_verify_finds_an_edited_digests_file(chain: Built) -> None:
    digests = chain.digests(chain.ids[1])
    edit_digest(digests, 5)  # a block inc1 does not touch
    report = verify(chain.repo)
    assert [(p.backup_id, p.path) for p in report.problems] == [(chain.ids[1], digests)]
    assert "block 5 " in report.problems[0].message


def test_verify_reports_an_interrupted_backup_as_a_warning(chain: Built) -> None:
    entry = chain.repo.begin_backup(
        [DiskRequest(name="vda", virtual_size=8 * MiB, level="inc")], mode="push"
    )
    report = verify(chain.repo)
    assert report.ok
    assert [(p.backup_id, p.severity) for p in report.problems] == [(entry.id, "warning")]
    assert "interrupted" in report.problems[0].message
    assert not verify(chain.repo, entry.id).ok


# Prune.


def test_prune_keeps_the_newest_and_rebases_the_oldest_kept(incs: Built, tmp_path: Path) -> None:
    repo, ids = incs.repo, incs.ids
    newest_file = incs.image(ids[3])
    newest_before = newest_file.read_bytes()
    assert unneeded_checkpoints(repo) == [f"backup-{ids[1]}", f"backup-{ids[2]}"]

    result = prune(repo, 2)
    assert result.removed == (ids[0], ids[1]) and result.kept == (ids[2], ids[3])
    assert result.rebased == (ids[2],) and result.rebased_disks == ((ids[2], "vda"),)
    assert result.released == (f"backup-{ids[0]}", f"backup-{ids[1]}")
    assert result.bytes_freed > 0 and not result.dry_run
    assert [r.id for r in repo.backups(complete_only=False)] == ids[2:]
    assert sorted(p.name for p in (repo.base / "vda").iterdir()) == sorted(
        f"{i}{s}" for i in ids[2:] for s in (".qcow2", ".digests")
    )

    rebased = repo.get(ids[2])
    vda = rebased.disks[0]
    assert (rebased.level, rebased.parent, rebased.merged) == ("full", None, (ids[0], ids[1]))
    assert (vda.level, vda.parent, vda.parent_file) == ("full", None, None)
    assert vda.file_digest == file_digest(incs.image(ids[2]))
    info = json.loads(qemu_img("info", "--output=json", str(incs.image(ids[2]))))
    assert "backing-filename" not in info
    assert newest_file.read_bytes() == newest_before and repo.get(ids[3]).parent == ids[2]

    for backup_id in ids[2:]:
        out = restore(repo, "vda", tmp_path / f"{backup_id}.qcow2", backup_id).out
        assert same_content(out, expected(incs, backup_id, tmp_path))
    report = verify(repo)
    assert report.ok and report.problems == []
    assert unneeded_checkpoints(repo) == []
    assert needed_checkpoints(repo.backups()) == {f"backup-{ids[2]}", f"backup-{ids[3]}"}


def test_prune_flattens_each_disk_whose_base_is_dropped(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", "vm1")
    full = add_backup(repo, {"vda": ("full", A), "vdb": ("full", F)}, 0)
    inc1 = add_backup(repo, {"vda": ("inc", B), "vdb": ("inc", C)}, 1)
    diff = add_backup(repo, {"vda": ("diff", E), "vdb": ("inc", B)}, 2)  # vdb: on inc1
    inc2 = add_backup(repo, {"vda": ("inc", C), "vdb": ("inc", E)}, 3)
    expect = {
        (diff.id, "vda"): [A, E],
        (diff.id, "vdb"): [F, C, B],
        (inc2.id, "vda"): [A, E, C],
        (inc2.id, "vdb"): [F, C, B, E],
    }
    plan = prune(repo, 2, dry_run=True)
    result = prune(repo, 2)
    assert (plan.removed, plan.rebased, plan.released) == (
        result.removed,
        result.rebased,
        result.released,
    )
    assert result.removed == (full.id, inc1.id) and result.rebased == (diff.id,)
    assert result.rebased_disks == ((diff.id, "vda"), (diff.id, "vdb"))
    assert result.released == (f"backup-{full.id}", f"backup-{inc1.id}")
    record = repo.get(diff.id)
    assert (record.level, record.parent, record.merged) == ("full", None, (full.id, inc1.id))
    assert repo.get(inc2.id).level == "inc" and repo.get(inc2.id).parent == diff.id
    for (backup_id, disk), layers in expect.items():
        out = restore(repo, disk, tmp_path / f"{backup_id}-{disk}.qcow2", backup_id).out
        assert same_content(out, reference(tmp_path / f"ref-{backup_id}-{disk}.qcow2", *layers))
    assert verify(repo).problems == []


def test_prune_dry_run_changes_nothing(incs: Built) -> None:
    before = snapshot(incs.repo.root)
    plan = prune(incs.repo, 1, dry_run=True)
    assert plan.dry_run and plan.removed == tuple(incs.ids[:3]) and plan.rebased == (incs.ids[3],)
    assert snapshot(incs.repo.root) == before
    with pytest.raises(InvalidInputError, match="at least 1"):
        prune(incs.repo, 0)
    nothing = prune(incs.repo, 4)
    assert (nothing.removed, nothing.rebased) == ((), ())
    # Nothing removed, but the checkpoints of the middle backups are of no use already.
    assert nothing.released == tuple(f"backup-{i}" for i in incs.ids[1:3])
    assert snapshot(incs.repo.root) == before


def test_prune_refuses_when_the_flattened_image_does_not_check(incs: Built) -> None:
    repo, ids = incs.repo, incs.ids
    broken = incs.image(ids[1])
    flip_data_byte(broken, 4 * MiB + 100)  # block 4: the kept ids[2] reads it from ids[1]
    before = snapshot(repo.root)
    block = 4 * MiB // BLOCK
    with pytest.raises(
        RepositoryError, match=rf"flattening backup {ids[2]}, disk vda: block {block}"
    ):
        prune(repo, 2)
    assert snapshot(repo.root) == before
    assert paths_named(verify(repo).problems) == {broken}


def test_prune_finishes_an_interrupted_rebase(incs: Built, tmp_path: Path) -> None:
    # A crash after the flattened image was renamed, before its record was rewritten.
    repo, ids = incs.repo, incs.ids
    image = incs.image(ids[2])
    temp = image.with_name(f".{image.name}.prune-crash")
    qemu_img("convert", "-f", "qcow2", "-O", "qcow2", str(image), str(temp))
    os.replace(temp, image)
    assert same_content(
        restore(repo, "vda", tmp_path / "mid.qcow2", ids[3]).out, expected(incs, ids[3], tmp_path)
    )
    assert not verify(repo).ok  # the record still names the old parent and file digest
    result = prune(repo, 2)
    assert result.rebased == (ids[2],)
    assert verify(repo).problems == []


def test_prune_removes_orphans_and_leftover_temporaries(incs: Built) -> None:
    folder = incs.repo.base / "vda"
    strays = [
        folder / "20250101T000000Z-77.qcow2",
        folder / "20250101T000000Z-77.digests",
        folder / f".{incs.ids[0]}.qcow2.prune-abc123",
        folder / ".x.raw.restore-zz9",
    ]
    kept = [folder / "notes.txt", folder / "20250101T000000Z-77.json"]
    for path in strays + kept:
        path.write_bytes(b"x" * 4096)
    entry = incs.repo.begin_backup(
        [DiskRequest(name="vda", virtual_size=8 * MiB, level="inc")], mode="push"
    )
    unfinished = entry.target("vda").image
    unfinished.write_bytes(b"partial")
    plan = prune(incs.repo, 4, dry_run=True)
    assert set(plan.orphans) == set(strays) and all(p.exists() for p in strays)
    result = prune(incs.repo, 4)
    assert set(result.orphans) == set(strays) and result.bytes_freed >= 4 * 4096
    assert not any(p.exists() for p in strays)
    assert all(p.exists() for p in kept) and unfinished.exists()


def test_needed_checkpoints_per_disk(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", "vm1")
    made: list[str] = []
    steps: list[dict[str, Level]] = [
        {"vda": "full", "vdb": "full"},
        {"vda": "inc", "vdb": "inc"},
        {"vda": "diff"},
    ]
    for hour, levels in enumerate(steps):
        disks: dict[str, tuple[Level, list[Write]]] = {d: (lv, []) for d, lv in levels.items()}
        made.append(add_backup(repo, disks, hour).id)
    # vda: newest diff (2), newest full (0); vdb: newest inc (1), newest full (0).
    assert needed_checkpoints(repo.backups()) == {f"backup-{made[i]}" for i in (0, 1, 2)}
    assert unneeded_checkpoints(repo) == []
    add_backup(repo, {"vda": ("full", []), "vdb": ("inc", [])}, 3)
    assert unneeded_checkpoints(repo) == [f"backup-{made[1]}", f"backup-{made[2]}"]
