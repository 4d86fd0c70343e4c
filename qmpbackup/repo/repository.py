"""The backup repository on disk: image files, their chains and one record per backup.

Layout of a repository ``<repo>``::

    <repo>/<vm>/.lock                         flock(2) held while records change
    <repo>/<vm>/.run.lock                     flock(2) held by a backup or a prune
    <repo>/<vm>/backups/<backup-id>.json      one record per backup (qmpbackup.repo.records)
    <repo>/<vm>/<disk>/<backup-id>.qcow2      the image of that disk in that backup
    <repo>/<vm>/<disk>/<backup-id>.digests    per-block digests (qmpbackup.repo.digests)

An incremental or differential image's backing file is its parent's file name,
relative (``20260101T000000Z-1.qcow2``), so ``qemu-img`` and QEMU open any point of a
chain directly and the repository can be moved. The order of backups is the sequence
number in the records (the ``-N`` of the id), never file times.

A backup is reserved by :meth:`Repository.begin_backup`, which writes its record with
``complete: false``; :meth:`Repository.commit` rewrites it with ``complete: true``. Every
record write is atomic (temporary name, fsync, rename, fsync of the folder). Only
complete backups are listed by default, taken as parents or restored; an incomplete one
(a crash, an interrupt) is removed with :meth:`Repository.discard`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from ..errors import InvalidInputError, one_line
from ..files import advisory_lock, atomic_write_text
from ..request.models import Level, Mode, check_name
from .digests import CURRENT_FORMAT, file_digest
from .locks import run_lock_busy
from .records import (
    DIGESTS_SUFFIX,
    IMAGE_SUFFIX,
    RECORDS_DIR,
    BackupEntry,
    BackupRecord,
    Compression,
    DiskRecord,
    DiskRequest,
    DiskTarget,
    RecordError,
    RepositoryError,
    backup_level,
    check_backup_id,
    check_disk_name,
)


def _valid(name: str, what: str) -> str:
    try:
        return check_disk_name(name) if what == "disk" else check_name(name, what)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


class Repository:
    """The backups of one VM in repository ``root``."""

    def __init__(self, root: Path | str, vm: str) -> None:
        self.root = Path(root).absolute()
        self.vm = _valid(vm, "vm")
        self.base = self._inside(self.root / self.vm)
        self.records_dir = self.base / RECORDS_DIR

    @classmethod
    def open(cls, root: Path | str, vm: str | None = None) -> Repository:
        """The repository of ``vm`` at ``root``; without ``vm``, of its only VM."""
        if vm is not None:
            return cls(root, vm)
        root = Path(root)
        if not root.is_dir():
            raise InvalidInputError(f"no repository at {root}")
        vms = sorted(p.name for p in root.iterdir() if (p / RECORDS_DIR).is_dir())
        if len(vms) != 1:
            found = ", ".join(vms) or "none"
            raise InvalidInputError(f"name the VM with --vm: {root} holds VMs {found}")
        return cls(root, vms[0])

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise InvalidInputError(f"path {path} escapes the repository {self.root}")
        return path

    def disk_dir(self, disk: str) -> Path:
        """The folder of disk ``disk``."""
        return self._inside(self.base / _valid(disk, "disk"))

    def record_path(self, backup_id: str) -> Path:
        """The record file of backup ``backup_id``."""
        try:
            check_backup_id(backup_id)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        return self._inside(self.records_dir / f"{backup_id}.json")

    def image_path(self, record: BackupRecord, disk: str) -> Path:
        """The image file of ``disk`` in ``record``."""
        return self.disk_dir(disk) / self.disk_record(record, disk).file

    def digests_path(self, record: BackupRecord, disk: str) -> Path:
        """The digests file of ``disk`` in ``record``."""
        return self.disk_dir(disk) / self.disk_record(record, disk).digests_file

    @staticmethod
    def disk_record(record: BackupRecord, disk: str) -> DiskRecord:
        """The entry of ``disk`` in ``record``; RepositoryError if it has none."""
        found = record.disk(disk)
        if found is None:
            raise RepositoryError(f"backup {record.id} has no disk {disk!r}")
        return found

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the records lock (``.lock``), waiting for it: records change one at a time."""
        self.records_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with advisory_lock(self.base / ".lock"):
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the run lock of this VM's backups (a backup or a prune); refuse to wait.

        Raises RepositoryError at once if another run holds it, naming that run.
        """
        self.records_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.base / ".run.lock"
        with advisory_lock(lock, lambda holder: run_lock_busy(self.base, lock, holder)):
            yield

    def record_paths(self) -> list[Path]:
        """The record files, in no particular order (temporary files left out)."""
        if not self.records_dir.is_dir():
            return []
        return [p for p in self.records_dir.iterdir() if p.suffix == ".json" and p.name[0] != "."]

    def load_record(self, path: Path) -> BackupRecord:
        """The record in ``path``; RepositoryError if it is unreadable or misnamed."""
        try:
            record = BackupRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise RecordError(path, f"unreadable backup record: {one_line(exc)}") from None
        if f"{record.id}.json" != path.name:
            raise RecordError(path, f"the record holds backup {record.id}")
        return record

    def _write(self, record: BackupRecord) -> None:
        path = self.record_path(record.id)
        try:
            atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
        except OSError as exc:
            raise RepositoryError(
                f"backup {record.id}: cannot write {path}: {exc.strerror}"
            ) from None

    def _all(self) -> list[BackupRecord]:
        records = [self.load_record(p) for p in self.record_paths()]
        records.sort(key=lambda r: r.seq)
        return records

    def backups(self, complete_only: bool = True) -> list[BackupRecord]:
        """Backups, oldest first by their sequence number; only complete ones by default."""
        return [r for r in self._all() if r.complete or not complete_only]

    def get(self, backup_id: str) -> BackupRecord:
        """The record of backup ``backup_id`` (complete or not)."""
        path = self.record_path(backup_id)
        if not path.exists():
            raise InvalidInputError(f"no backup {backup_id} in {self.base}")
        return self.load_record(path)

    def latest(self, disk: str) -> BackupRecord | None:
        """The newest complete backup that holds ``disk``."""
        _valid(disk, "disk")
        return next((r for r in reversed(self.backups()) if r.disk(disk)), None)

    def parent_for(self, disk: str, level: Level) -> BackupRecord | None:
        """The backup a ``level`` backup of ``disk`` chains to: none for full, the newest
        complete backup of the disk for inc, its newest complete full backup for diff."""
        _valid(disk, "disk")
        if level == "full":
            return None
        for record in reversed(self.backups()):
            found = record.disk(disk)
            if found is not None and (level == "inc" or found.level == "full"):
                return record
        return None

    def chain(self, backup_id: str, disk: str) -> list[Path]:
        """The image files of ``disk`` from its full backup to ``backup_id``, in order."""
        paths: list[Path] = []
        seen: set[str] = set()
        current: str | None = backup_id
        child: DiskRecord | None = None
        while current is not None:
            if current in seen:
                raise RepositoryError(f"backup chain of {disk} loops at {current}")
            seen.add(current)
            record = self.get(current)
            if not record.complete:
                raise RepositoryError(f"backup {current} is not complete")
            entry = self.disk_record(record, disk)
            if child is not None and child.parent_file != entry.file:
                raise RepositoryError(
                    f"backup chain of {disk}: {child.file} names parent file "
                    f"{child.parent_file}, backup {current} has {entry.file}"
                )
            paths.append(self.disk_dir(disk) / entry.file)
            current, child = entry.parent, entry
        return paths[::-1]

    # Life cycle.

    def begin_backup(
        self,
        disks: Sequence[DiskRequest],
        *,
        mode: Mode,
        checkpoint: str | None = None,
        checkpoint_time: int | None = None,
        now: datetime | None = None,
        encrypted: bool = False,
        compression: Compression | None = None,
    ) -> BackupEntry:
        """Reserve the next backup id and write its incomplete record; return the targets.

        Each disk chains to :meth:`parent_for` its level; an inc or diff without a
        parent is refused. ``{id}`` in ``checkpoint`` becomes the new backup id.
        """
        if not disks:
            raise InvalidInputError("a backup needs at least one disk")
        names = [_valid(d.name, "disk") for d in disks]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"disk named twice in {names}")
        created = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        with self._locked():
            seq = max((r.seq for r in self._all()), default=0) + 1
            backup_id = f"{created:%Y%m%dT%H%M%SZ}-{seq}"
            if checkpoint is not None:
                checkpoint = _valid(checkpoint.replace("{id}", backup_id), "checkpoint")
            reserved = [self._reserve_disk(backup_id, req) for req in disks]
            disk_records = tuple(disk for disk, _, _ in reserved)
            targets = tuple(target for _, target, _ in reserved)
            parents = [parent for _, _, parent in reserved if parent is not None]
            newest = max(parents, key=lambda r: r.seq, default=None)
            record = BackupRecord(
                id=backup_id,
                seq=seq,
                level=backup_level(disk_records),
                parent=None if newest is None else newest.id,
                checkpoint=checkpoint,
                checkpoint_time=checkpoint_time,
                created=created,
                mode=mode,
                format=CURRENT_FORMAT,
                encryption="luks" if encrypted else None,
                digest_key="blake3-derive-key" if encrypted else None,
                complete=False,
                compression=compression,
                disks=disk_records,
            )
            for target in targets:
                target.image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write(record)
        return BackupEntry(record=record, targets=targets)

    def _reserve_disk(
        self, backup_id: str, req: DiskRequest
    ) -> tuple[DiskRecord, DiskTarget, BackupRecord | None]:
        """The record and target of disk ``req`` in new backup ``backup_id``, and the
        backup it chains to; refused if it has no parent its level needs, or if its
        files exist already."""
        parent = self.parent_for(req.name, req.level)
        if req.level != "full" and parent is None:
            want = "backup" if req.level == "inc" else "full backup"
            raise RepositoryError(f"no complete {want} of disk {req.name} for a {req.level} backup")
        parent_disk = None if parent is None else self.disk_record(parent, req.name)
        disk = DiskRecord(
            name=req.name,
            file=f"{backup_id}{IMAGE_SUFFIX}",
            virtual_size=req.virtual_size,
            granularity=req.granularity,
            level=req.level,
            parent=None if parent is None else parent.id,
            parent_file=None if parent_disk is None else parent_disk.file,
            digest_block_size=req.digest_block_size,
            digests_file=f"{backup_id}{DIGESTS_SUFFIX}",
            source=req.source,
        )
        folder = self.disk_dir(req.name)
        for name in (disk.file, disk.digests_file):
            if (folder / name).exists():
                raise RepositoryError(f"{folder / name} exists already")
        target = DiskTarget(
            name=req.name,
            image=folder / disk.file,
            digests=folder / disk.digests_file,
            backing=disk.parent_file,
        )
        return disk, target, parent

    def commit(
        self,
        entry: BackupEntry,
        *,
        checkpoint_time: int | None = None,
        granularity: Mapping[str, int] | None = None,
        file_digests: Mapping[str, str] | None = None,
    ) -> BackupRecord:
        """Mark the backup complete, atomically, once every image and digests file exists;
        record each image file's digest (read now unless ``file_digests`` has it) so that
        any later change to it is found, and what was learnt only after the backup began
        (its checkpoint's time and granularity)."""
        with self._locked():
            record = self.get(entry.id)
            if record.complete:
                raise RepositoryError(f"backup {record.id} is complete already")
            for target in entry.targets:
                for path in (target.image, target.digests):
                    if not path.is_file():
                        raise RepositoryError(f"backup {record.id}: {path} is missing")
            granularity, known = granularity or {}, file_digests or {}
            disks = tuple(
                d.model_copy(
                    update={
                        "file_digest": known.get(d.name)
                        or file_digest(self.image_path(record, d.name), record.format),
                        "granularity": granularity.get(d.name, d.granularity),
                    }
                )
                for d in record.disks
            )
            update: dict[str, object] = {"complete": True, "disks": disks}
            if checkpoint_time is not None:
                update["checkpoint_time"] = checkpoint_time
            done = record.model_copy(update=update)
            self._write(done)
        return done

    def rewrite(self, record: BackupRecord) -> None:
        """Replace the record of a complete backup atomically (prune uses it after
        rebasing a backup's images onto a new base)."""
        with self._locked():
            if not self.get(record.id).complete or not record.complete:
                raise RepositoryError(f"backup {record.id}: only complete records are rewritten")
            self._write(record)

    def dependents(self, backup_id: str) -> list[BackupRecord]:
        """Complete backups that name ``backup_id`` as a disk's parent."""
        return [r for r in self.backups() if any(d.parent == backup_id for d in r.disks)]

    def remove(self, backup_id: str) -> None:
        """Delete a complete backup no other backup depends on: record first, then files,
        so a crash in between leaves unreferenced files, never a record without them."""
        with self._locked():
            record = self.get(backup_id)
            users = [r.id for r in self.dependents(backup_id)]
            if users:
                raise RepositoryError(f"backup {backup_id} is the parent of {', '.join(users)}")
            self.record_path(backup_id).unlink()
            for disk in record.disks:
                self.image_path(record, disk.name).unlink(missing_ok=True)
                self.digests_path(record, disk.name).unlink(missing_ok=True)

    def discard(self, entry: BackupEntry | BackupRecord) -> None:
        """Remove an incomplete backup: its images, digests and then its record."""
        backup_id = entry.id
        with self._locked():
            record = self.get(backup_id)
            if record.complete:
                raise RepositoryError(f"backup {backup_id} is complete: refusing to discard it")
            for disk in record.disks:
                image = self.image_path(record, disk.name)
                image.unlink(missing_ok=True)
                self.digests_path(record, disk.name).unlink(missing_ok=True)
                # A disk's first backup made its folder: gone with it if nothing else is.
                with suppress(OSError):
                    image.parent.rmdir()
            self.record_path(backup_id).unlink(missing_ok=True)
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Remove temporary record files a crash left (``.<id>.json.<random>``)."""
        for path in self.records_dir.iterdir():
            if path.name.startswith(".") and ".json." in path.name:
                path.unlink(missing_ok=True)
