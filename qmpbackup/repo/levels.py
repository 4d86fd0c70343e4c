"""The one-shot backup's level decision: which disks, each one's history in the
repository, the compression of this run's images, each level announced."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..planner.adopt import RecordedCheckpoint, adoptable
from ..planner.level import DiskHistory, LevelDecision, decide_levels
from ..qmp.graph import BlockGraph
from ..request.models import RequestedLevel
from .events import BackupEvent, EventSink
from .records import Compression
from .repository import Repository

if TYPE_CHECKING:
    from ..api import VM

FIRMWARE_CODE = "read-only firmware code from the host's firmware package, not the VM's data"


def chosen_disks(graph: BlockGraph, names: Sequence[str] | None) -> list[str]:
    """The disks named, or every disk but the firmware's code (pflash0 of a UEFI guest:
    the host's OVMF_CODE, which libvirt does not back up either; its NVRAM is)."""
    if not names:
        return [name for name, disk in graph.disks.items() if not disk.firmware_code]
    chosen = [graph.disk(name).name for name in names]
    return list(dict.fromkeys(chosen))


def _history(repo: Repository, disk: str) -> DiskHistory | None:
    """What the level decision needs of ``disk``'s last complete backups in ``repo``."""
    last = repo.parent_for(disk, "inc")
    if last is None:
        return None
    full = repo.parent_for(disk, "diff")
    entry = repo.disk_record(last, disk)
    return DiskHistory(
        disk=disk,
        image=entry.source or "",
        virtual_size=entry.virtual_size,
        granularity=entry.granularity,
        last_checkpoint=last.checkpoint,
        last_checkpoint_time=last.checkpoint_time,
        full_checkpoint=None if full is None else full.checkpoint,
        full_checkpoint_time=None if full is None else full.checkpoint_time,
        compression=last.compression,
    )


def compression_of(vm: VM, compress: bool, emit: EventSink) -> Compression | None:
    """The compression type of this run's images: zstd where this QEMU's qcow2 has it
    (its schema says), else zlib, said; None without ``compress``.  The same in pull
    mode, whose writer could write zstd anyway: the images must open with this QEMU."""
    if not compress:
        return None
    if vm.capabilities.qcow2_zstd:
        emit(BackupEvent("compression", message="images compressed with zstd"))
        return "zstd"
    why = "this QEMU's qcow2 has no zstd compression type"
    emit(BackupEvent("compression", message=f"images compressed with zlib: {why}"))
    return "zlib"


def _adopt(
    repo: Repository, vm: VM, graph: BlockGraph, names: Sequence[str], emit: EventSink
) -> None:
    """Adopt the checkpoints of the repository's backups that this host's state lacks
    and the disks' bitmaps prove (the VM was backed up from another host), said."""
    recorded = [
        RecordedCheckpoint(
            name=r.checkpoint,
            creation_time=r.checkpoint_time,
            disks=tuple((d.name, d.granularity) for d in r.disks if d.name in names),
        )
        for r in repo.backups()
        if r.checkpoint and r.checkpoint_time is not None
    ]
    adopted = adoptable(recorded, graph, vm.checkpoints())
    vm.adopt_checkpoints(adopted)
    for checkpoint in adopted:
        disks = ", ".join(d.name for d in checkpoint.disks)
        message = f"checkpoint {checkpoint.name} adopted from its bitmaps on {disks}"
        emit(BackupEvent("adopted", message=message))


def decide(
    repo: Repository,
    vm: VM,
    graph: BlockGraph,
    level: RequestedLevel,
    disks: Sequence[str] | None,
    emit: EventSink,
    compression: Compression | None = None,
) -> list[LevelDecision]:
    """Each disk's level from the repository's history and the live graph, announced."""
    names = chosen_disks(graph, disks)
    for name in graph.disks:
        if name not in names and graph.disks[name].firmware_code and not disks:
            emit(BackupEvent("skipped", disk=name, reason=FIRMWARE_CODE))
    history = {name: h for name in names if (h := _history(repo, name)) is not None}
    _adopt(repo, vm, graph, names, emit)
    decisions = decide_levels(level, names, graph, vm.checkpoints(), history, compression)
    for decision in decisions:
        emit(BackupEvent("level", disk=decision.disk, level=decision.level, reason=decision.reason))
    return decisions
