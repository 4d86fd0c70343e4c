"""Checkpoint metadata, kept as one JSON file per checkpoint in the state directory.

On each disk a checkpoint is a persistent dirty bitmap named after it that
records from its creation on; this module keeps what QEMU does not: the
parent, creation time, description and the disks it covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import UnknownCheckpointError
from ..request.render import XmlElement, render_xml
from .store import JsonStore


class CheckpointDisk(BaseModel):
    """How one disk takes part in a checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    checkpoint: str = "bitmap"
    bitmap: str | None = None
    # False for a disk that cannot keep a persistent bitmap (a raw disk, a pflash NVRAM):
    # its bitmap lives in this QEMU process only, and is gone once QEMU restarts.
    persistent: bool = True


class Checkpoint(BaseModel):
    """A checkpoint as recorded in the state directory."""

    model_config = ConfigDict(frozen=True)

    name: str
    parent: str | None = None
    creation_time: int
    # Creation order: several checkpoints can share a creation second.
    seq: int = 0
    description: str | None = None
    disks: tuple[CheckpointDisk, ...] = ()
    # Where this host's record came from: made here, redefined from a dumped
    # <domaincheckpoint> (checkpoint-create --redefine), or adopted from the bitmaps the
    # VM's disks carry and the repository's records (qmpbackup.planner.adopt).
    origin: Literal["created", "redefined", "adopted"] = "created"

    def bitmap_disks(self) -> list[CheckpointDisk]:
        """Disks that have a bitmap for this checkpoint."""
        return [d for d in self.disks if d.checkpoint == "bitmap" and d.bitmap]

    def disk(self, name: str) -> CheckpointDisk | None:
        """The entry for disk ``name``, if the checkpoint covers it."""
        return next((d for d in self.disks if d.name == name), None)

    def to_xml(self, sizes: dict[str, int] | None = None, domain: str | None = None) -> str:
        """libvirt ``<domaincheckpoint>`` XML (as ``virsh checkpoint-dumpxml`` writes it),
        with per-disk sizes when given."""
        children = [XmlElement("name", text=self.name)]
        if self.description:
            children.append(XmlElement("description", text=self.description))
        if self.parent:
            children.append(XmlElement("parent", children=[XmlElement("name", text=self.parent)]))
        children.append(XmlElement("creationTime", text=str(self.creation_time)))
        disks = []
        for disk in self.disks:
            bitmap = disk.bitmap if disk.checkpoint == "bitmap" and disk.bitmap else None
            size = sizes.get(disk.name) if bitmap and sizes is not None else None
            attrs = {"name": disk.name, "checkpoint": disk.checkpoint, "bitmap": bitmap}
            # Not libvirt's: a bitmap kept only while this QEMU runs says so.
            attrs["persistent"] = "no" if bitmap and not disk.persistent else None
            disks.append(XmlElement("disk", {**attrs, "size": None if size is None else str(size)}))
        children.append(XmlElement("disks", children=disks))
        if domain:
            children.append(XmlElement("domain", children=[XmlElement("name", text=domain)]))
        return render_xml(XmlElement("domaincheckpoint", children=children), quote="'")


def order_oldest_first(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Checkpoints in creation order, parents before children."""
    return sorted(checkpoints, key=lambda c: (c.seq, c.creation_time, c.name))


def next_seq(checkpoints: Iterable[Checkpoint]) -> int:
    """The creation order number of the next checkpoint."""
    return max((c.seq for c in checkpoints), default=0) + 1


def next_parent(checkpoints: Iterable[Checkpoint]) -> str | None:
    """The newest checkpoint's name: the parent of the next checkpoint."""
    ordered = order_oldest_first(checkpoints)
    return ordered[-1].name if ordered else None


def find_checkpoint(checkpoints: Iterable[Checkpoint], name: str) -> Checkpoint:
    """The checkpoint called ``name``; UnknownCheckpointError if there is none."""
    for checkpoint in checkpoints:
        if checkpoint.name == name:
            return checkpoint
    raise UnknownCheckpointError(f"unknown checkpoint {name!r}")


def descendants(checkpoints: Iterable[Checkpoint], name: str) -> list[Checkpoint]:
    """Every checkpoint below ``name`` in the tree, oldest first."""
    items = order_oldest_first(checkpoints)
    found: set[str] = {name}
    out: list[Checkpoint] = []
    for checkpoint in items:
        if checkpoint.parent in found:
            found.add(checkpoint.name)
            out.append(checkpoint)
    return out


class CheckpointStore:
    """Checkpoint metadata under ``<state dir>/checkpoints``."""

    def __init__(self, state_dir: Path) -> None:
        self._files = JsonStore(state_dir / "checkpoints", Checkpoint)

    def load_all(self) -> list[Checkpoint]:
        """Every recorded checkpoint, oldest first."""
        return order_oldest_first(self._files.items())

    def save(self, checkpoint: Checkpoint) -> None:
        """Record ``checkpoint`` (atomically replacing an older record)."""
        self._files.write(checkpoint.name, checkpoint)

    def save_all(self, checkpoints: Iterable[Checkpoint]) -> None:
        """Record each of ``checkpoints``."""
        for checkpoint in checkpoints:
            self.save(checkpoint)

    def delete(self, name: str) -> None:
        """Forget the checkpoint called ``name``."""
        self._files.remove(name)

    def forget(self, names: Sequence[str]) -> None:
        """Drop the metadata of ``names``; their children take their parent."""
        everything = self.load_all()
        parents = {c.name: c.parent for c in everything}
        for checkpoint in everything:
            if checkpoint.name in names:
                continue
            parent = checkpoint.parent
            while parent is not None and parent in names:
                parent = parents.get(parent)
            if parent != checkpoint.parent:
                self.save(checkpoint.model_copy(update={"parent": parent}))
        for name in names:
            self.delete(name)

    def uncover(self, name: str, disks: Sequence[str]) -> None:
        """Checkpoint ``name`` no longer covers ``disks`` (their bitmaps are gone)."""
        checkpoint = find_checkpoint(self.load_all(), name)
        entries = tuple(
            d.model_copy(update={"checkpoint": "no", "bitmap": None}) if d.name in disks else d
            for d in checkpoint.disks
        )
        self.save(checkpoint.model_copy(update={"disks": entries}))
