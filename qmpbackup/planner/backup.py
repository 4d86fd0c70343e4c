"""Plans for ``backup-begin`` and ``backup-end`` (push mode)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .. import naming
from ..checkpoints import Checkpoint, CheckpointDisk, find_checkpoint
from ..errors import (
    BackupActiveError,
    InvalidInputError,
    PlanError,
    TargetExistsError,
)
from ..graph import BlockGraph
from ..plan import Plan, Step
from ..qapi.commands import (
    BlockdevAddFile,
    BlockdevAddQcow2,
    BlockdevBackup,
    BlockdevCreate,
    BlockdevDel,
    BlockDirtyBitmapAdd,
    BlockDirtyBitmapRemove,
    CreateFileOptions,
    CreateQcow2Options,
    JobCancel,
    JobDismiss,
    QMPCommand,
    Transaction,
)
from ..records import BackupRecord, DiskJob
from ..spec.models import BackupSpec, CheckpointSpec, DiskBackupSpec
from .chain import (
    image_path,
    merged_bitmap,
    require_persistent_bitmaps,
    usable_checkpoint_layers,
)

SyncKind = Literal["full", "top", "incremental"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DiskChoice(_Frozen):
    """What the request asks for one disk, resolved against the VM."""

    disk: str
    sync: SyncKind
    incremental: str | None
    target: str
    format: Literal["qcow2", "raw"]
    reuse: bool


class BackupFacts(_Frozen):
    """What the caller observed besides the graph: nothing here is looked up by the planner."""

    backup_id: int
    now: int
    existing_files: frozenset[str] = frozenset()
    busy_disks: Mapping[str, int] = {}
    job_ids: frozenset[str] = frozenset()


class BackupPlan(_Frozen):
    """The plan of a ``backup-begin``, the record to keep if it succeeds, and the checkpoint."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    record: BackupRecord
    checkpoint: Checkpoint | None


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
        if entry is None and (disk.read_only or not disk.chain):
            continue
        if not disk.chain:
            raise PlanError(f"disk {name!r} has no medium to back up")
        chosen.append(name)
    if not chosen:
        raise InvalidInputError("the request backs up no disk")
    return chosen


def _default_target(graph: BlockGraph, disk: str, suffix: str) -> str:
    return f"{image_path(graph, graph.top_node(disk))}.{suffix}"


def choose_disks(
    spec: BackupSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    new_checkpoint: CheckpointSpec | None,
    now: int,
) -> list[DiskChoice]:
    """Resolve which disks to back up, how, and into which file."""
    if spec.mode != "push":
        raise PlanError("pull mode is not supported yet: use mode='push'")
    suffix = new_checkpoint.name if new_checkpoint else str(now)
    choices: list[DiskChoice] = []
    for name in _backed_up_disks(spec, graph):
        entry = _spec_entry(spec, graph, name)
        incremental = (entry.incremental if entry else None) or spec.incremental
        if entry is not None and entry.backupmode == "full":
            incremental = None
        if entry is not None and entry.backupmode == "incremental" and incremental is None:
            raise InvalidInputError(f"disk {name!r}: backupmode='incremental' needs a checkpoint")
        if incremental is not None:
            checkpoint = find_checkpoint(checkpoints, incremental)
            covered = checkpoint.disk(name)
            if covered is None or covered.checkpoint != "bitmap":
                raise InvalidInputError(f"checkpoint {incremental!r} does not cover disk {name!r}")
        shallow = bool(entry and entry.shallow)
        has_backing = len(graph.disk(name).chain) > 1
        sync: SyncKind = (
            "incremental" if incremental else "top" if shallow and has_backing else "full"
        )
        fmt = (entry.format if entry else None) or "qcow2"
        target = (entry.target if entry else None) or _default_target(graph, name, suffix)
        choices.append(
            DiskChoice(
                disk=name,
                sync=sync,
                incremental=incremental,
                target=target,
                format=fmt,
                reuse=bool(entry and entry.reuse),
            )
        )
    targets = [c.target for c in choices]
    for target in targets:
        if targets.count(target) > 1:
            raise InvalidInputError(f"two disks would be written to the same target {target}")
    return choices


def _new_checkpoint(
    spec: CheckpointSpec | None,
    disks: Sequence[str],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    parent: str | None,
    now: int,
) -> Checkpoint | None:
    if spec is None:
        return None
    if any(c.name == spec.name for c in checkpoints):
        raise InvalidInputError(f"checkpoint {spec.name!r} already exists")
    for entry in spec.disks:
        graph.disk(entry.name)
        if entry.checkpoint == "bitmap" and entry.name not in disks:
            raise InvalidInputError(f"checkpoint disk {entry.name!r} is not part of this backup")
    entries: list[CheckpointDisk] = []
    for disk in disks:
        listed = next((d for d in spec.disks if graph.aliases.get(d.name, d.name) == disk), None)
        if listed is not None and listed.checkpoint == "no":
            entries.append(CheckpointDisk(name=disk, checkpoint="no"))
            continue
        bitmap = (listed.bitmap if listed else None) or spec.name
        top = require_persistent_bitmaps(graph, disk)
        if top.bitmap(bitmap) is not None:
            raise InvalidInputError(f"disk {disk!r} already has a bitmap named {bitmap!r}")
        entries.append(CheckpointDisk(name=disk, checkpoint="bitmap", bitmap=bitmap))
    return Checkpoint(
        name=spec.name,
        parent=parent,
        creation_time=now,
        description=spec.description,
        disks=tuple(entries),
    )


def _create_steps(
    command: BlockdevCreate, reason: str, created: tuple[str, ...] = ()
) -> list[Step]:
    """A ``blockdev-create`` job, waited for, then dismissed."""
    return [
        Step(command=command, reason=reason, await_job=command.job_id, created_files=created),
        Step(command=JobDismiss(id=command.job_id), reason="forget the finished create job"),
    ]


def _target_steps(
    graph: BlockGraph, choice: DiskChoice, backup_id: int
) -> tuple[list[Step], tuple[str, ...]]:
    """Steps that create (unless reused) and open the target; its node names, top first.

    A raw target is a sparse file of the disk's size used through its protocol
    node; a qcow2 target gets a format node opened without its backing chain.
    """
    disk = choice.disk
    top = graph.top_node(disk)
    raw = choice.format == "raw"
    file_node = naming.target_file_node(backup_id, disk)
    steps: list[Step] = []
    if not choice.reuse:
        options = CreateFileOptions(filename=choice.target, size=top.virtual_size if raw else 0)
        steps += _create_steps(
            BlockdevCreate(job_id=naming.create_job_id(backup_id, disk, "file"), options=options),
            f"create the raw target file of {disk}, sparse, with the disk's size"
            if raw
            else f"create the target file of {disk}",
            (choice.target,),
        )
    steps.append(
        Step(
            command=BlockdevAddFile(node_name=file_node, filename=choice.target),
            reason=f"open {choice.target}" + (f" as the raw target of {disk}" if raw else ""),
            undo=(BlockdevDel(node_name=file_node),),
        )
    )
    if raw:
        return steps, (file_node,)
    fmt_node = naming.target_node(backup_id, disk)
    if not choice.reuse:
        backing_file = backing_fmt = None
        if choice.sync == "top":
            backing = graph.node(graph.disk(disk).chain[1])
            backing_file, backing_fmt = image_path(graph, backing), backing.driver
        qcow2 = CreateQcow2Options(
            file=file_node,
            size=top.virtual_size,
            backing_file=backing_file,
            backing_fmt=backing_fmt,
        )
        steps += _create_steps(
            BlockdevCreate(job_id=naming.create_job_id(backup_id, disk, "qcow2"), options=qcow2),
            f"format the target of {disk} as qcow2"
            + (f" backed by {backing_file}" if backing_file else ""),
        )
    steps.append(
        Step(
            command=BlockdevAddQcow2(node_name=fmt_node, file=file_node, backing=None),
            reason=f"open the qcow2 target of {disk} without its backing chain",
            undo=(BlockdevDel(node_name=fmt_node),),
        )
    )
    return steps, (fmt_node, file_node)


def plan_backup_begin(
    spec: BackupSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    facts: BackupFacts,
    new_checkpoint: CheckpointSpec | None = None,
) -> BackupPlan:
    """Plan a push backup: open the targets, then one transaction for the point in time."""
    choices = choose_disks(spec, graph, checkpoints, new_checkpoint, facts.now)
    backup_id = facts.backup_id
    for choice in choices:
        if choice.disk in facts.busy_disks:
            raise PlanError(
                f"disk {choice.disk!r} is already being backed up by backup id "
                f"{facts.busy_disks[choice.disk]}"
            )
        if not choice.reuse and choice.target in facts.existing_files:
            raise TargetExistsError(
                f"target {choice.target} exists; remove it or ask for reuse (reuse='yes')"
            )
        if choice.reuse and choice.target not in facts.existing_files:
            raise InvalidInputError(f"target {choice.target} to reuse does not exist")
        job = naming.job_id(backup_id, choice.disk)
        if job in facts.job_ids:
            raise PlanError(f"QEMU already has a job {job}: run 'qmpbackup recover'")
    parent = checkpoints[-1].name if checkpoints else None
    checkpoint = _new_checkpoint(
        new_checkpoint, [c.disk for c in choices], graph, checkpoints, parent, facts.now
    )

    steps: list[Step] = []
    actions: list[QMPCommand] = []
    undo: list[QMPCommand] = []
    disk_jobs: list[DiskJob] = []
    for choice in choices:
        disk = choice.disk
        target_steps, target_nodes = _target_steps(graph, choice, backup_id)
        steps.extend(target_steps)
        source = graph.disk(disk).top
        job = naming.job_id(backup_id, disk)
        bitmap = None
        temporaries: list[tuple[str, str]] = []
        if choice.incremental is not None:
            layers = usable_checkpoint_layers(graph, disk, _bitmap_of(checkpoints, choice))
            bitmap = naming.temporary_bitmap(backup_id, disk)
            actions += merged_bitmap(source, bitmap, layers, layers[0].bitmap.granularity)
            temporaries.append((source, bitmap))
            undo.append(BlockDirtyBitmapRemove(node=source, name=bitmap))
        actions.append(
            BlockdevBackup(
                job_id=job,
                device=source,
                target=target_nodes[0],
                sync=choice.sync,
                bitmap=bitmap,
                auto_finalize=True,
                auto_dismiss=False,
            )
        )
        undo.insert(0, JobCancel(id=job))
        disk_jobs.append(
            DiskJob(
                disk=disk,
                source_node=source,
                job_id=job,
                sync=choice.sync,
                incremental=choice.incremental,
                target=choice.target,
                format=choice.format,
                target_nodes=target_nodes,
                temporary_bitmaps=tuple(temporaries),
                created_files=() if choice.reuse else (choice.target,),
            )
        )
    if checkpoint is not None:
        # The new checkpoint's bitmaps come first, in disk order, then the backups.
        for index, entry in enumerate(checkpoint.bitmap_disks()):
            top = graph.disk(entry.name).top
            assert entry.bitmap is not None
            actions.insert(index, BlockDirtyBitmapAdd(node=top, name=entry.bitmap, persistent=True))
            undo.append(BlockDirtyBitmapRemove(node=top, name=entry.bitmap))
    disks = ", ".join(c.disk for c in choices)
    reason = f"start the backup of {disks} at one instant"
    if checkpoint is not None:
        reason += f" and create checkpoint {checkpoint.name} at that instant"
    steps.append(Step(command=Transaction(actions=tuple(actions)), reason=reason, undo=tuple(undo)))
    incremental = next((c.incremental for c in choices if c.incremental), None)
    record = BackupRecord(
        id=backup_id,
        mode="push",
        started=float(facts.now),
        checkpoint=checkpoint.name if checkpoint else None,
        incremental=incremental,
        disks=tuple(disk_jobs),
    )
    return BackupPlan(plan=Plan(steps=tuple(steps)), record=record, checkpoint=checkpoint)


def _bitmap_of(checkpoints: Sequence[Checkpoint], choice: DiskChoice) -> str:
    assert choice.incremental is not None
    entry = find_checkpoint(checkpoints, choice.incremental).disk(choice.disk)
    assert entry is not None and entry.bitmap is not None
    return entry.bitmap


# -- backup-end -------------------------------------------------------------


class JobState(_Frozen):
    """A QEMU job as ``query-jobs`` reports it."""

    id: str
    status: str
    error: str | None = None
    current_progress: int = 0
    total_progress: int = 0


class EndPlan(_Frozen):
    """The plan of a ``backup-end``, and how the backup ended."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    outcome: Literal["completed", "aborted", "failed"]
    errors: Mapping[str, str]
    drop_checkpoint: str | None


def plan_backup_end(
    record: BackupRecord,
    jobs: Mapping[str, JobState],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    abort: bool,
) -> EndPlan:
    """Plan the end of a backup: dismiss (or cancel) its jobs, remove its nodes and bitmaps.

    A checkpoint created with a backup that did not complete is removed too,
    so that no checkpoint promises data no backup holds.
    """
    active = [j for j in record.job_ids() if j in jobs and jobs[j].status != "concluded"]
    if active and not abort:
        raise BackupActiveError(f"Backup id {record.id} still active, need --abort to end now")
    steps: list[Step] = []
    errors: dict[str, str] = {}
    for disk in record.disks:
        job = jobs.get(disk.job_id)
        if job is None:
            continue
        if job.status != "concluded":
            steps.append(
                Step(
                    command=JobCancel(id=disk.job_id),
                    reason=f"abort the copy of {disk.disk}",
                    await_job=disk.job_id,
                    job_may_fail=True,
                )
            )
            errors[disk.disk] = "aborted"
        elif job.error:
            errors[disk.disk] = job.error
        steps.append(
            Step(command=JobDismiss(id=disk.job_id), reason=f"forget the job of {disk.disk}")
        )
    for disk in record.disks:
        for node in disk.target_nodes:
            if node in graph.nodes:
                steps.append(
                    Step(
                        command=BlockdevDel(node_name=node),
                        reason=f"close the target of {disk.disk}",
                    )
                )
    removals: list[QMPCommand] = []
    for disk in record.disks:
        for node, bitmap in disk.temporary_bitmaps:
            if node in graph.nodes and graph.node(node).bitmap(bitmap) is not None:
                removals.append(BlockDirtyBitmapRemove(node=node, name=bitmap))
    outcome: Literal["completed", "aborted", "failed"] = (
        "aborted" if active else "failed" if errors else "completed"
    )
    drop = None
    if outcome != "completed" and record.checkpoint is not None:
        made = next((c for c in checkpoints if c.name == record.checkpoint), None)
        if made is not None:
            drop = made.name
            for entry in made.bitmap_disks():
                for layer in graph.bitmap_layers(entry.name, entry.bitmap or ""):
                    removals.append(BlockDirtyBitmapRemove(node=layer.node, name=layer.bitmap.name))
    if removals:
        steps.append(
            Step(
                command=Transaction(actions=tuple(removals)),
                reason="remove the temporary bitmaps"
                + (f" and checkpoint {drop}, whose backup did not complete" if drop else ""),
            )
        )
    return EndPlan(
        plan=Plan(steps=tuple(steps)), outcome=outcome, errors=errors, drop_checkpoint=drop
    )
