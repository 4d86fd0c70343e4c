"""Facts about a disk's chain that several plans need."""

from __future__ import annotations

from ..errors import PlanError
from ..qapi.commands import BitmapRef, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, QMPCommand
from ..qmp.graph import BitmapLayer, BlockGraph, BlockNode


def persistent_bitmap_problem(graph: BlockGraph, disk: str) -> str | None:
    """Why the top layer of ``disk`` cannot keep a persistent bitmap, or None if it can."""
    top = graph.top_node(disk)
    if top.driver != "qcow2":
        return (
            f"checkpoints need a qcow2 top layer, not {top.driver} "
            "(persistent bitmaps live in qcow2 files)"
        )
    if top.read_only:
        return "it is read-only: it cannot hold a checkpoint"
    return None


def require_persistent_bitmaps(graph: BlockGraph, disk: str) -> BlockNode:
    """The top node of ``disk``, which must be a writable qcow2 to keep a checkpoint bitmap.

    PlanError otherwise, telling to leave the disk out, as libvirt does.
    """
    problem = persistent_bitmap_problem(graph, disk)
    if problem is not None:
        raise PlanError(
            f"disk {disk!r}: {problem}; leave it out of the checkpoint with "
            f"checkpoint='no' for that disk"
        )
    return graph.top_node(disk)


def usable_checkpoint_layers(graph: BlockGraph, disk: str, bitmap: str) -> list[BitmapLayer]:
    """Layers holding ``bitmap`` for ``disk``; PlanError if they cannot serve a backup."""
    layers = graph.bitmap_layers(disk, bitmap)
    if not layers:
        raise PlanError(
            f"disk {disk!r}: bitmap {bitmap!r} of the checkpoint is missing in QEMU; "
            "take a full backup"
        )
    for layer in layers:
        if layer.bitmap.inconsistent:
            raise PlanError(
                f"disk {disk!r}: bitmap {bitmap!r} on node {layer.node} is inconsistent "
                "(QEMU stopped without saving it); run 'qmpbackup recover' to remove it, "
                "then take a full backup"
            )
        if layer.bitmap.busy:
            raise PlanError(f"disk {disk!r}: bitmap {bitmap!r} is in use by another job")
    if layers[0].node != graph.disk(disk).top:
        raise PlanError(
            f"disk {disk!r}: bitmap {bitmap!r} is not on the top layer, so writes since "
            "the layer was added are not tracked; take a full backup"
        )
    if not layers[0].bitmap.recording:
        raise PlanError(
            f"disk {disk!r}: bitmap {bitmap!r} is not recording, so it misses changes; "
            "take a full backup"
        )
    return layers


def merged_bitmap(
    node: str, name: str, layers: list[BitmapLayer], granularity: int
) -> list[QMPCommand]:
    """Transaction actions making ``name`` on ``node``: disabled, the union of ``layers``.

    Being disabled, it keeps exactly the changes up to the transaction's instant.
    """
    return [
        BlockDirtyBitmapAdd(
            node=node, name=name, granularity=granularity, persistent=False, disabled=True
        ),
        BlockDirtyBitmapMerge(
            node=node,
            target=name,
            bitmaps=tuple(BitmapRef(node=la.node, name=la.bitmap.name) for la in layers),
        ),
    ]
