"""Plans for checkpoints: created on their own or with a backup, deleted, measured."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidInputError
from ..qapi.commands import (
    BlockDirtyBitmapAdd,
    BlockDirtyBitmapRemove,
    QMPCommand,
    Transaction,
)
from ..qmp.graph import BlockGraph
from ..request.models import CheckpointSpec
from ..state.checkpoints import (
    Checkpoint,
    CheckpointDisk,
    descendants,
    find_checkpoint,
    next_parent,
    next_seq,
)
from . import naming
from .chain import merged_bitmap, persistent_bitmap_problem, require_persistent_bitmaps
from .plan import Plan, Step


def plan_checkpoint_create(
    spec: CheckpointSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    now: int,
    quiesce: bool = False,
) -> tuple[Plan, Checkpoint]:
    """One transaction adding a persistent, recording bitmap on each disk's top layer;
    with ``quiesce``, sent with the guest's filesystems frozen.

    As in libvirt: without a name, the checkpoint is named after ``now``; once
    ``spec.disks`` lists any disk, the disks it does not list get no bitmap.
    """
    spec = spec.named(now)
    if any(c.name == spec.name for c in checkpoints):
        raise InvalidInputError(f"checkpoint {spec.name!r} already exists")
    listed = {graph.disk(d.name).name: d for d in spec.disks}
    entries: list[CheckpointDisk] = []
    actions: list[QMPCommand] = []
    undo: list[QMPCommand] = []
    for name, disk in graph.disks.items():
        entry = listed.get(name)
        if (entry is not None and entry.checkpoint == "no") or (entry is None and listed):
            entries.append(CheckpointDisk(name=name, checkpoint="no"))
            continue
        if entry is None and (disk.read_only or not disk.chain):
            continue
        top = require_persistent_bitmaps(graph, name)
        bitmap = (entry.bitmap if entry else None) or spec.name
        if top.bitmap(bitmap) is not None:
            raise InvalidInputError(f"disk {name!r} already has a bitmap named {bitmap!r}")
        actions.append(BlockDirtyBitmapAdd(node=top.node_name, name=bitmap, persistent=True))
        undo.append(BlockDirtyBitmapRemove(node=top.node_name, name=bitmap))
        entries.append(CheckpointDisk(name=name, checkpoint="bitmap", bitmap=bitmap))
    if not actions:
        raise InvalidInputError(f"checkpoint {spec.name!r} would cover no disk")
    checkpoint = Checkpoint(
        name=spec.name,
        parent=next_parent(checkpoints),
        creation_time=now,
        seq=next_seq(checkpoints),
        description=spec.description,
        disks=tuple(entries),
    )
    step = Step(
        command=Transaction(actions=tuple(actions)),
        reason=f"create checkpoint {spec.name} on every disk at one instant",
        undo=tuple(undo),
        quiesce=quiesce,
    )
    return Plan(steps=(step,)), checkpoint


def checkpoint_with_backup(
    spec: CheckpointSpec | None,
    disks: Sequence[str],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    parent: str | None,
    now: int,
    volatile: bool = False,
) -> Checkpoint | None:
    """The checkpoint a backup of ``disks`` creates in its transaction, if it asks for one.

    A disk that cannot hold a persistent bitmap gets a non-persistent one with
    ``volatile`` (recorded ``persistent=False``); without, it is refused.

    Raises InvalidInputError for a name or bitmap that exists or a checkpoint disk the
    backup leaves out, PlanError for a disk that cannot hold a persistent bitmap.
    """
    if spec is None:
        return None
    spec = spec.named(now)
    if any(c.name == spec.name for c in checkpoints):
        raise InvalidInputError(f"checkpoint {spec.name!r} already exists")
    for entry in spec.disks:
        graph.disk(entry.name)
        if entry.checkpoint == "bitmap" and entry.name not in disks:
            raise InvalidInputError(f"checkpoint disk {entry.name!r} is not part of this backup")
    entries: list[CheckpointDisk] = []
    for disk in disks:
        listed = next((d for d in spec.disks if graph.aliases.get(d.name, d.name) == disk), None)
        if (listed is not None and listed.checkpoint == "no") or (listed is None and spec.disks):
            entries.append(CheckpointDisk(name=disk, checkpoint="no"))
            continue
        bitmap = (listed.bitmap if listed else None) or spec.name
        persistent = not volatile or persistent_bitmap_problem(graph, disk) is None
        top = require_persistent_bitmaps(graph, disk) if persistent else graph.top_node(disk)
        if top.bitmap(bitmap) is not None:
            raise InvalidInputError(f"disk {disk!r} already has a bitmap named {bitmap!r}")
        entries.append(
            CheckpointDisk(name=disk, checkpoint="bitmap", bitmap=bitmap, persistent=persistent)
        )
    return Checkpoint(
        name=spec.name,
        parent=parent,
        creation_time=now,
        seq=next_seq(checkpoints),
        description=spec.description,
        disks=tuple(entries),
    )


def _removals(checkpoint: Checkpoint, graph: BlockGraph) -> list[QMPCommand]:
    out: list[QMPCommand] = []
    for entry in checkpoint.bitmap_disks():
        if entry.name not in graph.disks:
            continue
        for layer in graph.bitmap_layers(entry.name, entry.bitmap or ""):
            out.append(BlockDirtyBitmapRemove(node=layer.node, name=layer.bitmap.name))
    return out


def plan_checkpoint_delete(
    name: str,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    children: bool = False,
    metadata_only: bool = False,
) -> tuple[Plan, list[Checkpoint]]:
    """Remove a checkpoint's bitmaps (and its descendants' with ``children``).

    Every checkpoint bitmap records from its creation on, so removing one loses
    nothing for older checkpoints: their bitmaps hold the same changes.
    """
    checkpoint = find_checkpoint(checkpoints, name)
    doomed = [checkpoint] + (descendants(checkpoints, name) if children else [])
    if metadata_only:
        return Plan(), doomed
    actions = [action for c in doomed for action in _removals(c, graph)]
    if not actions:
        return Plan(), doomed
    names = ", ".join(c.name for c in doomed)
    step = Step(
        command=Transaction(actions=tuple(actions)),
        reason=f"remove the bitmaps of checkpoint {names}",
    )
    return Plan(steps=(step,)), doomed


def plan_checkpoint_size(
    checkpoint: Checkpoint, graph: BlockGraph
) -> tuple[dict[str, int], Plan, Plan]:
    """Dirty bytes per disk since ``checkpoint``.

    Disks whose bitmap lives on one layer are answered from the graph.  For
    the others, the first plan merges the layers into a temporary bitmap whose
    count is then read, and the second plan removes it.
    """
    sizes: dict[str, int] = {}
    merge: list[QMPCommand] = []
    cleanup: list[QMPCommand] = []
    for entry in checkpoint.bitmap_disks():
        if entry.name not in graph.disks:
            continue
        layers = graph.bitmap_layers(entry.name, entry.bitmap or "")
        if len(layers) <= 1:
            sizes[entry.name] = layers[0].bitmap.count if layers else 0
            continue
        top = graph.disk(entry.name).top
        temp = naming.size_bitmap(entry.name)
        merge += merged_bitmap(top, temp, layers, min(la.bitmap.granularity for la in layers))
        cleanup.append(BlockDirtyBitmapRemove(node=top, name=temp))
    if not merge:
        return sizes, Plan(), Plan()
    measure = Plan(
        steps=(
            Step(
                command=Transaction(actions=tuple(merge)),
                reason=f"merge the layers of checkpoint {checkpoint.name} to measure them",
                undo=tuple(cleanup),
            ),
        )
    )
    remove = Plan(
        steps=(
            Step(
                command=Transaction(actions=tuple(cleanup)),
                reason="remove the measuring bitmaps",
            ),
        )
    )
    return sizes, measure, remove
