"""Orphan bitmaps: one-shot checkpoints of ours that nothing owns any more.

A one-shot backup's checkpoint is a persistent bitmap named ``backup-<backup id>``
(a name only qmpbackup's one-shot makes: an id is ``YYYYMMDDTHHMMSSZ-N``). Such a
bitmap is an *orphan* when no checkpoint of this host's state names it on its disk
and no complete backup of the repository made it: its backup was pruned, or failed,
on a host whose state is gone. It records every guest write forever, for no one.

What is never an orphan: a bitmap the repository's records name (the next backup
into it adopts it), a bitmap another tool made (any other name), and a busy bitmap (a
job uses it: a live backup). A backup on another host cannot use a bitmap of this
QEMU at all. Removal goes through the usual path: the orphan is recorded as an
adopted checkpoint, then deleted as any checkpoint is (planned, checked against the
schema, journaled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..planner.ownership import ONESHOT_CHECKPOINT
from ..state.checkpoints import Checkpoint, CheckpointDisk, next_seq
from .repository import Repository

if TYPE_CHECKING:
    from ..api import VM


@dataclass(frozen=True)
class Orphan:
    """A bitmap of a one-shot checkpoint that nothing owns, on the disks that carry it."""

    name: str
    disks: tuple[str, ...]


async def find_orphans(vm: VM, repo: Repository | None) -> list[Orphan]:
    """The orphan bitmaps of ``vm`` (see the module), judged against ``repo``; without
    it, the candidates: one-shot checkpoints' bitmaps no checkpoint here knows."""
    graph = await vm.graph()
    known = {c.name for c in vm.checkpoints()}
    recorded = {r.checkpoint for r in repo.backups() if r.checkpoint} if repo else set()
    found: dict[str, list[str]] = {}
    for disk in graph.disks.values():
        for node_name in disk.chain:
            for bitmap in graph.node(node_name).bitmaps:
                name = bitmap.name
                if (
                    bitmap.persistent
                    and not bitmap.busy
                    and ONESHOT_CHECKPOINT.fullmatch(name)
                    and name not in recorded
                    and name not in known
                    and disk.name not in found.get(name, [])
                ):
                    found.setdefault(name, []).append(disk.name)
    return [Orphan(name, tuple(disks)) for name, disks in sorted(found.items())]


async def remove_orphans(vm: VM, orphans: list[Orphan]) -> list[str]:
    """Delete each orphan's bitmaps, as an adopted checkpoint deleted; the names."""
    removed: list[str] = []
    for orphan in orphans:
        adopted = Checkpoint(
            name=orphan.name,
            creation_time=0,
            seq=next_seq(vm.checkpoints()),
            description="an orphan bitmap, adopted to be deleted",
            disks=tuple(CheckpointDisk(name=d, bitmap=orphan.name) for d in orphan.disks),
            origin="adopted",
        )
        vm.adopt_checkpoints([adopted])
        removed += await vm.checkpoint_delete(orphan.name)
    return removed
