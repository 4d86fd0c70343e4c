"""The plan of ``backup-end``: what a backup made in QEMU removed, and how it ended."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import BackupActiveError
from ..qapi.commands import (
    BlockdevDel,
    BlockDirtyBitmapRemove,
    BlockExportDel,
    JobCancel,
    JobDismiss,
    QMPCommand,
    Transaction,
)
from ..qapi.objects import ObjectDel
from ..qmp.graph import BlockGraph
from ..qmp.jobs import JobState
from ..state.active import ActiveBackup
from ..state.checkpoints import Checkpoint
from .plan import Plan, Step
from .pull import stop_server

Outcome = Literal["completed", "aborted", "failed"]


class EndPlan(BaseModel):
    """The plan of a ``backup-end``, and how the backup ended."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    outcome: Outcome
    errors: Mapping[str, str]
    drop_checkpoint: str | None
    # Files qmpbackup created that end with the backup: a pull's scratches, and the
    # partial targets of a push that did not complete (reused targets are the user's).
    remove_files: tuple[str, ...] = ()


def _export_steps(record: ActiveBackup, exports: frozenset[str]) -> list[Step]:
    return [
        Step(
            command=BlockExportDel(id=disk.export_id, mode="hard"),
            reason=f"stop exporting {disk.disk} (connected readers are dropped)",
            await_export_deleted=disk.export_id,
        )
        for disk in record.disks
        if disk.export_id and disk.export_id in exports
    ]


def _job_steps(
    record: ActiveBackup, jobs: Mapping[str, JobState], graph: BlockGraph, errors: dict[str, str]
) -> list[Step]:
    """Close each disk's view, then cancel (if still running) and dismiss its job; the
    errors found go into ``errors``."""
    pull = record.mode == "pull"
    steps: list[Step] = []
    for disk in record.disks:
        # The view sits on the job's filter node: it goes before the job.
        steps += [
            Step(command=BlockdevDel(node_name=node), reason=f"close the view of {disk.disk}")
            for node in disk.view_nodes
            if node in graph.nodes
        ]
        job = jobs.get(disk.job_id)
        if job is None:
            # QEMU restarted or someone dismissed it: nothing says the copy finished.
            errors[disk.disk] = f"job {disk.job_id} is gone (QEMU restarted?)"
            continue
        if job.status != "concluded":
            steps.append(
                Step(
                    command=JobCancel(id=disk.job_id),
                    reason=f"stop the fleecing of {disk.disk}"
                    if pull
                    else f"abort the copy of {disk.disk}",
                    await_job=disk.job_id,
                    job_may_fail=True,
                )
            )
            if not pull:
                errors[disk.disk] = "aborted"
        elif job.error:
            errors[disk.disk] = job.error
        steps.append(
            Step(command=JobDismiss(id=disk.job_id), reason=f"forget the job of {disk.disk}")
        )
    return steps


def _node_steps(record: ActiveBackup, graph: BlockGraph) -> list[Step]:
    what = "scratch" if record.mode == "pull" else "target"
    return [
        Step(command=BlockdevDel(node_name=node), reason=f"close the {what} of {disk.disk}")
        for disk in record.disks
        for node in disk.target_nodes
        if node in graph.nodes
    ]


def _temporary_bitmaps(record: ActiveBackup, graph: BlockGraph) -> list[QMPCommand]:
    if record.mode == "pull":
        return []  # a pull's bitmap lives on the scratch node and goes with it
    return [
        BlockDirtyBitmapRemove(node=node, name=bitmap)
        for disk in record.disks
        for node, bitmap in disk.temporary_bitmaps
        if node in graph.nodes and graph.node(node).bitmap(bitmap) is not None
    ]


def _outcome(record: ActiveBackup, abort: bool, active: bool, errors: Mapping[str, str]) -> Outcome:
    if record.mode == "pull":
        # A pull backup is over when its reader is done; only a broken fleecing fails it.
        return "failed" if errors else "aborted" if abort else "completed"
    return "aborted" if active else "failed" if errors else "completed"


def plan_backup_end(
    record: ActiveBackup,
    jobs: Mapping[str, JobState],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    abort: bool,
    exports: frozenset[str] = frozenset(),
    server_shared: bool = False,
) -> EndPlan:
    """Plan the end of a backup: remove its exports, jobs, nodes and temporary bitmaps.

    Push refuses while a copy runs unless ``abort`` (BackupActiveError).  Pull always
    ends: its exports go (clients are dropped), the NBD server stops unless
    ``server_shared`` (another pull backup uses it), the fleecing jobs are
    cancelled.  A checkpoint created with a backup that did not complete is
    removed too, so that no checkpoint promises data no backup holds.
    """
    pull = record.mode == "pull"
    active = [j for j in record.job_ids() if j in jobs and jobs[j].status != "concluded"]
    if active and not abort and not pull:
        raise BackupActiveError(f"Backup id {record.id} still active, need --abort to end now")
    errors: dict[str, str] = {}
    steps = _export_steps(record, exports)
    if pull and record.server is not None and not server_shared:
        steps += stop_server(
            True, record.server.objects, "stop the NBD server: no other backup uses it"
        )
    steps += _job_steps(record, jobs, graph, errors)
    steps += _node_steps(record, graph)
    steps += [
        Step(command=ObjectDel(id=o), reason=f"delete the secret of {disk.disk}", may_fail=True)
        for disk in record.disks
        for o in disk.objects
    ]
    removals = _temporary_bitmaps(record, graph)
    outcome = _outcome(record, abort, bool(active), errors)
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
    remove_files: tuple[str, ...] = ()
    if pull or outcome != "completed":
        remove_files = tuple(path for disk in record.disks for path in disk.created_files)
    return EndPlan(
        plan=Plan(steps=tuple(steps)),
        outcome=outcome,
        errors=errors,
        drop_checkpoint=drop,
        remove_files=remove_files,
    )
