"""Checkpoints rebuilt from what travels with the VM: its disks' bitmaps and the
repository's records.

The state directory is a cache. A VM that moved to another host (a live migration
over shared storage, or a restart elsewhere) carries its checkpoints' persistent
bitmaps in its images, and the repository records which checkpoint each backup
created (name, creation time, and per disk the bitmap's granularity). A checkpoint
the records name and this host's state does not know is *adopted* on each disk where
the bitmap of that name is usable (on the top layer, persistent, recording,
consistent, not busy) and has the recorded granularity: a bitmap that fails one of
those tests is not proof of the chain, and the disk's next backup is a full, as it
would be on the host that made it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from ..errors import InvalidInputError, PlanError
from ..qmp.graph import BlockGraph
from ..request.models import CheckpointSpec
from ..state.checkpoints import Checkpoint, CheckpointDisk, next_parent, next_seq
from .chain import usable_checkpoint_layers


class RecordedCheckpoint(BaseModel):
    """A checkpoint a complete backup of the repository created, and the granularity
    of its bitmap on each disk that backup covered (None: not recorded)."""

    model_config = ConfigDict(frozen=True)

    name: str
    creation_time: int
    disks: tuple[tuple[str, int | None], ...]


def _proves(graph: BlockGraph, disk: str, name: str, granularity: int | None) -> bool:
    """True when ``disk``'s bitmap ``name`` can continue the chain of that checkpoint."""
    if disk not in graph.disks:
        return False
    try:
        layers = usable_checkpoint_layers(graph, disk, name)
    except PlanError:
        return False
    bitmap = layers[0].bitmap
    return bitmap.persistent and (granularity is None or bitmap.granularity == granularity)


def adoptable(
    recorded: Sequence[RecordedCheckpoint], graph: BlockGraph, known: Sequence[Checkpoint]
) -> list[Checkpoint]:
    """The checkpoints of ``recorded`` (oldest first) that ``known`` lacks, each covering
    the disks whose bitmaps prove it, parents and order following creation time; a
    checkpoint no disk proves is left out."""
    names = {c.name for c in known}
    adopted: list[Checkpoint] = []
    for entry in sorted(recorded, key=lambda r: (r.creation_time, r.name)):
        if entry.name in names:
            continue
        disks = tuple(
            CheckpointDisk(name=disk, checkpoint="bitmap", bitmap=entry.name)
            for disk, granularity in entry.disks
            if _proves(graph, disk, entry.name, granularity)
        )
        if not disks:
            continue
        everything = [*known, *adopted]
        older = [c for c in everything if c.creation_time <= entry.creation_time]
        adopted.append(
            Checkpoint(
                name=entry.name,
                parent=next_parent(older),
                creation_time=entry.creation_time,
                seq=next_seq(everything),
                description="adopted from the bitmaps on the VM's disks",
                disks=disks,
                origin="adopted",
            )
        )
        names.add(entry.name)
    return adopted


def redefined(spec: CheckpointSpec, graph: BlockGraph, known: Sequence[Checkpoint]) -> Checkpoint:
    """The checkpoint a dumped ``<domaincheckpoint>`` describes (libvirt's
    ``checkpoint-create --redefine``), once each disk it covers proves it with a usable
    persistent bitmap. InvalidInputError when the document lacks a name or creation
    time, or names a checkpoint known here; PlanError naming the disk whose bitmap is
    missing or unusable. A parent not known here (deleted here since, or never
    redefined) is dropped: the checkpoint is recorded as a root."""
    if spec.name is None or spec.creation_time is None:
        raise InvalidInputError(
            "--redefine takes a checkpoint as checkpoint-dumpxml writes it: "
            "<name> and <creationTime> are needed"
        )
    names = {c.name for c in known}
    if spec.name in names:
        raise InvalidInputError(f"checkpoint {spec.name} is already defined here")
    disks: list[CheckpointDisk] = []
    for entry in spec.disks:
        disk = graph.disk(entry.name).name
        if entry.checkpoint == "no":
            disks.append(CheckpointDisk(name=disk, checkpoint="no"))
            continue
        bitmap = entry.bitmap or spec.name
        layers = usable_checkpoint_layers(graph, disk, bitmap)
        if not layers[0].bitmap.persistent:
            raise PlanError(f"disk {disk!r}: bitmap {bitmap!r} is not persistent")
        disks.append(CheckpointDisk(name=disk, checkpoint="bitmap", bitmap=bitmap))
    if not any(d.checkpoint == "bitmap" for d in disks):
        raise InvalidInputError(f"checkpoint {spec.name} covers no disk with a bitmap")
    return Checkpoint(
        name=spec.name,
        parent=spec.parent if spec.parent in names else None,
        creation_time=spec.creation_time,
        seq=next_seq(known),
        description=spec.description,
        disks=tuple(disks),
        origin="redefined",
    )
