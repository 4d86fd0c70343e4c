"""What a repository backup reports while it runs: :class:`BackupEvent` values.

They go to an :class:`EventSink`; the CLI renders them (:mod:`qmpbackup.cli.progress`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

EventKind = Literal[
    "adopted",  # a checkpoint this host's state lacked was adopted: message
    "level",  # a disk's level was decided: level, reason
    "quiesced",  # the guest was frozen around the instant: seconds
    "skipped",  # a disk is not backed up by default (the firmware's code): reason
    "begin",  # the backup's instant is set: backup id, checkpoint
    "progress",  # bytes copied so far of all disks: done, total
    "disk-done",  # one disk's image, digests and check are finished
    "committed",  # the backup is complete in the repository
    "released",  # a checkpoint no longer needed was deleted
    "aborted",  # the backup was stopped and its traces removed
    "migration",  # a live migration was begun during the backup: message (what became of it)
    "compression",  # how the new images are compressed: message
    "pull-begin",  # blockpull: a disk's pull is running: disk, message (its image)
    "pull-done",  # blockpull: the disk's image is standalone: disk, message (its image)
]


@dataclass(frozen=True)
class BackupEvent:
    """One step of a repository backup."""

    kind: EventKind
    backup: str | None = None
    disk: str | None = None
    level: str | None = None
    reason: str | None = None
    done: int = 0
    total: int = 0
    message: str | None = None
    seconds: float | None = None
    time: float = field(default_factory=time.time)


class EventSink(Protocol):
    """Anything that takes backup events."""

    def __call__(self, event: BackupEvent) -> None: ...
