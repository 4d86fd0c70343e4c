"""Backup and checkpoint requests: pydantic models, their XML/YAML/JSON loader, their XML writer.

The names below load their module on first use: the repository needs the models,
not the loaders' YAML and XML parsers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .loader import (
        MAX_SPEC_BYTES,
        load_backup_spec,
        load_checkpoint_spec,
        parse_backup_spec,
        parse_checkpoint_spec,
    )
    from .models import (
        BackupSpec,
        CheckpointDiskSpec,
        CheckpointSpec,
        DiskBackupSpec,
        EncryptionSpec,
        SecretSpec,
        ServerSpec,
    )
    from .xml import backup_to_xml, checkpoint_to_xml

_HOMES = {
    "MAX_SPEC_BYTES": "loader",
    "load_backup_spec": "loader",
    "load_checkpoint_spec": "loader",
    "parse_backup_spec": "loader",
    "parse_checkpoint_spec": "loader",
    "BackupSpec": "models",
    "CheckpointDiskSpec": "models",
    "CheckpointSpec": "models",
    "DiskBackupSpec": "models",
    "EncryptionSpec": "models",
    "SecretSpec": "models",
    "ServerSpec": "models",
    "backup_to_xml": "xml",
    "checkpoint_to_xml": "xml",
}

__all__ = [
    "MAX_SPEC_BYTES",
    "BackupSpec",
    "CheckpointDiskSpec",
    "CheckpointSpec",
    "DiskBackupSpec",
    "EncryptionSpec",
    "SecretSpec",
    "ServerSpec",
    "backup_to_xml",
    "checkpoint_to_xml",
    "load_backup_spec",
    "load_checkpoint_spec",
    "parse_backup_spec",
    "parse_checkpoint_spec",
]


__getattr__ = exports(__name__, _HOMES)
