"""The disks of a backup, resolved against the VM, and what planning one disk yields.

Every mode shares this: which disks a request backs up, at which sync level,
into which file (a push target or a pull scratch), and, for an incremental,
the temporary bitmap merged from the checkpoint's layers.  Each mode then
turns a :class:`DiskChoice` into :class:`DiskPieces` (see ``push.py``,
``pull.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import InvalidInputError, PlanError
from ..qapi.commands import (
    BlockdevCreate,
    BlockDirtyBitmapRemove,
    JobDismiss,
    QMPCommand,
)
from ..qmp.graph import BlockGraph
from ..request.models import BackupSpec, CheckpointSpec, DiskBackupSpec
from ..state.active import DiskJob, NbdServer
from ..state.checkpoints import Checkpoint, find_checkpoint
from . import naming
from .chain import merged_bitmap, usable_checkpoint_layers
from .facts import BackupFacts, BeginOptions
from .plan import Step

SyncKind = Literal["full", "top", "incremental"]


class DiskChoice(BaseModel):
    """What the request asks for one disk, resolved against the VM."""

    model_config = ConfigDict(frozen=True)

    disk: str
    sync: SyncKind
    incremental: str | None
    target: str
    format: Literal["qcow2", "raw"]
    reuse: bool
    shallow: bool = False
    export: str | None = None
    export_bitmap: str | None = None
    device: bool = False  # the target or scratch is a block device (type='block')
    secret: str | None = None  # the passphrase's name, for an encrypted target or scratch


@dataclass(frozen=True)
class DiskContext:
    """What every disk of one backup is planned against."""

    graph: BlockGraph
    checkpoints: Sequence[Checkpoint]
    facts: BackupFacts
    choices: Sequence[DiskChoice] = ()  # every disk of the backup
    options: BeginOptions = field(default_factory=BeginOptions)
    server: NbdServer | None = None  # the NBD server of a pull backup


@dataclass
class DiskPieces:
    """One disk's part of a begin plan: steps before the transaction, its actions and their
    undo, steps after it, and the exports (sent once the shared steps have run)."""

    job: DiskJob
    before: list[Step] = field(default_factory=list)
    actions: list[QMPCommand] = field(default_factory=list)
    undo: list[QMPCommand] = field(default_factory=list)
    after: list[Step] = field(default_factory=list)
    exports: list[Step] = field(default_factory=list)


def _spec_entry(spec: BackupSpec, graph: BlockGraph, disk: str) -> DiskBackupSpec | None:
    """The request's entry for ``disk``, named by qdev id or BlockBackend name."""
    return next((d for d in spec.disks if graph.aliases.get(d.name, d.name) == disk), None)


def _backed_up_disks(spec: BackupSpec, graph: BlockGraph) -> list[str]:
    named: dict[str, str] = {}
    for listed in spec.disks:
        resolved = graph.disk(listed.name).name  # unknown names are refused before anything else
        if resolved in named:
            raise InvalidInputError(
                f"disk {resolved!r} is listed twice (as {named[resolved]!r} and {listed.name!r})"
            )
        named[resolved] = listed.name
    chosen: list[str] = []
    for name, disk in graph.disks.items():
        entry = _spec_entry(spec, graph, name)
        if entry is not None and not entry.backup:
            continue
        if entry is None and spec.disks:
            # libvirt: once <disks> lists any disk, an unlisted one is as backup='no'.
            continue
        if entry is None and (disk.read_only or not disk.chain):
            continue
        if not disk.chain:
            raise PlanError(f"disk {name!r} has no medium to back up")
        chosen.append(name)
    if not chosen:
        raise InvalidInputError("the request backs up no disk")
    return chosen


def _incremental_of(
    spec: BackupSpec, entry: DiskBackupSpec | None, checkpoints: Sequence[Checkpoint], disk: str
) -> str | None:
    """The checkpoint ``disk``'s backup copies the changes since, if any."""
    incremental = (entry.incremental if entry else None) or spec.incremental
    if entry is not None and entry.backupmode == "full":
        incremental = None
    if entry is not None and entry.backupmode == "incremental" and incremental is None:
        raise InvalidInputError(f"disk {disk!r}: backupmode='incremental' needs a checkpoint")
    if incremental is not None:
        covered = find_checkpoint(checkpoints, incremental).disk(disk)
        if covered is None or covered.checkpoint != "bitmap":
            raise InvalidInputError(f"checkpoint {incremental!r} does not cover disk {disk!r}")
    return incremental


def choose_disks(
    spec: BackupSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    new_checkpoint: CheckpointSpec | None,
    now: int,
    scratch_dir: str = "",
    backup_id: int = 0,
) -> list[DiskChoice]:
    """Resolve which disks to back up, how, and into which file (push target or pull scratch).

    Raises InvalidInputError for a request that names a disk twice, backs up no disk or
    asks an incremental of a checkpoint that does not cover the disk, UnknownDiskError and
    UnknownCheckpointError for unknown names, PlanError for a disk without a medium.
    """
    suffix = new_checkpoint.named(now).name if new_checkpoint else str(now)
    pull = spec.mode == "pull"
    choices: list[DiskChoice] = []
    for name in _backed_up_disks(spec, graph):
        entry = _spec_entry(spec, graph, name)
        incremental = _incremental_of(spec, entry, checkpoints, name)
        shallow = bool(entry and entry.shallow)
        has_backing = len(graph.disk(name).chain) > 1
        sync: SyncKind = (
            "incremental" if incremental else "top" if shallow and has_backing else "full"
        )
        if pull:
            target = (entry.scratch if entry else None) or (
                f"{scratch_dir}/{naming.fleece_node(backup_id, name)}.qcow2"
            )
        else:
            target = (entry.target if entry else None) or (
                f"{graph.image_path(graph.top_node(name))}.{suffix}"
            )
        choices.append(
            DiskChoice(
                disk=name,
                sync=sync,
                incremental=incremental,
                target=target,
                format="qcow2" if pull else (entry.format if entry else None) or "qcow2",
                reuse=bool(entry and entry.reuse),
                device=bool(entry and entry.type == "block"),
                secret=entry.encryption.secret.name if entry and entry.encryption else None,
                shallow=shallow,
                export=((entry.exportname if entry else None) or name) if pull else None,
                export_bitmap=((entry.exportbitmap if entry else None) or f"backup-{name}")
                if pull and incremental
                else None,
            )
        )
    for attr in ("target", "export"):
        values = [getattr(c, attr) for c in choices if getattr(c, attr)]
        for value in values:
            if values.count(value) > 1:
                raise InvalidInputError(f"two disks would use the same {attr} {value}")
    return choices


def create_steps(command: BlockdevCreate, reason: str, created: tuple[str, ...] = ()) -> list[Step]:
    """A ``blockdev-create`` job, waited for, then dismissed."""
    return [
        Step(command=command, reason=reason, await_job=command.job_id, created_files=created),
        Step(command=JobDismiss(id=command.job_id), reason="forget the finished create job"),
    ]


def add_incremental_bitmap(
    context: DiskContext, choice: DiskChoice, node: str, name: str, pieces: DiskPieces
) -> None:
    """Add to the transaction a disabled bitmap ``name`` on ``node``: the changes since
    the choice's checkpoint, up to the transaction's instant, merged from every layer."""
    assert choice.incremental is not None
    entry = find_checkpoint(context.checkpoints, choice.incremental).disk(choice.disk)
    assert entry is not None and entry.bitmap is not None
    layers = usable_checkpoint_layers(context.graph, choice.disk, entry.bitmap)
    pieces.actions += merged_bitmap(node, name, layers, layers[0].bitmap.granularity)
    pieces.undo.append(BlockDirtyBitmapRemove(node=node, name=name))
