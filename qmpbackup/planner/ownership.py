"""Whose is a bitmap: a checkpoint's (known here, and how), one of qmpbackup's
temporaries, or another tool's.

A name is not proof. Another tool may use the ``qmpbackup-`` prefix (abbbi/qmpbackup,
which users migrate from, names its persistent checkpoint bitmaps
``qmpbackup-<uuid>``). A temporary of qmpbackup is exactly ``qmpbackup-<backup
id>-<disk>`` or ``qmpbackup-size-<disk>`` for a disk of this VM, and is never
persistent (qmpbackup creates them transient and disabled): a persistent bitmap is
never taken for one, so ``recover`` never removes it. A checkpoint's bitmap is one a
checkpoint of this host's state names on that disk (made here, redefined or adopted).
Everything else is foreign: shown, never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..qmp.graph import Bitmap, BlockGraph
from ..state.checkpoints import Checkpoint
from .facts import Inventory
from .naming import PREFIX

_TEMPORARY = re.compile(rf"{re.escape(PREFIX)}(?:[0-9]+|size)-(?P<disk>.+)")
# The checkpoint of a one-shot backup (qmpbackup.repo.backup.CHECKPOINT_NAME): a name
# only qmpbackup's one-shot makes, its backup's id in it.
ONESHOT_CHECKPOINT = re.compile(r"backup-\d{8}T\d{6}Z-[1-9]\d*")


def is_temporary(name: str, persistent: bool, disks: Iterable[str]) -> bool:
    """True when bitmap ``name`` is one of qmpbackup's temporaries for one of ``disks``."""
    found = _TEMPORARY.fullmatch(name)
    return not persistent and found is not None and found["disk"] in set(disks)


def temporary_bitmaps(inventory: Inventory) -> set[tuple[str, str]]:
    """(node, bitmap) of every temporary of ours in ``inventory``: what recover removes."""
    disks = set(inventory.disk_of.values())
    kept = set(inventory.persistent)
    return {b for b in inventory.bitmaps if is_temporary(b[1], b in kept, disks)}


def bitmap_owner(
    disk: str, bitmap: Bitmap, checkpoints: Iterable[Checkpoint], disks: Iterable[str]
) -> str:
    """Whose ``bitmap`` on ``disk`` is, in words: ``checkpoint NAME (ORIGIN)``,
    ``qmpbackup temporary`` or ``foreign (not qmpbackup's: left alone)``."""
    for checkpoint in checkpoints:
        entry = checkpoint.disk(disk)
        if entry is not None and entry.bitmap == bitmap.name:
            origin = "made on this host" if checkpoint.origin == "created" else checkpoint.origin
            return f"checkpoint {checkpoint.name} ({origin})"
    if is_temporary(bitmap.name, bitmap.persistent, disks):
        return "qmpbackup temporary"
    if bitmap.persistent and ONESHOT_CHECKPOINT.fullmatch(bitmap.name):
        return "a one-shot checkpoint not known here (recover --repo tells an orphan)"
    return "foreign (not qmpbackup's: left alone)"


def bitmap_owners(graph: BlockGraph, checkpoints: Iterable[Checkpoint]) -> Mapping[str, str]:
    """``disk/bitmap`` -> :func:`bitmap_owner`, for every bitmap in each disk's chain."""
    known = list(checkpoints)
    owners: dict[str, str] = {}
    for disk in graph.disks.values():
        for node_name in disk.chain:
            for bitmap in graph.node(node_name).bitmaps:
                owners[f"{disk.name}/{bitmap.name}"] = bitmap_owner(
                    disk.name, bitmap, known, graph.disks
                )
    return owners
