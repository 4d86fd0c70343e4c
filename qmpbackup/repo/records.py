"""The records of a repository: one JSON file per backup, and what a backup reserves.

A :class:`BackupRecord` is the content of ``<repo>/<vm>/backups/<id>.json``; its
:class:`DiskRecord` entries name files relative to the disk's folder. Validation keeps
every name a plain file name and every id of the form ``<UTC time>-<sequence number>``,
so that no record can point outside its repository. :class:`DiskRequest` is what a new
backup asks for, :class:`BackupEntry` what the repository reserved for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import QmpBackupError
from ..request.models import Level, Mode, check_name

RECORDS_DIR = "backups"
IMAGE_SUFFIX = ".qcow2"
DIGESTS_SUFFIX = ".digests"
DEFAULT_DIGEST_BLOCK = 1 << 20  # format 1
NEW_DIGEST_BLOCK = 1 << 16  # format 2: one qcow2 cluster
BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[1-9]\d*$")


class RepositoryError(QmpBackupError):
    """The repository is inconsistent, or an operation on it is refused."""


class RecordError(RepositoryError):
    """A record file cannot be read as the backup its name says."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


def _check_file_name(value: str | None) -> str | None:
    if value is not None and (not value or "/" in value or "\0" in value or value.startswith(".")):
        raise ValueError(f"not a plain file name: {value!r}")
    return value


def check_backup_id(value: str | None) -> str | None:
    """``value`` if it is a backup id (or None); ValueError otherwise."""
    if value is not None and not BACKUP_ID_RE.match(value):
        raise ValueError(f"invalid backup id {value!r}")
    return value


def check_disk_name(name: str) -> str:
    """``name`` if it can name a disk's folder; ValueError otherwise."""
    check_name(name, "disk")
    if name == RECORDS_DIR:
        raise ValueError(f"invalid disk name {name!r}: reserved for the backup records")
    return name


#: A qcow2 compression type of a repository's images.
Compression: TypeAlias = Literal["zstd", "zlib"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiskRecord(_Model):
    """One disk of a backup; file names are relative to the disk's folder."""

    name: str
    file: str
    virtual_size: int = Field(ge=0)
    granularity: int | None = Field(default=None, gt=0)
    level: Level
    parent: str | None = None
    parent_file: str | None = None
    digest_block_size: int = Field(default=DEFAULT_DIGEST_BLOCK, gt=0)
    digests_file: str
    source: str | None = None
    file_digest: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_disk_name(value)

    @field_validator("file", "parent_file", "digests_file")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        return _check_file_name(value)

    @field_validator("parent")
    @classmethod
    def _parent(cls, value: str | None) -> str | None:
        return check_backup_id(value)


class BackupRecord(_Model):
    """The metadata record of one backup, ``<repo>/<vm>/backups/<id>.json``."""

    id: str
    seq: int = Field(ge=1)
    level: Level
    parent: str | None = None
    checkpoint: str | None = None
    checkpoint_time: int | None = None
    created: datetime
    mode: Mode
    # How the digests and file digests are made (qmpbackup.repo.digests); records
    # written before there was a field are format 1.
    format: int = Field(default=1, ge=1)
    # ``--encrypt-key``: the images are LUKS-encrypted qcow2 and the block digests keyed
    # (qmpbackup.images.keyed); records written before there was a field are neither.
    encryption: Literal["luks"] | None = None
    digest_key: Literal["blake3-derive-key"] | None = None
    complete: bool = False
    merged: tuple[str, ...] = ()
    # The qcow2 compression type of the backup's images (``--compress``); None: plain.
    # A chain keeps one: a change starts a new full.
    compression: Compression | None = None
    disks: tuple[DiskRecord, ...]

    @field_validator("id", "parent")
    @classmethod
    def _ids(cls, value: str | None) -> str | None:
        return check_backup_id(value)

    def disk(self, name: str) -> DiskRecord | None:
        """The record of disk ``name`` in this backup, if it has one."""
        return next((d for d in self.disks if d.name == name), None)


def backup_level(disks: Iterable[DiskRecord]) -> Level:
    """The level of a backup of ``disks``: full if all are, else inc if one is, else diff."""
    levels = {d.level for d in disks} - {"full"}
    return "full" if not levels else "inc" if "inc" in levels else "diff"


class DiskRequest(_Model):
    """What :meth:`Repository.begin_backup` needs to know of one disk."""

    name: str
    virtual_size: int = Field(ge=0)
    level: Level
    granularity: int | None = Field(default=None, gt=0)
    digest_block_size: int = Field(default=NEW_DIGEST_BLOCK, gt=0)
    source: str | None = None


class DiskTarget(_Model):
    """Where a backup of one disk goes: ``image`` with ``backing`` (relative) or none."""

    name: str
    image: Path
    digests: Path
    backing: str | None


class BackupEntry(_Model):
    """A reserved backup: its record (as written) and the target paths of its disks."""

    record: BackupRecord
    targets: tuple[DiskTarget, ...]

    @property
    def id(self) -> str:
        """The backup id."""
        return self.record.id

    def target(self, disk: str) -> DiskTarget:
        """The target of disk ``disk``."""
        for target in self.targets:
            if target.name == disk:
                return target
        raise KeyError(disk)
