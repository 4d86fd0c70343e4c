"""Which level each disk's next backup takes: ``full``, ``inc`` or ``diff``, and why.

``auto`` takes an incremental for a disk whose chain is valid and a full for
any other disk, saying why; explicit ``inc``/``diff`` refuse instead of falling
back.  A chain is valid when the disk was backed up before under the same
identity and size, and the checkpoint that backup created still has a
usable bitmap (present on the top layer, recording, consistent, not busy) of
the granularity recorded then.

A disk that cannot keep a persistent bitmap (raw, a pflash NVRAM) has in the
one-shot's checkpoint a non-persistent bitmap: its chain is valid while the
QEMU that made it runs; once QEMU restarted, the bitmap is gone and the disk
gets a full, the reason saying so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from ..errors import PlanError
from ..qmp.graph import BlockGraph
from ..request.models import Level, RequestedLevel
from ..state.checkpoints import Checkpoint
from .chain import persistent_bitmap_problem, usable_checkpoint_layers


class DiskHistory(BaseModel):
    """What the repository remembers of a disk's last complete backups."""

    model_config = ConfigDict(frozen=True)

    disk: str
    image: str
    virtual_size: int
    granularity: int | None
    last_checkpoint: str | None
    last_checkpoint_time: int | None
    full_checkpoint: str | None
    full_checkpoint_time: int | None
    compression: str | None = None  # the chain's qcow2 compression type


class LevelDecision(BaseModel):
    """One disk's level, the checkpoint it starts from, and the reason."""

    model_config = ConfigDict(frozen=True)

    disk: str
    level: Level
    since: str | None
    reason: str


_GONE = (
    "{kind}: its bitmap of checkpoint {name} was not persistent and is gone (QEMU restarted since)"
)


def _kind(graph: BlockGraph, disk: str) -> str:
    """What kind of disk cannot keep a persistent bitmap: ``raw disk``, ``read-only disk``."""
    top = graph.top_node(disk)
    return f"{top.driver} disk" if top.driver != "qcow2" else "read-only disk"


def _since(
    graph: BlockGraph, disk: str, name: str | None, checkpoints: Sequence[Checkpoint]
) -> str:
    """The reason of an incremental or differential from ``name``."""
    entry = next((c.disk(disk) for c in checkpoints if c.name == name), None)
    if entry is not None and not entry.persistent:
        return (
            f"changes since {name}; {_kind(graph, disk)}: "
            "a non-persistent bitmap, valid while this QEMU runs"
        )
    return f"changes since {name}"


def _compression_problem(
    disk: str, history: DiskHistory | None, compression: str | None
) -> str | None:
    """Why this run's compression cannot continue ``disk``'s chain, or None."""
    if history is None or history.compression == compression:
        return None
    before = history.compression or "uncompressed"
    now = compression or "uncompressed"
    return f"the chain of {disk} is {before}, this run {now}: a new compression starts a full"


def _chain_problem(
    disk: str,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    history: DiskHistory | None,
    name: str | None,
    created: int | None,
) -> str | None:
    """Why an incremental of ``disk`` from checkpoint ``name`` would be wrong, or None."""
    if history is None:
        return f"no earlier backup of {disk}"
    top = graph.top_node(disk)
    if graph.image_path(top) != history.image:
        return f"{disk} is now {graph.image_path(top)}, not {history.image} as backed up"
    if top.virtual_size != history.virtual_size:
        return f"{disk} was resized from {history.virtual_size} to {top.virtual_size} bytes"
    if name is None:
        return f"the last backup of {disk} created no checkpoint"
    checkpoint = next((c for c in checkpoints if c.name == name), None)
    if checkpoint is None:
        return f"checkpoint {name} of the last backup is gone"
    if created is not None and checkpoint.creation_time != created:
        return f"checkpoint {name} was made again after the backup: it belongs to another chain"
    entry = checkpoint.disk(disk)
    volatile = persistent_bitmap_problem(graph, disk) is not None
    if entry is not None and not entry.persistent and entry.checkpoint != "bitmap":
        return _GONE.format(kind=_kind(graph, disk), name=name)
    if entry is None or entry.checkpoint != "bitmap" or entry.bitmap is None:
        if volatile:
            return f"{_kind(graph, disk)}: no persistent bitmap, and checkpoint {name} has none"
        return f"checkpoint {name} does not cover {disk}"
    if not entry.persistent and not graph.bitmap_layers(disk, entry.bitmap):
        return _GONE.format(kind=_kind(graph, disk), name=name)
    try:
        layers = usable_checkpoint_layers(graph, disk, entry.bitmap)
    except PlanError as exc:
        return str(exc)
    if history.granularity is not None and layers[0].bitmap.granularity != history.granularity:
        return (
            f"bitmap {entry.bitmap} of {disk} has granularity {layers[0].bitmap.granularity}, "
            f"not {history.granularity} as recorded: it belongs to another chain"
        )
    return None


def decide_levels(
    requested: RequestedLevel,
    disks: Sequence[str],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    history: Mapping[str, DiskHistory],
    compression: str | None = None,
) -> list[LevelDecision]:
    """Decide each disk's level; PlanError when an explicit inc/diff cannot be had.
    ``compression``: this run's; a chain stored otherwise cannot be continued."""
    decisions: list[LevelDecision] = []
    for disk in disks:
        past = history.get(disk)
        if requested == "full":
            decisions.append(LevelDecision(disk=disk, level="full", since=None, reason="asked"))
            continue
        level: Level = "diff" if requested == "diff" else "inc"
        name = past.full_checkpoint if past and level == "diff" else None
        created = past.full_checkpoint_time if past and level == "diff" else None
        if level == "inc" and past is not None:
            name, created = past.last_checkpoint, past.last_checkpoint_time
        problem = _compression_problem(disk, past, compression) or _chain_problem(
            disk, graph, checkpoints, past, name, created
        )
        if problem is None:
            decisions.append(
                LevelDecision(
                    disk=disk,
                    level=level,
                    since=name,
                    reason=_since(graph, disk, name, checkpoints),
                )
            )
        elif requested == "auto":
            decisions.append(LevelDecision(disk=disk, level="full", since=None, reason=problem))
        else:
            raise PlanError(f"no {level} backup of {disk}: {problem}")
    return decisions
