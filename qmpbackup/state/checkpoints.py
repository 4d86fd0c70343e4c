"""Checkpoint metadata, kept as one JSON file per checkpoint in the state directory.

On each disk a checkpoint is a persistent dirty bitmap named after it that
records from its creation on; this module keeps what QEMU does not: the
parent, creation time, description and the disks it covers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..errors import UnknownCheckpointError
from ..files import atomic_write_text


class CheckpointDisk(BaseModel):
    """How one disk takes part in a checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    checkpoint: str = "bitmap"
    bitmap: str | None = None


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

    def bitmap_disks(self) -> list[CheckpointDisk]:
        """Disks that have a bitmap for this checkpoint."""
        return [d for d in self.disks if d.checkpoint == "bitmap" and d.bitmap]

    def disk(self, name: str) -> CheckpointDisk | None:
        """The entry for disk ``name``, if the checkpoint covers it."""
        return next((d for d in self.disks if d.name == name), None)

    def to_xml(self, sizes: dict[str, int] | None = None, domain: str | None = None) -> str:
        """libvirt ``<domaincheckpoint>`` XML, with per-disk sizes when given."""
        from xml.sax.saxutils import escape

        def attr(value: str) -> str:
            return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"

        lines = ["<domaincheckpoint>", f"  <name>{escape(self.name)}</name>"]
        if self.description:
            lines.append(f"  <description>{escape(self.description)}</description>")
        if self.parent:
            lines.append(f"  <parent>\n    <name>{escape(self.parent)}</name>\n  </parent>")
        lines.append(f"  <creationTime>{self.creation_time}</creationTime>")
        lines.append("  <disks>")
        for disk in self.disks:
            attrs = f"name={attr(disk.name)} checkpoint={attr(disk.checkpoint)}"
            if disk.checkpoint == "bitmap" and disk.bitmap:
                attrs += f" bitmap={attr(disk.bitmap)}"
                if sizes is not None and disk.name in sizes:
                    attrs += f" size='{sizes[disk.name]}'"
            lines.append(f"    <disk {attrs}/>")
        lines.append("  </disks>")
        if domain:
            lines.append(f"  <domain>\n    <name>{escape(domain)}</name>\n  </domain>")
        lines.append("</domaincheckpoint>")
        return "\n".join(lines) + "\n"


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
    """Checkpoint records under ``<state dir>/checkpoints``."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "checkpoints"

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load_all(self) -> list[Checkpoint]:
        """Every recorded checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        records = [
            Checkpoint.model_validate(json.loads(path.read_text()))
            for path in self.directory.glob("*.json")
        ]
        return order_oldest_first(records)

    def save(self, checkpoint: Checkpoint) -> None:
        """Record ``checkpoint`` (atomically replacing an older record)."""
        atomic_write_text(self._path(checkpoint.name), checkpoint.model_dump_json(indent=2))

    def delete(self, name: str) -> None:
        """Forget the checkpoint called ``name``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))
