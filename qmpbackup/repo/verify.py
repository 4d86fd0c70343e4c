"""Verify backups offline: files, qcow2 structure, chains and content against digests.

Every image file's file digest is compared with its record's, the file is checked by
``qemu-img check`` and described by ``qemu-img info`` (size, backing link)
(:mod:`qmpbackup.repo.verify_files`); a format 2 image is read once for its file
digest and its clusters' digests. Content is checked per block against the recorded
digests, reading only what a chain's parents do not prove already, and a mismatching
block is blamed on the files that provide it (:mod:`qmpbackup.repo.verify_content`).
Nothing here raises for a damaged repository: each finding is a :class:`Problem`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..errors import InvalidInputError, one_line
from .records import BackupRecord, RecordError, RepositoryError
from .repository import Repository
from .verify_content import ContentChecks
from .verify_files import CheckedDisk, FileChecks, Severity

log = structlog.get_logger("qmpbackup.verify")


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


class _Verifier:
    """One run of :func:`verify`: the records, the disks found in them, what was found."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.problems: list[Problem] = []
        self.records: dict[str, BackupRecord] = {}
        self.disks: dict[tuple[str, str], CheckedDisk] = {}

    def problem(
        self,
        item: CheckedDisk | BackupRecord,
        path: Path | None,
        message: str,
        severity: Severity = "error",
    ) -> None:
        record = item.record if isinstance(item, CheckedDisk) else item
        disk = item.disk.name if isinstance(item, CheckedDisk) else None
        self.problems.append(Problem(record.id, disk, path, message, severity))

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

    def complete_disks(
        self, records: Iterable[BackupRecord], asked: str | None
    ) -> list[CheckedDisk]:
        """The disks of the complete backups in ``records``, oldest first; each incomplete
        backup is a problem, an error if it is the one ``asked`` for."""
        complete: list[CheckedDisk] = []
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
                item = CheckedDisk(record, disk, image, digests_file)
                self.disks[(record.id, disk.name)] = item
                complete.append(item)
        return complete

    def run(self, records: Iterable[BackupRecord], asked: str | None) -> tuple[int, int]:
        """Check the backups ``records``; how many files and blocks were read."""
        complete = self.complete_disks(records, asked)
        files = FileChecks(self.records, self.problem)
        content = ContentChecks(self.disks, self.problem)
        for item in complete:
            if item.disk.parent is not None:
                item.parent = self.disks.get((item.disk.parent, item.disk.name))
            files.check_image(item)
            files.check_digests(item)
        for item in complete:  # oldest first: parents are proven before their children
            content.check(item)
        content.report_mismatches()
        return files.files, content.blocks


def verify(repo: Repository, backup_id: str | None = None) -> VerifyReport:
    """Verify backup ``backup_id`` with every backup its disks' chains go through, or every
    backup of the repository; raises only for an unknown ``backup_id``."""
    verifier = _Verifier(repo)
    verifier.load()
    records = verifier.scope(backup_id)
    files, blocks = verifier.run(records, backup_id)
    report = VerifyReport(
        backup_ids=[r.id for r in records],
        problems=verifier.problems,
        files=files,
        blocks_read=blocks,
    )
    log.info(
        "verify.done",
        backups=report.backups,
        problems=len(report.problems),
        files=report.files,
        blocks=report.blocks_read,
    )
    return report
