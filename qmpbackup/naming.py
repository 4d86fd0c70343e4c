"""Names of everything qmpbackup creates in QEMU: all start with ``qmpbackup-``."""

from __future__ import annotations

PREFIX = "qmpbackup-"


def job_id(backup_id: int, disk: str) -> str:
    """The backup job copying ``disk`` for backup ``backup_id``."""
    return f"{PREFIX}{backup_id}-{disk}"


def create_job_id(backup_id: int, disk: str, what: str) -> str:
    """The ``blockdev-create`` job making a target image."""
    return f"{PREFIX}{backup_id}-{disk}-create-{what}"


def target_node(backup_id: int, disk: str) -> str:
    """The node the backup of ``disk`` writes to."""
    return f"{PREFIX}{backup_id}-{disk}-target"


def target_file_node(backup_id: int, disk: str) -> str:
    """The protocol node under :func:`target_node`."""
    return f"{PREFIX}{backup_id}-{disk}-target-file"


def temporary_bitmap(backup_id: int, disk: str) -> str:
    """The bitmap an incremental backup of ``disk`` copies from."""
    return f"{PREFIX}{backup_id}-{disk}"


def size_bitmap(disk: str) -> str:
    """The bitmap that merges a checkpoint's layers to measure its size."""
    return f"{PREFIX}size-{disk}"


def is_ours(name: str) -> bool:
    """True for a node, job, export or bitmap qmpbackup created."""
    return name.startswith(PREFIX)
