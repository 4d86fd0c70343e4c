"""Which level each disk's next backup takes: ``full``, ``inc`` or ``diff``, and why.

``auto`` takes an incremental for a disk whose chain is valid and a full for
any other disk, saying why; explicit ``inc``/``diff`` refuse instead of falling
back.  A chain is valid when the disk was backed up before under the same
identity and size, and the checkpoint that backup created still has a
usable bitmap (present on the top layer, recording, consistent, not busy) of
the granularity recorded then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from ..errors import PlanError
from ..qmp.graph import BlockGraph
from ..request.models import Level, RequestedLevel
from ..state.checkpoints import Checkpoint
from .chain import usable_checkpoint_layers


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


class LevelDecision(BaseModel):
    """One disk's level, the checkpoint it starts from, and the reason."""

    model_config = ConfigDict(frozen=True)

    disk: str
    level: Level
    since: str | None
    reason: str


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
    if entry is None or entry.checkpoint != "bitmap" or entry.bitmap is None:
        return f"checkpoint {name} does not cover {disk}"
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
) -> list[LevelDecision]:
    """Decide each disk's level; PlanError when an explicit inc/diff cannot be had."""
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
        problem = _chain_problem(disk, graph, checkpoints, past, name, created)
        if problem is None:
            decisions.append(
                LevelDecision(disk=disk, level=level, since=name, reason=f"changes since {name}")
            )
        elif requested == "auto":
            decisions.append(LevelDecision(disk=disk, level="full", since=None, reason=problem))
        else:
            raise PlanError(f"no {level} backup of {disk}: {problem}")
    return decisions
