"""Names of everything qmpbackup creates in QEMU: all start with ``qmpbackup-``."""

from __future__ import annotations

PREFIX = "qmpbackup-"


PULL_PREFIX = f"{PREFIX}pull-"


def pull_job(disk: str) -> str:
    """The ``block-stream`` job of ``blockpull`` on ``disk``: not a backup's, so ``recover``
    leaves it running (a stream leaves its image valid at every instant)."""
    return f"{PULL_PREFIX}{disk}"


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


def fleece_node(backup_id: int, disk: str) -> str:
    """The scratch node that keeps the old data of clusters the guest overwrites."""
    return f"{PREFIX}{backup_id}-{disk}-fleece"


def cbw_node(backup_id: int, disk: str) -> str:
    """The copy-before-write filter the fleecing job inserts above the disk."""
    return f"{PREFIX}{backup_id}-{disk}-cbw"


def access_node(backup_id: int, disk: str) -> str:
    """The snapshot-access node: the point-in-time view that is exported."""
    return f"{PREFIX}{backup_id}-{disk}-access"


def view_node(backup_id: int, disk: str) -> str:
    """The node that is exported: the point-in-time view, with reads split by cluster."""
    return f"{PREFIX}{backup_id}-{disk}-view"


def export_id(backup_id: int, disk: str) -> str:
    """The block export of ``disk``'s point-in-time view."""
    return f"{PREFIX}{backup_id}-{disk}"


def secret_object(backup_id: int, disk: str) -> str:
    """The ``secret`` object holding the passphrase of ``disk``'s encrypted target or scratch."""
    return f"{PREFIX}{backup_id}-{disk}-secret"


def tls_creds(backup_id: int) -> str:
    """The TLS credentials object of the NBD server."""
    return f"{PREFIX}{backup_id}-tls"


def tls_authz(backup_id: int) -> str:
    """The allow-list of client certificate names."""
    return f"{PREFIX}{backup_id}-authz"
