"""Backup and checkpoint requests: pydantic models, their XML/YAML/JSON loader, their XML writer."""

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
from qmpbackup.request.xml import backup_to_xml, checkpoint_to_xml

__all__ = [
    "MAX_SPEC_BYTES",
    "BackupSpec",
    "CheckpointDiskSpec",
    "CheckpointSpec",
    "DiskBackupSpec",
    "ServerSpec",
    "backup_to_xml",
    "checkpoint_to_xml",
    "load_backup_spec",
    "load_checkpoint_spec",
    "parse_backup_spec",
    "parse_checkpoint_spec",
]
