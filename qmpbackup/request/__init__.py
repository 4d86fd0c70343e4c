"""Backup and checkpoint requests: pydantic models and their XML/YAML/JSON loader."""

from qmpbackup.request.loader import (
    MAX_SPEC_BYTES,
    load_backup_spec,
    load_checkpoint_spec,
    parse_backup_spec,
    parse_checkpoint_spec,
)
from qmpbackup.request.models import (
    BackupSpec,
    CheckpointDiskSpec,
    CheckpointSpec,
    DiskBackupSpec,
    ServerSpec,
)

__all__ = [
    "MAX_SPEC_BYTES",
    "BackupSpec",
    "CheckpointDiskSpec",
    "CheckpointSpec",
    "DiskBackupSpec",
    "ServerSpec",
    "load_backup_spec",
    "load_checkpoint_spec",
    "parse_backup_spec",
    "parse_checkpoint_spec",
]
