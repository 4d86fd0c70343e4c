"""Verify backups offline: files, qcow2 structure, chains and content against digests.

Every image file is hashed whole and compared with the BLAKE2b its record holds, checked
by ``qemu-img check`` and described by ``qemu-img info`` (size, backing link). Content is
checked per block against the recorded digests without reading every point of every
chain: a base is read whole; a backup with a parent reads only the blocks its own image
touches (``qemu-img map`` depth 0), plus those whose recorded digest differs from its
parent's or whose parent did not verify. The other blocks read exactly as in the parent,
so, parents being verified first, equal recorded digests prove them too.

A mismatching block is blamed on the image files that provide it (the map's depth) whose
file digest changed; when every such file is unchanged since the backup, on the digests
file. Nothing here raises for a damaged repository: each finding is a :class:`Problem`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from ..errors import InvalidInputError, one_line
from ..images.qemu_img import ImageError, image_info, qemu_img
from ..nbd import NBDError
from .digests import (
    DigestError,
    Digests,
    block_count,
    changed_blocks,
    digest_image,
    file_digest,
    resized_blocks,
)
from .records import BackupRecord, DiskRecord, RecordError, RepositoryError
from .repository import Repository
from .restore import describe_blocks

log = structlog.get_logger("qmpbackup.verify")

Severity = Literal["error", "warning"]
FileState = Literal["intact", "changed", "unknown", "missing"]


@dataclass(frozen=True)
class Problem:
    """One finding: in which backup and disk, about which file, what is wrong."""

    backup_id: str
    disk: str | None
    path: Path | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = self.backup_id + (f" {self.disk}" if self.disk else "")
        about = f" {self.path}:" if self.path else ""
        return f"{self.severity}: backup {where}:{about} {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """The backups verified, what was found, and how much was read."""

    backup_ids: list[str]
    problems: list[Problem]
    files: int
    blocks_read: int

    @property
    def backups(self) -> int:
        """How many backups were verified."""
        return len(self.backup_ids)

    @property
    def ok(self) -> bool:
        """True when no problem is an error (warnings: leaked clusters, interrupted runs)."""
        return not any(p.severity == "error" for p in self.problems)


@dataclass(eq=False)
class _Disk:
    """What verify learned of one disk of one backup."""

    record: BackupRecord
    disk: DiskRecord
    image: Path
    digests_file: Path
    parent: _Disk | None = None
    state: FileState = "unknown"
    usable: bool = False  # opens, right size and backing link: a chain may go through it
    digests: Digests | None = None
    # Blocks whose content does not equal the recorded digest, or was not verified.
    unproven: set[int] = field(default_factory=set)


class _Verifier:
    """One run of :func:`verify`: the records, what each check found, the counts."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.problems: list[Problem] = []
        self.files = 0
        self.blocks = 0
        self.records: dict[str, BackupRecord] = {}
        self.disks: dict[tuple[str, str], _Disk] = {}
        # (path, backup owning it, disk) -> (bad blocks, backups through which they were read)
        self.content: dict[tuple[Path, str, str], tuple[set[int], set[str]]] = defaultdict(
            lambda: (set(), set())
        )

    def problem(
        self, item: _Disk | BackupRecord, path: Path | None, message: str, severity: Severity
    ) -> None:
        record = item.record if isinstance(item, _Disk) else item
        disk = item.disk.name if isinstance(item, _Disk) else None
        self.problems.append(Problem(record.id, disk, path, message, severity))

    def error(self, item: _Disk, path: Path | None, message: str) -> None:
        self.problem(item, path, message, "error")

    # Records and scope.

    def load(self) -> None:
        """Read every record; an unreadable one is a problem, not an error."""
        for path in sorted(self.repo.record_paths()):
            try:
                record = self.repo.load_record(path)
            except RecordError as exc:
                self.problems.append(Problem(path.stem, None, path, exc.detail))
                continue
            self.records[record.id] = record

    def scope(self, backup_id: str | None) -> list[BackupRecord]:
        """The records to verify, oldest first; problems outside the scope dropped."""
        if backup_id is None:
            return sorted(self.records.values(), key=lambda r: r.seq)
        if not self.repo.record_path(backup_id).exists():
            raise InvalidInputError(f"no backup {backup_id} in {self.repo.base}")
        wanted: dict[str, BackupRecord] = {}
        named = {backup_id}
        todo = [backup_id]
        while todo:
            current = todo.pop()
            record = self.records.get(current)
            if current in wanted or record is None:
                continue
            wanted[current] = record
            parents = {d.parent for d in record.disks if d.parent is not None}
            named |= parents
            todo.extend(parents)
        self.problems = [p for p in self.problems if p.backup_id in named]
        return sorted(wanted.values(), key=lambda r: r.seq)

    # Structure.

    def check_file(self, item: _Disk) -> None:
        """Existence, whole-file digest, qemu-img info and check of one image file."""
        expected = item.disk
        if not item.image.is_file():
            item.state = "missing"
            self.error(item, item.image, "image file missing")
            return
        self.files += 1
        if expected.file_digest is not None:
            try:
                same = file_digest(item.image) == expected.file_digest
            except OSError as exc:
                self.error(item, item.image, f"unreadable: {one_line(exc)}")
                return
            item.state = "intact" if same else "changed"
            if not same:
                self.error(
                    item,
                    item.image,
                    "image file changed since the backup: its BLAKE2b differs from the record's",
                )
        try:
            info = image_info(item.image)
        except (ImageError, ValueError) as exc:
            self.error(item, item.image, f"cannot be opened: {one_line(exc)}")
            return
        usable = self.check_info(item, info)
        self.check_qcow2(item)
        item.usable = usable and self.check_parent(item)

    def check_info(self, item: _Disk, info: dict[str, Any]) -> bool:
        expected = item.disk
        found: list[str] = []
        if info.get("format") != "qcow2":
            found.append(f"format {info.get('format')}, not qcow2")
        if info.get("virtual-size") != expected.virtual_size:
            found.append(
                f"virtual size {info.get('virtual-size')}, the record says {expected.virtual_size}"
            )
        backing = info.get("backing-filename")
        if backing != expected.parent_file:
            found.append(f"backing file {backing!r}, the record says {expected.parent_file!r}")
        elif backing is not None and info.get("backing-filename-format") != "qcow2":
            found.append(f"backing format {info.get('backing-filename-format')!r}, not 'qcow2'")
        specific = info.get("format-specific", {}).get("data", {})
        if specific.get("corrupt"):
            found.append("qcow2 marks the image corrupt")
        for message in found:
            self.error(item, item.image, message)
        return not found

    def check_qcow2(self, item: _Disk) -> None:
        # Opened alone (backing null) so that a missing parent is reported once, there.
        spec: dict[str, Any] = {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(item.image)},
            "backing": None,
        }
        try:
            proc = qemu_img("check", "--output=json", "json:" + json.dumps(spec), ok=(0, 1, 2, 3))
        except ImageError as exc:
            self.error(item, item.image, f"qemu-img check: {exc}")
            return
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        first = next((line for line in lines if "ERROR" in line), lines[0])
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            self.error(item, item.image, f"qemu-img check could not complete: {first}")
            return
        corruptions = int(result.get("corruptions", 0))
        if corruptions:
            message = f"qemu-img check: {corruptions} corruptions in the qcow2 metadata ({first})"
            self.error(item, item.image, message)
        elif proc.returncode in (1, 2) or result.get("check-errors"):
            self.error(item, item.image, f"qemu-img check could not complete: {first}")
        leaks = int(result.get("leaks", 0))
        if leaks:
            self.problem(
                item, item.image, f"qemu-img check: {leaks} leaked clusters (space only)", "warning"
            )

    def check_parent(self, item: _Disk) -> bool:
        expected = item.disk
        if expected.parent is None:
            return True
        parent = self.records.get(expected.parent)
        if parent is None:
            self.error(item, item.image, f"parent backup {expected.parent} has no readable record")
            return False
        parent_disk = parent.disk(expected.name)
        if not parent.complete:
            message = f"parent backup {parent.id} is incomplete"
        elif parent.seq >= item.record.seq:
            message = f"parent backup {parent.id} is not older than this one"
        elif parent_disk is None:
            message = f"parent backup {parent.id} has no disk {expected.name}"
        elif parent_disk.file != expected.parent_file:
            message = (
                f"the record names parent file {expected.parent_file}, "
                f"backup {parent.id} has {parent_disk.file}"
            )
        else:
            return True
        self.error(item, item.image, message)
        return False

    def check_digests(self, item: _Disk) -> None:
        expected = item.disk
        if not item.digests_file.is_file():
            self.error(item, item.digests_file, "digests file missing")
            return
        self.files += 1
        try:
            digests = Digests.load(item.digests_file)
        except (OSError, DigestError) as exc:
            self.error(item, item.digests_file, f"unreadable digests: {one_line(exc)}")
            return
        if (
            digests.block_size != expected.digest_block_size
            or digests.size != expected.virtual_size
        ):
            self.error(
                item,
                item.digests_file,
                f"digests of {digests.size} bytes in {digests.block_size}-byte blocks, the "
                f"record says {expected.virtual_size} in {expected.digest_block_size}",
            )
            return
        item.digests = digests

    # Content.

    def chain(self, item: _Disk) -> list[_Disk]:
        """``item``'s chain, base first (parents whose record is missing end it)."""
        found = [item]
        parent = item.parent
        while parent is not None and len(found) <= len(self.disks):
            found.append(parent)
            parent = parent.parent
        return found[::-1]

    def check_content(self, item: _Disk) -> None:
        expected = item.digests
        if expected is None:
            item.unproven = set(
                range(block_count(item.disk.virtual_size, item.disk.digest_block_size))
            )
            return
        chain = self.chain(item)
        broken = next((c for c in chain if not c.usable), None)
        if broken is None and chain[0].disk.parent is not None:
            broken = chain[0]  # check_parent reported its missing parent
        if broken is not None:
            item.unproven = set(range(len(expected.blocks)))
            if broken is not item:
                self.error(
                    item,
                    broken.image,
                    f"content not checked: its chain goes through {broken.image.name} "
                    f"of backup {broken.record.id}, which is missing or damaged",
                )
            return
        bs = expected.block_size
        count = len(expected.blocks)
        mapping: list[dict[str, Any]] = []
        parent = item.parent
        if parent is None:
            wanted = set(range(count))
        else:
            try:
                mapping = json.loads(
                    qemu_img("map", "--output=json", "-f", "qcow2", str(item.image)).stdout
                )
            except (ImageError, ValueError) as exc:
                self.error(item, item.image, f"qemu-img map: {one_line(exc)}")
                item.unproven = set(range(count))
                return
            wanted = self.blocks_to_read(item, parent, mapping)
        if wanted:
            try:
                got = digest_image(item.image, item.disk.virtual_size, wanted, block_size=bs)
            except (DigestError, NBDError) as exc:
                self.error(item, item.image, f"cannot read through the chain: {one_line(exc)}")
                item.unproven = set(range(count))
                return
            self.blocks += len(wanted)
            bad = sorted(i for i in wanted if got[i] != expected.blocks[i])
        else:
            bad = []
        item.unproven = set(bad)
        for index in bad:
            self.blame(item, chain, index, mapping)

    def blocks_to_read(self, item: _Disk, parent: _Disk, mapping: list[dict[str, Any]]) -> set[int]:
        assert item.digests is not None
        bs = item.digests.block_size
        count = len(item.digests.blocks)
        own = [
            (int(e["start"]), int(e["length"]))
            for e in mapping
            if e.get("depth") == 0 and e.get("present", e.get("data") or e.get("zero"))
        ]
        wanted = changed_blocks(own, bs)
        theirs = parent.digests
        if theirs is None or theirs.block_size != bs:
            return set(range(count))
        known = min(block_count(theirs.size, bs), count)
        wanted |= resized_blocks(theirs.size, item.disk.virtual_size, bs)
        wanted |= set(range(known, count))
        wanted |= {i for i in parent.unproven if i < count}
        wanted |= {i for i in range(known) if item.digests.blocks[i] != theirs.blocks[i]}
        return {i for i in wanted if i < count}

    def blame(
        self, item: _Disk, chain: list[_Disk], index: int, mapping: list[dict[str, Any]]
    ) -> None:
        bs = item.disk.digest_block_size
        start, end = index * bs, (index + 1) * bs
        providers = {chain[-1]}
        for entry in mapping:
            if entry["start"] < end and entry["start"] + entry["length"] > start:
                depth = int(entry.get("depth", 0))
                if entry.get("present", True) and depth < len(chain):
                    providers.add(chain[-1 - depth])
        changed = [p for p in providers if p.state == "changed"]
        unknown = [p for p in providers if p.state == "unknown"]
        for culprit in changed or unknown:
            blocks, via = self.content[(culprit.image, culprit.record.id, culprit.disk.name)]
            blocks.add(index)
            via.add(item.record.id)
        if not changed and not unknown:
            blocks, via = self.content[(item.digests_file, item.record.id, item.disk.name)]
            blocks.add(index)
            via.add(item.record.id)

    def report_content(self) -> None:
        for (path, owner, disk), (blocks, via) in sorted(self.content.items()):
            item = self.disks[(owner, disk)]
            text = describe_blocks(sorted(blocks), item.disk.digest_block_size)
            if path == item.digests_file:
                message = (
                    f"recorded digest of {text} does not match the content, though the image "
                    "files are unchanged since the backup: this file or the backup is wrong"
                )
            else:
                message = f"content of {text} differs from the recorded digests"
                others = sorted(via - {owner})
                if others:
                    message += f" (also seen through backups {', '.join(others)})"
            self.error(item, path, message)

    # Driver.

    def run(self, records: Iterable[BackupRecord], asked: str | None) -> None:
        complete: list[_Disk] = []
        for record in records:
            if not record.complete:
                severity: Severity = "error" if record.id == asked else "warning"
                self.problem(
                    record,
                    self.repo.record_path(record.id),
                    "incomplete backup left by an interrupted run; the next backup discards it",
                    severity,
                )
                continue
            for disk in record.disks:
                try:
                    image = self.repo.image_path(record, disk.name)
                    digests_file = self.repo.digests_path(record, disk.name)
                except (InvalidInputError, RepositoryError) as exc:
                    self.problem(record, None, f"disk {disk.name}: {one_line(exc)}", "error")
                    continue
                item = _Disk(record, disk, image, digests_file)
                self.disks[(record.id, disk.name)] = item
                complete.append(item)
        for item in complete:
            if item.disk.parent is not None:
                item.parent = self.disks.get((item.disk.parent, item.disk.name))
            self.check_file(item)
            self.check_digests(item)
        for item in complete:  # oldest first: parents are proven before their children
            self.check_content(item)
        self.report_content()


def verify(repo: Repository, backup_id: str | None = None) -> VerifyReport:
    """Verify backup ``backup_id`` with every backup its disks' chains go through, or every
    backup of the repository; raises only for an unknown ``backup_id``."""
    verifier = _Verifier(repo)
    verifier.load()
    records = verifier.scope(backup_id)
    verifier.run(records, backup_id)
    report = VerifyReport(
        backup_ids=[r.id for r in records],
        problems=verifier.problems,
        files=verifier.files,
        blocks_read=verifier.blocks,
    )
    log.info(
        "verify.done",
        backups=report.backups,
        problems=len(report.problems),
        files=report.files,
        blocks=report.blocks_read,
    )
    return report
