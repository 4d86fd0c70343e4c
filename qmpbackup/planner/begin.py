"""The plan of ``backup-begin``: each disk prepared by its mode, then one transaction.

The transaction sets the point in time of all the disks (and creates the
checkpoint made with the backup).

A mode is a module with a refusal check per disk, a planner per disk and,
optionally, steps shared by all disks (pull: the NBD server); adding a mode
means one such module and one entry in :data:`MODES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from ..errors import PlanError
from ..qapi.commands import BlockDirtyBitmapAdd, BlockDirtyBitmapRemove, QMPCommand, Transaction
from ..qmp.graph import BlockGraph
from ..request.models import BackupSpec, CheckpointSpec, Mode
from ..state.active import ActiveBackup, NbdServer
from ..state.checkpoints import Checkpoint, next_parent
from . import naming, pull, push
from .checkpoint import checkpoint_with_backup
from .devices import refuse_device
from .disks import DiskChoice, DiskContext, DiskPieces, choose_disks
from .facts import BackupFacts, BeginOptions
from .plan import Plan, Step


class BackupPlan(BaseModel):
    """The plan of a ``backup-begin``, the record to keep if it succeeds, and the checkpoint."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    record: ActiveBackup
    checkpoint: Checkpoint | None


ServerPlanner = Callable[[BackupSpec, BackupFacts, BeginOptions], tuple[NbdServer, list[Step]]]


@dataclass(frozen=True)
class ModePlanner:
    """How one mode plans its part of a backup."""

    refuse_disk: Callable[[DiskChoice, BackupFacts], None]
    plan_disk: Callable[[DiskContext, DiskChoice], DiskPieces]
    # The server every disk's export goes through, and the steps that start it.
    plan_server: ServerPlanner | None = None


MODES: Mapping[Mode, ModePlanner] = {
    "push": ModePlanner(refuse_disk=push.refuse_disk, plan_disk=push.plan_disk),
    "pull": ModePlanner(
        refuse_disk=pull.refuse_disk, plan_disk=pull.plan_disk, plan_server=pull.plan_server
    ),
}


def _refuse(choices: Sequence[DiskChoice], facts: BackupFacts, mode: ModePlanner) -> None:
    """Raise for a disk that another backup copies, or that this mode cannot take now."""
    for choice in choices:
        if choice.disk in facts.busy_disks:
            raise PlanError(
                f"disk {choice.disk!r} is already being backed up by backup id "
                f"{facts.busy_disks[choice.disk]}"
            )
        refuse_device(choice, facts)
        mode.refuse_disk(choice, facts)
        job = naming.job_id(facts.backup_id, choice.disk)
        if job in facts.job_ids:
            raise PlanError(f"QEMU already has a job {job}: run 'qmpbackup recover'")


def _transaction(
    graph: BlockGraph,
    checkpoint: Checkpoint | None,
    pieces: Sequence[DiskPieces],
    quiesce: bool,
) -> Step:
    """The one transaction: the new checkpoint's bitmaps in disk order, then each disk's
    actions; its undo cancels every job first (newest first), then removes bitmaps."""
    actions: list[QMPCommand] = []
    undo: list[QMPCommand] = []
    if checkpoint is not None:
        for entry in checkpoint.bitmap_disks():
            assert entry.bitmap is not None
            actions.append(
                BlockDirtyBitmapAdd(
                    node=graph.disk(entry.name).top, name=entry.bitmap, persistent=entry.persistent
                )
            )
    for piece in pieces:
        actions += piece.actions
        undo = piece.undo[:1] + undo + piece.undo[1:]
    if checkpoint is not None:
        undo += [
            BlockDirtyBitmapRemove(node=graph.disk(e.name).top, name=e.bitmap or "")
            for e in checkpoint.bitmap_disks()
        ]
    reason = f"start the backup of {', '.join(p.job.disk for p in pieces)} at one instant"
    if checkpoint is not None:
        reason += f" and create checkpoint {checkpoint.name} at that instant"
    return Step(
        command=Transaction(actions=tuple(actions)),
        reason=reason,
        undo=tuple(undo),
        quiesce=quiesce,
    )


def _laned(pieces: Sequence[DiskPieces], attr: str) -> list[Step]:
    """Each disk's steps of one kind, laned: they touch only that disk's own nodes, so the
    runner sends the disks' steps side by side."""
    return [
        step.model_copy(update={"lane": piece.job.disk})
        for piece in pieces
        for step in getattr(piece, attr)
    ]


def plan_backup_begin(
    spec: BackupSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    facts: BackupFacts,
    new_checkpoint: CheckpointSpec | None = None,
    options: BeginOptions | None = None,
    choices: Sequence[DiskChoice] | None = None,
) -> BackupPlan:
    """Plan a backup: prepare every disk, then one transaction sets the point in time.

    Push: targets are opened, and the transaction starts the copy jobs.  Pull:
    fleecing scratches are opened, the transaction starts copy-before-write
    jobs, then each disk's point-in-time view is exported over NBD.  ``choices``
    is what :func:`choose_disks` returns for these inputs, when the caller has it
    already (it probed the files they name).

    Raises InvalidInputError (and its subclasses) for a request this VM cannot take
    as asked, PlanError when the VM's state prevents the backup.
    """
    if choices is None:
        choices = choose_disks(
            spec, graph, checkpoints, new_checkpoint, facts.now, facts.scratch_dir, facts.backup_id
        )
    mode = MODES[spec.mode]
    _refuse(choices, facts, mode)
    checkpoint = checkpoint_with_backup(
        new_checkpoint,
        [c.disk for c in choices],
        graph,
        checkpoints,
        next_parent(checkpoints),
        facts.now,
        volatile=(options or BeginOptions()).volatile_bitmaps,
    )
    server, shared = (
        mode.plan_server(spec, facts, options or BeginOptions())
        if mode.plan_server is not None
        else (None, [])
    )
    context = DiskContext(
        graph=graph,
        checkpoints=checkpoints,
        facts=facts,
        choices=choices,
        options=options or BeginOptions(),
        server=server,
    )
    pieces = [mode.plan_disk(context, c) for c in choices]
    steps = _laned(pieces, "before")
    steps.append(_transaction(graph, checkpoint, pieces, (options or BeginOptions()).quiesce))
    steps += _laned(pieces, "after") + shared + _laned(pieces, "exports")
    record = ActiveBackup(
        id=facts.backup_id,
        mode=spec.mode,
        started=float(facts.now),
        checkpoint=checkpoint.name if checkpoint else None,
        incremental=next((c.incremental for c in choices if c.incremental), None),
        disks=tuple(piece.job for piece in pieces),
        server=server,
    )
    return BackupPlan(plan=Plan(steps=tuple(steps)), record=record, checkpoint=checkpoint)
