"""One-shot backups into a repository (``qmpbackup backup``).

The steps, in order:

1. decide each disk's level from the repository's history and the live graph
   (:func:`qmpbackup.planner.level.decide_levels`);
2. reserve the backup in the repository: an incomplete record and target paths;
3. begin: one transaction sets the instant and creates checkpoint ``backup-<id>``;
4. copy: push waits for QEMU's jobs; pull reads the exports with the built-in client;
5. end the backup job, so QEMU lets go of every node, export and scratch file;
6. seal each image (:mod:`qmpbackup.repo.seal`): a push incremental gets its
   parent's name as backing file, ``qemu-img check`` passes, and the per-block
   digests are recorded: a pull image's were computed as it was written, a push
   image is read once (an incremental holds only its changed blocks; the others
   are derived from its parent's digests);
7. commit the record, then delete checkpoints that no backup needs any more.

A failure or an interrupt before 7 aborts the job (its checkpoint goes with it)
and discards the reserved backup: the repository is left as it was, and the
next run chains to the last complete backup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..api import VM
from ..errors import DisconnectedError, InvalidInputError, JobFailedError, QmpBackupError
from ..images.keyed import using_key
from ..images.qemu_img import create_encrypted
from ..planner.facts import BeginOptions
from ..planner.level import LevelDecision
from ..qmp.graph import BlockGraph
from ..qmp.migration import Migration, MigrationWatch
from ..request.models import (
    BackupSpec,
    CheckpointSpec,
    DiskBackupSpec,
    EncryptionSpec,
    Mode,
    RequestedLevel,
    SecretSpec,
)
from ..results import BackupBegun
from ..runner import uninterrupted
from .digests import DEFAULT_BLOCK_SIZE
from .encryption import check_encryption
from .events import BackupEvent, EventSink
from .levels import compression_of, decide
from .prune import unneeded_checkpoints
from .records import BackupEntry, DiskRequest
from .records import BackupRecord as RepositoryRecord
from .repository import Repository
from .seal import Hashed, seal
from .transfer import follow_jobs, read_exports

log = structlog.get_logger("qmpbackup.backup")

CHECKPOINT_NAME = "backup-{id}"
# The name of the repository key among the backup's ``--secret``s (push targets).
REPOSITORY_SECRET = "qmpbackup-repository"
# Bytes kept free beside each pull scratch of a one-shot backup, for the guest's writes
# that land while a scratch that filled its room is being let go of.
DEFAULT_SCRATCH_RESERVE = 256 << 20


@dataclass(frozen=True)
class RepositoryBackup:
    """A finished repository backup: its record, why each disk got its level, and the
    checkpoints deleted because no backup needs them any more."""

    record: RepositoryRecord
    decisions: tuple[LevelDecision, ...]
    released: tuple[str, ...]


def _disk_requests(graph: BlockGraph, decisions: Sequence[LevelDecision]) -> list[DiskRequest]:
    return [
        DiskRequest(
            name=d.disk,
            virtual_size=graph.top_node(d.disk).virtual_size,
            level=d.level,
            source=graph.image_path(graph.top_node(d.disk)),
            digest_block_size=DEFAULT_BLOCK_SIZE,
        )
        for d in decisions
    ]


def _backup_spec(
    graph: BlockGraph,
    entry: BackupEntry,
    decisions: Sequence[LevelDecision],
    mode: Mode,
    encrypted: bool = False,
) -> BackupSpec:
    """The ``<domainbackup>`` of this run: every other disk of the VM is left out;
    ``encrypted``: push targets are LUKS qcow2 keyed by :data:`REPOSITORY_SECRET`."""
    encryption = EncryptionSpec(secret=SecretSpec(usage=REPOSITORY_SECRET)) if encrypted else None
    chosen = {d.disk: d for d in decisions}
    disks = []
    for name in graph.disks:
        decision = chosen.get(name)
        if decision is None:
            disks.append(DiskBackupSpec(name=name, backup=False))
            continue
        disks.append(
            DiskBackupSpec(
                name=name,
                backupmode="full" if decision.level == "full" else "incremental",
                incremental=decision.since,
                target=str(entry.target(name).image) if mode == "push" else None,
                format="qcow2" if mode == "push" else None,
                encryption=encryption if mode == "push" else None,
                # An encrypted push target is made beforehand: see _create_encrypted.
                reuse=encryption is not None and mode == "push",
            )
        )
    return BackupSpec(mode=mode, disks=tuple(disks))


async def _create_encrypted(
    graph: BlockGraph, entry: BackupEntry, decisions: Sequence[LevelDecision], linked: bool
) -> None:
    """Create the LUKS-encrypted qcow2 images of an encrypted backup, one process per
    disk at once: each costs ~2.4 s of CPU in QEMU's PBKDF2 timing, which the VM's QEMU
    (``blockdev-create``) would spend with its main loop, and the guest's I/O, stopped.
    ``linked``: an incremental's names its parent as backing file now (pull; a push
    image gets it when sealed). Raises ImageError."""

    def create(disk: str) -> None:
        target = entry.target(disk)
        backing = target.backing if linked else None
        create_encrypted(target.image, graph.top_node(disk).virtual_size, backing)

    # In this task's context: the key of keyed.using_key.
    await asyncio.gather(*(asyncio.to_thread(create, d.disk) for d in decisions))


def discard_incomplete(repo: Repository) -> list[str]:
    """Discard backups an interrupted run left incomplete; return their checkpoints."""
    dropped = []
    for record in repo.backups(complete_only=False):
        if not record.complete:
            log.warning("backup.discard-incomplete", id=record.id)
            repo.discard(record)
            if record.checkpoint:
                dropped.append(record.checkpoint)
    return dropped


async def release_checkpoints(
    vm: VM, names: Sequence[str], emit: EventSink | None = None
) -> list[str]:
    """Delete those of ``names`` that are checkpoints of ``vm`` (say, what a backup or
    :func:`~qmpbackup.repo.prune.prune` released); return the names deleted.

    A failure is logged, not raised: a checkpoint left behind costs only bitmap upkeep.
    """
    existing = {c.name for c in vm.checkpoints()}
    released = []
    for name in names:
        if name not in existing:
            continue
        try:
            await vm.checkpoint_delete(name)
        except QmpBackupError as exc:
            log.warning("backup.release-failed", checkpoint=name, error=str(exc))
            continue
        released.append(name)
        if emit is not None:
            emit(BackupEvent("released", message=name))
    return released


class _OneShot:
    """One repository backup as it runs, and what it has begun in QEMU, so that a
    failure can take back exactly that."""

    def __init__(
        self,
        vm: VM,
        repo: Repository,
        entry: BackupEntry,
        decisions: Sequence[LevelDecision],
        mode: Mode,
        emit: EventSink,
        options: BeginOptions,
    ) -> None:
        self.vm, self.repo, self.entry, self.mode, self.emit = vm, repo, entry, mode, emit
        self.options = options
        self.decisions = decisions
        self.job: BackupBegun | None = None  # begun in QEMU and not ended yet
        assert entry.record.checkpoint is not None
        self.checkpoint = entry.record.checkpoint

    async def run(self, graph: BlockGraph, recover: bool) -> RepositoryRecord:
        """Begin, copy, end, seal and commit; the complete record."""
        entry = self.entry
        if self.options.secrets:
            await _create_encrypted(graph, entry, self.decisions, self.mode == "pull")
        self.job = await self.vm.backup_begin(
            _backup_spec(graph, entry, self.decisions, self.mode, bool(self.options.secrets)),
            CheckpointSpec(name=self.checkpoint, description=f"qmpbackup {entry.id}"),
            options=self.options,
            owned=True,
            recover=recover,
        )
        if self.job.frozen_seconds is not None:
            self.emit(BackupEvent("quiesced", backup=entry.id, seconds=self.job.frozen_seconds))
        self.emit(BackupEvent("begin", backup=entry.id, message=f"checkpoint {self.checkpoint}"))
        hashed: dict[str, Hashed] = {}
        if self.mode == "push":
            written = await follow_jobs(self.vm, self.job, self.emit)
        else:
            levels = {d.disk: d for d in self.decisions}
            copies = await read_exports(self.vm, entry, self.job, levels, self.emit)
            written = {d: c.data_bytes + c.zero_bytes for d, c in copies.items()}
            hashed = {
                d: Hashed(c.blocks, c.file_digest)
                for d, c in copies.items()
                if c.blocks is not None and c.file_digest is not None
            }
        ended = await self.vm.backup_end(self.job.record.id)
        self.job = None
        if ended.outcome != "completed":
            detail = "; ".join(
                f"{d} into {entry.target(d).image}: {e}" for d, e in ended.errors.items()
            )
            raise JobFailedError(f"backup {entry.id} {ended.outcome}: {detail}")
        file_digests = {}
        for decision in self.decisions:
            disk = decision.disk
            sealed = await asyncio.to_thread(
                seal,
                self.repo,
                entry,
                disk,
                link=self.mode == "push",
                hashed=hashed.get(disk),
            )
            file_digests[disk] = sealed.file_digest
            how = f"digests of {sealed.blocks_read} blocks read"
            if sealed.blocks_hashed:
                how = f"digests of {sealed.blocks_hashed} blocks taken while copying"
            self.emit(
                BackupEvent(
                    "disk-done",
                    backup=entry.id,
                    disk=disk,
                    level=decision.level,
                    done=written.get(disk, 0),
                    message=f"checked, {how}",
                )
            )
        return await self._commit(file_digests)

    async def _commit(self, file_digests: dict[str, str]) -> RepositoryRecord:
        """Record the granularity and creation time of the checkpoint made, and the
        images' file digests, and commit."""
        graph = await self.vm.graph()
        granularity = {}
        for decision in self.decisions:
            bitmap = graph.top_node(decision.disk).bitmap(self.checkpoint)
            if bitmap is not None:
                granularity[decision.disk] = bitmap.granularity
        made = next((c for c in self.vm.checkpoints() if c.name == self.checkpoint), None)
        return self.repo.commit(
            self.entry,
            checkpoint_time=None if made is None else made.creation_time,
            granularity=granularity,
            file_digests=file_digests,
        )

    async def abandon(self, why: str) -> None:
        """Abort QEMU's part of the backup, then remove the reserved backup's files.

        An aborted job drops its checkpoint itself; once the job has ended, the
        checkpoint is deleted here, since no backup will hold what it promises.
        """
        if self.job is not None:
            try:
                await self.vm.backup_end(self.job.record.id, abort=True)
            except QmpBackupError as exc:
                log.error("backup.abort-failed", id=self.job.record.id, error=str(exc))
        else:
            await release_checkpoints(self.vm, [self.checkpoint])
        self.repo.discard(self.entry)
        # The caller reports why in its one line; this is for -v.
        log.info("backup.abandoned", id=self.entry.id, reason=why)
        self.emit(BackupEvent("aborted", backup=self.entry.id, message=why))

    async def watched(
        self, graph: BlockGraph, recover: bool
    ) -> tuple[RepositoryRecord, Migration | None]:
        """:meth:`run`, and a live migration begun meanwhile.  On failure or cancellation,
        :meth:`abandon` and raise (naming a migration that QEMU went away after)."""
        watch = MigrationWatch(self.vm.session)
        try:
            async with watch.watching():
                record = await self.run(graph, recover)
                return record, await watch.outcome()
        except BaseException as exc:
            seen = watch.seen
            if seen is not None:
                self.emit(BackupEvent("migration", backup=self.entry.id, message=seen.describe()))
            why = "interrupted" if isinstance(exc, asyncio.CancelledError) else str(exc)
            await self.abandon(why)
            if isinstance(exc, DisconnectedError) and seen is not None:
                raise DisconnectedError(f"{exc}, after {seen.describe()}") from exc
            raise


async def backup_to_repository(
    vm: VM,
    root: Path | str,
    *,
    level: RequestedLevel = "auto",
    mode: Mode = "push",
    disks: Sequence[str] | None = None,
    on_event: EventSink | None = None,
    recover: bool = False,
    scratch_reserve: int = DEFAULT_SCRATCH_RESERVE,
    quiesce: bool = False,
    guest_agent: str | None = None,
    encrypt_key: Path | None = None,
    compress: bool = False,
) -> RepositoryBackup:
    """Back up ``disks`` (default: all) of ``vm`` into the repository at ``root``: levels
    decided per disk, begin, copy, digests and check, commit, end; then the checkpoints
    no backup of the repository needs any more are deleted.

    A pull backup's scratches grow with what the guest overwrites, ``scratch_reserve``
    bytes kept free beside each; one that fills its room ends the backup
    (ScratchFullError) before the guest's writes could fail.  ``quiesce``: the guest's
    filesystems are frozen around the instant (see :meth:`VM.backup_begin`).
    ``encrypt_key``: a file whose bytes are the passphrase of the repository's LUKS
    images, which QEMU writes (pull: qemu-nbd); see :mod:`qmpbackup.repo.encryption`.
    ``compress``: the images hold qcow2 compressed clusters (zstd, or zlib where this
    QEMU has no zstd); a chain stored otherwise is not continued (a new full starts).

    On failure or cancellation the backup job is aborted and the repository is left as
    it was, and the error is raised: PlanError when an explicit inc/diff cannot be had,
    LeftoversError over an earlier run's leftovers (``recover`` cleans them first),
    RepositoryError, JobFailedError or QMPCommandError at run time.
    """
    emit: EventSink = on_event or (lambda event: None)
    if compress and encrypt_key is not None:
        # qemu-img: "Compression and encryption not supported at the same time".
        raise InvalidInputError(
            "--compress and --encrypt-key cannot be combined: QEMU's qcow2 does not write "
            "compressed clusters into an encrypted image"
        )
    compression = compression_of(vm, compress, emit)
    repo = Repository(Path(root), vm.key)
    with repo.exclusive(), using_key(encrypt_key):
        stale = discard_incomplete(repo)
        check_encryption(repo, encrypt_key)
        graph = await vm.graph()
        decisions = decide(repo, vm, graph, level, disks, emit, compression)
        entry = repo.begin_backup(
            _disk_requests(graph, decisions),
            mode=mode,
            checkpoint=CHECKPOINT_NAME,
            encrypted=encrypt_key is not None,
            compression=compression,
        )
        # This process watches its scratches while it reads them: they need not reserve
        # their disks' whole size. It reads each push target once its job is done:
        # through the page cache, that read is from memory (1 GiB of random data, QEMU
        # 7.2: begin to sealed 0.96-0.99 s buffered, 1.34-1.35 s O_DIRECT). Raw disks
        # and pflash NVRAM get a non-persistent bitmap in the checkpoint: the next run
        # takes an incremental of them while this QEMU still runs.
        options = BeginOptions(
            scratch_reserve=scratch_reserve,
            direct_io=False,
            quiesce=quiesce,
            guest_agent=guest_agent,
            volatile_bitmaps=True,
            secrets={} if encrypt_key is None else {REPOSITORY_SECRET: str(encrypt_key.absolute())},
            compress=compression,
        )
        run = _OneShot(vm, repo, entry, decisions, mode, emit, options)
        record, migration = await run.watched(graph, recover)
        emit(BackupEvent("committed", backup=entry.id))
        if migration is not None:
            emit(BackupEvent("migration", message=migration.describe()))
        # Once the VM migrated away, its images are the other QEMU's to change.
        moved = migration is not None and migration.moved
        doomed = [] if moved else stale + unneeded_checkpoints(repo)
        # Committed: a stop signal now lets the release finish and the run end complete.
        released = await uninterrupted(release_checkpoints(vm, doomed, emit))
    return RepositoryBackup(record=record, decisions=tuple(decisions), released=tuple(released))
