"""Plan ``recover``: reconcile what QEMU holds with the state directory and journals.

Everything qmpbackup creates in QEMU is named ``qmpbackup-<backup id>-…``: a leftover is
any such job, node, export or object no live record (its jobs there, its owner alive)
owns, or a temporary bitmap of ours (:mod:`.ownership`). A blockpull job is left running.

The cleanup order follows the block graph: exports, the NBD server (only one
qmpbackup started) and its TLS objects; the point-in-time views, which sit on
the jobs' filter nodes; the jobs (cancelled, then dismissed); every other node,
parents before children; temporary bitmaps.  Checkpoints keep the failure
policy: a checkpoint created by a backup that is being cleaned up is removed,
bitmaps and metadata, so that none promises data no backup holds; a
checkpoint whose creation was cut before its metadata was saved loses its
bitmaps.  Every step may fail (the thing may be gone already), which makes
``recover`` idempotent.

A QEMU that was killed loses the checkpoint bitmaps it had not saved yet
(those made since it started), and the ones it had loaded come back marked
inconsistent: either way they no longer say what changed, so no incremental
can start from them.  ``recover`` removes every layer of such a checkpoint
bitmap on that disk; the checkpoint stops covering the disk, and goes when it
covers no disk any more, so the next backup of the disk is a full.  A disk
that is not attached at all is left out of this: its bitmaps may be fine in
its image.  These repairs alone do not make ``backup-begin`` refuse: a full
backup needs no bitmap.  A guest a run froze and did not see thawed is thawed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..qapi.commands import (
    BlockdevDel,
    BlockDirtyBitmapRemove,
    BlockExportDel,
    JobCancel,
    JobDismiss,
)
from ..qmp.jobs import JobState
from ..state.active import ActiveBackup
from ..state.checkpoints import Checkpoint
from ..state.journal import JournalState
from .facts import Inventory
from .naming import PREFIX, PULL_PREFIX
from .ownership import temporary_bitmaps
from .plan import Plan, Step
from .pull import stop_server

_CHECKPOINT_OPERATIONS = ("backup-begin", "checkpoint-create")


class RecoverPlan(BaseModel):
    """The QMP steps of a recovery and the state-directory changes that follow them."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    stale_records: tuple[int, ...]
    live_records: tuple[int, ...]
    drop_checkpoints: tuple[str, ...]
    remove_files: tuple[str, ...]
    # Push targets of stale backups whose copy may have finished: left to the user.
    kept_files: tuple[str, ...] = ()
    journals: tuple[str, ...]
    unfinished: tuple[str, ...]  # operations whose journals were left open
    # Checkpoint -> disk -> "inconsistent" or "missing": it stops covering those disks.
    damaged: Mapping[str, Mapping[str, str]] = {}
    # Damaged checkpoints left covering no disk: their metadata goes too.
    broken_checkpoints: tuple[str, ...] = ()
    repair_steps: int = 0  # the plan's last steps, which remove inconsistent bitmaps
    thaw: tuple[str, ...] = ()  # agents of guests a run may have left frozen

    @property
    def needed(self) -> bool:
        """True when QEMU or the state directory holds anything to clean."""
        return self.leftovers or bool(self.damaged)

    @property
    def leftovers(self) -> bool:
        """True when an earlier run left something behind (a reason to refuse to begin)."""
        return bool(
            len(self.plan.steps) > self.repair_steps
            or self.stale_records
            or self.drop_checkpoints
            or self.remove_files
            or self.unfinished
            or self.thaw
        )

    def summary(self) -> list[str]:
        """One line per finding, for people."""
        lines = [f"guest left frozen by an interrupted run: thaw it through {a}" for a in self.thaw]
        lines += [f"unfinished {op} (journal left open)" for op in self.unfinished]
        lines += [f"backup id {r}: left over, its run is gone" for r in self.stale_records]
        lines += [step.reason for step in self.plan.steps]
        lines += [f"checkpoint {c}: its backup did not complete" for c in self.drop_checkpoints]
        for name, disks in self.damaged.items():
            fate = (
                "deleted"
                if name in self.broken_checkpoints
                else f"no longer covers {', '.join(disks)}"
            )
            causes = "; ".join(
                f"bitmap {cause} on {', '.join(d for d in disks if disks[d] == cause)}"
                for cause in sorted(set(disks.values()))
            )
            lines.append(
                f"checkpoint {name}: {causes} (QEMU stopped without saving it), so the "
                f"checkpoint is {fate}; the next backup of "
                f"{'that disk' if len(disks) == 1 else 'those disks'} must be full"
            )
        lines += [f"remove {path}" for path in self.remove_files]
        lines += [
            f"keep {path}: its copy may have finished, but no checkpoint follows from it"
            for path in self.kept_files
        ]
        return lines


def stale_records(
    records: Sequence[ActiveBackup], jobs: Mapping[str, JobState], dead_owners: frozenset[int]
) -> tuple[list[ActiveBackup], list[ActiveBackup]]:
    """Split records into (stale, live): stale when a job is gone or the owner is dead."""
    stale: list[ActiveBackup] = []
    live: list[ActiveBackup] = []
    for record in records:
        gone = any(j not in jobs for j in record.job_ids())
        (stale if gone or record.id in dead_owners else live).append(record)
    return stale, live


def _topological(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[str]:
    """``nodes`` with every parent before its children (edges among them only)."""
    remaining = list(nodes)
    order: list[str] = []
    while remaining:
        members = set(remaining)
        free = [n for n in remaining if not any(c == n and p in members for p, c in edges)]
        if not free:  # a cycle cannot happen in a block graph; keep going regardless
            free = remaining[:1]
        order += free
        remaining = [n for n in remaining if n not in free]
    return order


def _journal_checkpoints(journal: JournalState) -> set[tuple[str, str]]:
    """(node, bitmap) of persistent non-temporary bitmaps the journal's sent steps add."""
    found: set[tuple[str, str]] = set()

    def visit(command: Mapping[str, Any]) -> None:
        args = command.get("arguments") or command.get("data") or {}
        kind = command.get("execute") or command.get("type")
        if kind == "transaction":
            for action in args.get("actions", ()):
                visit(action)
        elif (
            kind == "block-dirty-bitmap-add"
            and args.get("persistent")
            and not str(args.get("name", "")).startswith(PREFIX)
        ):
            found.add((str(args["node"]), str(args["name"])))

    for step in journal.sent_steps():
        visit(step.get("command", {}))
    return found


def _journal_sent(journal: JournalState, execute: str) -> bool:
    return any(s.get("command", {}).get("execute") == execute for s in journal.sent_steps())


def _job_steps(jobs: Mapping[str, JobState], ours: Callable[[str], bool]) -> list[Step]:
    """Cancel (if still running) and dismiss every job of ours."""
    steps: list[Step] = []
    for job_id, job in sorted(jobs.items()):
        if not ours(job_id):
            continue
        if job.status not in ("concluded", "null"):
            steps.append(
                Step(
                    command=JobCancel(id=job_id),
                    reason=f"cancel job {job_id}",
                    await_job=job_id,
                    job_may_fail=True,
                    may_fail=True,
                )
            )
        steps.append(
            Step(command=JobDismiss(id=job_id), reason=f"dismiss job {job_id}", may_fail=True)
        )
    return steps


def _qemu_cleanup(
    inventory: Inventory,
    ours: Callable[[str], bool],
    stale: Sequence[ActiveBackup],
    live: Sequence[ActiveBackup],
    open_journals: Sequence[JournalState],
) -> tuple[list[Step], set[str]]:
    """Steps removing every export, server, object, node, job and temporary bitmap of
    ours, in the block graph's order; and the nodes they remove."""
    steps = [
        Step(
            command=BlockExportDel(id=export, mode="hard"),
            reason=f"delete export {export}",
            await_export_deleted=export,
            may_fail=True,
        )
        for export in inventory.exports
        if ours(export)
    ]
    server_in_use = any(r.server is not None for r in live)
    started = any(r.server is not None for r in stale) or any(
        _journal_sent(j, "nbd-server-start") for j in open_journals
    )
    steps += stop_server(
        started and not server_in_use,
        [o for o in inventory.objects if ours(o)],
        "stop the NBD server qmpbackup started",
    )
    our_nodes = [n for n in inventory.nodes if ours(n)]
    ordered = _topological(our_nodes, inventory.edges)

    def delete(node: str) -> Step:
        return Step(
            command=BlockdevDel(node_name=node), reason=f"delete node {node}", may_fail=True
        )

    # Views sit on the fleecing job's filter node: they go before the job.
    views = [n for n in ordered if n.endswith(("-view", "-access"))]
    steps += [delete(n) for n in views] + _job_steps(inventory.jobs, ours)
    steps += [delete(n) for n in ordered if n not in views]
    removed_nodes = set(our_nodes)
    temporary = temporary_bitmaps(inventory)
    steps += [
        Step(
            command=BlockDirtyBitmapRemove(node=node, name=name),
            reason=f"remove temporary bitmap {name} from {node}",
            may_fail=True,
        )
        for node, name in inventory.bitmaps
        if ours(name) and node not in removed_nodes and (node, name) in temporary
    ]
    return steps, removed_nodes


def _checkpoint_cleanup(
    inventory: Inventory,
    records: Sequence[ActiveBackup],
    stale: Sequence[ActiveBackup],
    checkpoints: Sequence[Checkpoint],
    open_journals: Sequence[JournalState],
    removed_nodes: set[str],
) -> tuple[set[str], list[Step]]:
    """The checkpoints to drop (made by a backup that never completed) and the steps
    removing their bitmaps and those of checkpoints whose creation was cut."""
    known = {c.name for c in checkpoints}
    recorded = {r.checkpoint for r in records if r.checkpoint}
    drop: set[str] = {r.checkpoint for r in stale if r.checkpoint}
    orphan_bitmaps: set[tuple[str, str]] = set()
    for journal in open_journals:
        if journal.operation not in _CHECKPOINT_OPERATIONS:
            continue
        for node, name in _journal_checkpoints(journal):
            if journal.operation == "backup-begin" and name in known and name not in recorded:
                drop.add(name)  # metadata saved, record not: the backup never began
            elif name not in known:
                orphan_bitmaps.add((node, name))
    for node, name in inventory.bitmaps:
        if name in drop:
            orphan_bitmaps.add((node, name))
    present = set(inventory.bitmaps)
    steps = [
        Step(
            command=BlockDirtyBitmapRemove(node=node, name=name),
            reason=f"remove bitmap {name} from {node}: "
            + (
                "its backup did not complete"
                if name in drop
                else "its checkpoint was never completed"
            ),
            may_fail=True,
        )
        for node, name in sorted(orphan_bitmaps)
        if (node, name) in present and node not in removed_nodes
    ]
    return drop, steps


def _leftover_files(
    inventory: Inventory,
    stale: Sequence[ActiveBackup],
    open_journals: Sequence[JournalState],
    scratch_files: Sequence[str],
) -> tuple[list[str], list[str]]:
    """Files to remove (scratches, copies that can never finish, files a cut plan made)
    and files to keep (copies that may have finished)."""
    files: list[str] = []
    kept: list[str] = []
    for record in stale:
        for disk in record.disks:
            state = inventory.jobs.get(disk.job_id)
            if record.mode == "pull" or (
                state is not None and (state.error or state.status != "concluded")
            ):
                files += disk.created_files  # a scratch, or a copy that will never finish
            else:
                # The copy may have finished before QEMU restarted or its owner died:
                # maybe a whole backup, so it stays (outside any checkpoint chain).
                kept += disk.created_files
    for journal in open_journals:
        for step in journal.sent_steps():
            files += step.get("created_files", ())
    return files + list(scratch_files), kept


def plan_recover(
    inventory: Inventory,
    records: Sequence[ActiveBackup],
    checkpoints: Sequence[Checkpoint],
    journals: Sequence[JournalState],
    *,
    dead_owners: frozenset[int] = frozenset(),
    scratch_files: Sequence[str] = (),
) -> RecoverPlan:
    """Plan the cleanup of every leftover; live backups are left alone."""
    stale, live = stale_records(records, inventory.jobs, dead_owners)
    live_prefixes = tuple(f"{PREFIX}{r.id}-" for r in live)

    def ours(name: str) -> bool:
        return name.startswith(PREFIX) and not name.startswith((*live_prefixes, PULL_PREFIX))

    open_journals = [j for j in journals if j.ended is None]
    steps, removed_nodes = _qemu_cleanup(inventory, ours, stale, live, open_journals)
    drop, checkpoint_steps = _checkpoint_cleanup(
        inventory, records, stale, checkpoints, open_journals, removed_nodes
    )
    steps += checkpoint_steps
    damaged, broken, repairs = _repair_checkpoints(
        inventory, [c for c in checkpoints if c.name not in drop], removed_nodes
    )
    steps += repairs
    files, kept = _leftover_files(inventory, stale, open_journals, scratch_files)
    live_files = {f for r in live for d in r.disks for f in d.created_files}
    return RecoverPlan(
        plan=Plan(steps=tuple(steps)),
        stale_records=tuple(r.id for r in stale),
        live_records=tuple(r.id for r in live),
        drop_checkpoints=tuple(sorted(drop & {c.name for c in checkpoints})),
        remove_files=tuple(dict.fromkeys(f for f in files if f not in live_files)),
        kept_files=tuple(dict.fromkeys(kept)),
        journals=tuple(str(j.path) for j in journals),
        unfinished=tuple(j.operation for j in open_journals),
        damaged=damaged,
        broken_checkpoints=broken,
        repair_steps=len(repairs),
        thaw=tuple(dict.fromkeys(j.frozen_agent for j in journals if j.frozen_agent)),
    )


def _repair_checkpoints(
    inventory: Inventory, checkpoints: Sequence[Checkpoint], removed_nodes: set[str]
) -> tuple[dict[str, dict[str, str]], tuple[str, ...], list[Step]]:
    """Damaged checkpoints (name -> disk -> cause), those left covering nothing, and
    the steps that remove every layer of their bitmaps on the damaged disks."""
    attached = set(inventory.disk_of.values())
    on_disk = {(inventory.disk_of.get(node), name) for node, name in inventory.bitmaps}
    bad = {(disk, name) for disk, _node, name in inventory.inconsistent}
    damaged: dict[str, dict[str, str]] = {}
    remove: set[tuple[str | None, str | None]] = set()  # (disk, bitmap)
    for checkpoint in checkpoints:
        for entry in checkpoint.bitmap_disks():
            if entry.name not in attached:
                continue
            key = (entry.name, entry.bitmap)
            if key in bad:
                damaged.setdefault(checkpoint.name, {})[entry.name] = "inconsistent"
                remove.add(key)
            elif key not in on_disk:
                damaged.setdefault(checkpoint.name, {})[entry.name] = "missing"
    by_name = {c.name: c for c in checkpoints}
    broken = tuple(
        name
        for name, disks in damaged.items()
        if {d.name for d in by_name[name].bitmap_disks()} <= set(disks)
    )
    steps = [
        Step(
            command=BlockDirtyBitmapRemove(node=node, name=name),
            reason=f"remove bitmap {name} from {node}: inconsistent, it cannot serve a backup",
            may_fail=True,
        )
        for node, name in sorted(inventory.bitmaps)
        if (inventory.disk_of.get(node), name) in remove and node not in removed_nodes
    ]
    return damaged, broken, steps
