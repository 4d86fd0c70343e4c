"""Prune a repository: keep the newest N complete backups and fold the older ones away.

A kept backup whose disk chains to a dropped backup gets that disk flattened into a
standalone qcow2 with the same content. The order of operations keeps every complete
record's chain openable and equal to its recorded digests at every instant, so a crash
anywhere leaves a correct repository:

1. Plan, changing nothing (a broken chain refuses the whole prune).
2. Convert each such chain into a hidden temporary file in the disk's folder, check it
   (no backing file, the recorded size, every block equal to the recorded digests) and
   fsync it. Any failure removes the temporary files: the repository is unchanged.
3. Rename each checked file onto the kept backup's own image name, then fsync the
   folder. The content under that name is the same before and after, so the backups
   built on it stay valid; its record still names the old parent, which still exists.
4. Rewrite each kept record: the disk is full, without parent, with the new file's
   digest and the folded ids in ``merged``. A crash between 3 and 4 leaves a standalone
   image whose record names a parent; the next prune finds it, checks it against the
   digests and rewrites the record without converting again.
5. Remove the dropped backups newest first with :meth:`Repository.remove`, which deletes
   a record before its files and refuses while a complete backup names it as a parent.
6. Delete the files no record references (a crash in 5) and hidden temporary files of an
   earlier prune or restore (a crash in 2).

Prune holds :meth:`Repository.exclusive` (no backup runs meanwhile) and needs room for
all the flattened images at once. It never talks to QEMU: the caller deletes the
checkpoints it reports as released.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..errors import InvalidInputError
from ..files import fsync_dir
from ..images.qemu_img import image_info
from .digests import file_digest
from .instant import check_prune
from .records import (
    BACKUP_ID_RE,
    DIGESTS_SUFFIX,
    IMAGE_SUFFIX,
    RECORDS_DIR,
    BackupRecord,
    DiskRecord,
    RepositoryError,
    backup_level,
)
from .repository import Repository
from .restore import (
    build_checked,
    check_standalone,
    recorded_digests,
    temporary_file,
)

log = structlog.get_logger("qmpbackup.prune")

_TEMP_MARKS = (".prune-", ".restore-")


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` did, or would do with ``dry_run``."""

    kept: tuple[str, ...]
    removed: tuple[str, ...]
    rebased: tuple[str, ...]
    rebased_disks: tuple[tuple[str, str], ...]
    released: tuple[str, ...]
    orphans: tuple[Path, ...]
    bytes_freed: int
    dry_run: bool
    # Stale instant-restore markers, explained (and cleared with ``clear_stale``).
    instant: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Rebase:
    """One disk of a kept backup to make standalone."""

    record: BackupRecord
    disk: DiskRecord
    folded: tuple[str, ...]  # the ancestors whose content goes into it, oldest first
    chain: list[Path]  # base first
    image: Path
    convert: bool  # False: an interrupted prune made the image standalone already


def needed_checkpoints(records: Iterable[BackupRecord]) -> set[str]:
    """Checkpoints the next backups need: per disk, that of its newest complete backup
    (an incremental's base) and of its newest complete full backup (a differential's)."""
    newest: dict[str, BackupRecord] = {}
    newest_full: dict[str, BackupRecord] = {}
    for record in sorted((r for r in records if r.complete), key=lambda r: r.seq):
        for disk in record.disks:
            newest[disk.name] = record
            if disk.level == "full":
                newest_full[disk.name] = record
    return {
        r.checkpoint for r in (*newest.values(), *newest_full.values()) if r.checkpoint is not None
    }


def _unneeded(records: list[BackupRecord], needed: set[str]) -> list[str]:
    names: list[str] = []
    for record in records:
        name = record.checkpoint
        if name is not None and name not in needed and name not in names:
            names.append(name)
    return names


def unneeded_checkpoints(repo: Repository) -> list[str]:
    """Checkpoints named by complete backups that no next backup needs, in record order."""
    records = repo.backups()
    return _unneeded(records, needed_checkpoints(records))


def _ancestors(
    records: dict[str, BackupRecord], record: BackupRecord, disk: str
) -> list[BackupRecord]:
    """The backups ``disk`` of ``record`` chains to, oldest first."""
    found: list[BackupRecord] = []
    current = record
    while (parent_id := Repository.disk_record(current, disk).parent) is not None:
        parent = records.get(parent_id)
        if parent is None or parent.seq >= current.seq:
            raise RepositoryError(
                f"backup {current.id}, disk {disk}: parent {parent_id} is not a complete, "
                "older backup"
            )
        found.append(parent)
        current = parent
    return found[::-1]


def _plan_rebases(
    repo: Repository, records: dict[str, BackupRecord], kept: list[BackupRecord]
) -> list[_Rebase]:
    keep_ids = {r.id for r in kept}
    plan: list[_Rebase] = []
    for record in kept:
        for disk in record.disks:
            if disk.parent is None:
                continue
            image = repo.image_path(record, disk.name)
            standalone = image_info(image).get("backing-filename") is None
            if disk.parent in keep_ids and not standalone:
                continue
            chain = repo.chain(record.id, disk.name)  # refuses a broken chain
            folded: list[str] = []
            for ancestor in _ancestors(records, record, disk.name):
                folded += [*ancestor.merged, ancestor.id]
            plan.append(_Rebase(record, disk, tuple(folded), chain, image, convert=not standalone))
    return plan


def _rewritten(
    records: dict[str, BackupRecord], record: BackupRecord, done: dict[str, str]
) -> BackupRecord:
    """``record`` with the disks in ``done`` (name: new file digest) made full."""
    disks = tuple(
        d.model_copy(
            update={
                "level": "full",
                "parent": None,
                "parent_file": None,
                "file_digest": done[d.name],
            }
        )
        if d.name in done
        else d
        for d in record.disks
    )
    parents = [records[d.parent] for d in disks if d.parent is not None]
    newest = max(parents, key=lambda r: r.seq, default=None)
    return record.model_copy(
        update={
            "disks": disks,
            "level": backup_level(disks),
            "parent": None if newest is None else newest.id,
        }
    )


def _merged(record: BackupRecord, rebases: list[_Rebase]) -> tuple[str, ...]:
    merged = list(record.merged)
    for rebase in rebases:
        merged += [i for i in rebase.folded if i not in merged]
    return tuple(merged)


def _size(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _disk_dirs(repo: Repository) -> list[Path]:
    if not repo.base.is_dir():
        return []
    return sorted(
        p
        for p in repo.base.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name != RECORDS_DIR and p.name[0] != "."
    )


def _orphans(repo: Repository, records: Iterable[BackupRecord]) -> list[Path]:
    """Backup files no record references, and temporary files of a prune or restore."""
    referenced = {
        repo.disk_dir(d.name) / name
        for r in records
        for d in r.disks
        for name in (d.file, d.digests_file)
    }
    found: list[Path] = []
    for folder in _disk_dirs(repo):
        for path in sorted(folder.iterdir()):
            name = path.name
            if not path.is_file() or path.is_symlink():
                continue
            if name.startswith("."):
                if any(mark in name for mark in _TEMP_MARKS):
                    found.append(path)
                continue
            for suffix in (IMAGE_SUFFIX, DIGESTS_SUFFIX):
                stem = name.removesuffix(suffix)
                if stem != name and BACKUP_ID_RE.match(stem) and path not in referenced:
                    found.append(path)
    return found


def prune(
    repo: Repository, keep: int | None, dry_run: bool = False, clear_stale: bool = False
) -> PruneResult:
    """Keep the ``keep`` newest complete backups; flatten the chains of kept disks that
    depend on older ones, remove the older ones and the files no record references.
    With ``dry_run``, only say what would be done. RepositoryError, before anything
    changes, when an image to remove or replace is read by an instant restore (or held
    by a stale marker, unless ``clear_stale``, which removes stale markers). With
    ``keep`` None, only ``clear_stale`` is done; InvalidInputError if it is not asked
    for, or if ``keep`` is below 1."""
    if keep is None:
        if not clear_stale:
            raise InvalidInputError("prune needs --keep N, or --clear-stale-instant alone")
        return _clear_stale(repo, dry_run)
    if keep < 1:
        raise InvalidInputError(f"keep must be at least 1, not {keep}")
    if dry_run:
        return _prune(repo, keep, dry_run=True, clear_stale=clear_stale)
    with repo.exclusive():
        return _prune(repo, keep, dry_run=False, clear_stale=clear_stale)


def _clear_stale(repo: Repository, dry_run: bool) -> PruneResult:
    """Only the stale instant-restore markers cleared; every backup kept."""
    with contextlib.nullcontext() if dry_run else repo.exclusive():
        lines = check_prune(repo, (), clear_stale=True, dry_run=dry_run)
        kept = tuple(r.id for r in repo.backups())
    return PruneResult(kept, (), (), (), (), (), 0, dry_run, tuple(lines))


def _prune(repo: Repository, keep: int, *, dry_run: bool, clear_stale: bool) -> PruneResult:
    complete = repo.backups()
    everything = repo.backups(complete_only=False)
    records = {r.id: r for r in complete}
    kept, dropped = complete[-keep:], complete[:-keep]
    rebases = _plan_rebases(repo, records, kept)

    by_record: dict[str, list[_Rebase]] = {}
    for rebase in rebases:
        by_record.setdefault(rebase.record.id, []).append(rebase)
    # The records as they will be, file digests aside: for the checkpoints.
    after = [
        _rewritten(records, r, {x.disk.name: "" for x in by_record.get(r.id, [])}) for r in kept
    ]
    released = _unneeded(complete, needed_checkpoints(after))
    orphans = _orphans(repo, everything)
    dropped_files = [
        path
        for r in dropped
        for d in r.disks
        for path in (repo.image_path(r, d.name), repo.digests_path(r, d.name))
    ]
    freed = sum(_size(p) for p in (*dropped_files, *orphans))
    replaced = [x.image for x in rebases if x.convert]
    instant = check_prune(repo, [*dropped_files, *replaced], clear_stale, dry_run)
    log.info(
        "prune.plan",
        keep=keep,
        remove=[r.id for r in dropped],
        rebase=[(x.record.id, x.disk.name) for x in rebases],
        orphans=[str(p) for p in orphans],
        dry_run=dry_run,
    )
    if not dry_run:
        freed -= _rebase(repo, records, by_record)
        for record in reversed(dropped):
            repo.remove(record.id)
            log.info("prune.removed", backup=record.id)
        for path in orphans:
            path.unlink(missing_ok=True)
            log.info("prune.orphan-removed", path=str(path))
        for folder in {p.parent for p in orphans}:
            fsync_dir(folder)
    return PruneResult(
        kept=tuple(r.id for r in kept),
        removed=tuple(r.id for r in dropped),
        rebased=tuple(by_record),
        rebased_disks=tuple((x.record.id, x.disk.name) for x in rebases),
        released=tuple(released),
        orphans=tuple(orphans),
        bytes_freed=freed,
        dry_run=dry_run,
        instant=tuple(instant),
    )


def _rebase(
    repo: Repository, records: dict[str, BackupRecord], by_record: dict[str, list[_Rebase]]
) -> int:
    """Steps 2 to 4 of the module's docstring; how many bytes the images grew."""
    rebases = [x for group in by_record.values() for x in group]
    grown = 0
    digests: dict[tuple[str, str], str] = {}
    temps: dict[Path, Path] = {}
    # Leaving the stack removes the temporary files not renamed onto an image.
    with contextlib.ExitStack() as stack:
        for rebase in rebases:
            what = f"flattening backup {rebase.record.id}, disk {rebase.disk.name}"
            expected = recorded_digests(repo, rebase.record, rebase.disk)
            if rebase.convert:
                temp = stack.enter_context(
                    temporary_file(rebase.image.parent, f".{rebase.image.name}.prune-")
                )
                encrypt = rebase.record.encryption is not None
                compression = rebase.record.compression
                _, whole = build_checked(
                    rebase.chain, temp, "qcow2", expected, what, encrypt, compression
                )
                grown += _size(temp) - _size(rebase.image)
                temps[rebase.image] = temp
            else:
                check_standalone(rebase.image, "qcow2", expected, what)
                temp, whole = rebase.image, None
            digests[(rebase.record.id, rebase.disk.name)] = whole or file_digest(
                temp, rebase.record.format
            )
        # Only now, with every flattened image checked, does anything visible change.
        for image, temp in temps.items():
            os.replace(temp, image)
            fsync_dir(image.parent)
            log.info("prune.flattened", image=str(image))
    for record_id, group in by_record.items():
        record = records[record_id]
        done = {x.disk.name: digests[(record_id, x.disk.name)] for x in group}
        new = _rewritten(records, record, done)
        new = new.model_copy(update={"merged": _merged(record, group)})
        repo.rewrite(new)
        records[record_id] = new
        log.info("prune.rebased", backup=record_id, disks=sorted(done), merged=new.merged)
    return grown
