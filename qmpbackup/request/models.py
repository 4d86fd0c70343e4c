"""Request models: what a user asks for, independent of the input format.

libvirt ``<domainbackup>`` / ``<domaincheckpoint>`` XML, YAML and JSON all
load into these models (see :mod:`qmpbackup.request.loader`).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["push", "pull"]
"""Who copies the data: QEMU into target files (push), or a reader over NBD (pull)."""

Level = Literal["full", "inc", "diff"]
"""A backup's level: everything, the changes since the last backup, or since the last full."""

RequestedLevel = Literal["full", "inc", "diff", "auto"]
"""A level as asked for; ``auto`` is decided per disk (see :mod:`qmpbackup.planner.level`)."""

# Names end up in node names, bitmap names, export names and file names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a safe name for a disk, checkpoint or export."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} name {value!r}: use letters, digits, '_', '.', '+', '-' "
            "(at most 64, not starting with a punctuation mark)"
        )
    return value


# Checkpoint and bitmap names as libvirt's schema allows them (no leading '.', no '/',
# no blank), '+' kept for names made before: they name bitmaps (QEMU takes up to 1023
# bytes), and files: '<name>.json' in the state directory, '<image>.<name>' targets.
CHECKPOINT_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.+-]{0,199}$")


def check_checkpoint_name(value: str, what: str = "checkpoint") -> str:
    """Return ``value`` if it is a checkpoint (or bitmap) name libvirt would accept."""
    if not CHECKPOINT_NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} name {value!r}: use letters, digits, '_', '-', '.', '+' "
            "(at most 200, not starting with '.' or '+')"
        )
    return value


def absolute_path(value: str | None) -> str | None:
    """``value`` resolved against the current directory, as the file QEMU would open.

    Not normalised: ``a/../b`` stays as the kernel resolves it (through symlinks).
    """
    if value is None:
        return None
    if not value:
        raise ValueError("an empty path names no file")
    return value if os.path.isabs(value) else os.path.join(os.getcwd(), value)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerSpec(_Model):
    """NBD server address of a pull backup."""

    transport: Literal["tcp", "unix"] = "tcp"
    name: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    socket: str | None = None
    tls: bool = False

    @field_validator("transport", mode="before")
    @classmethod
    def _transport(cls, value: object) -> object:
        if value == "fd":
            raise ValueError(
                "'fd' needs libvirt's fd passing (virDomainFDAssociate): use tcp or unix"
            )
        return value

    _socket = field_validator("socket")(lambda v: absolute_path(v))

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: object) -> object:
        # pydantic would read true as port 1.
        if isinstance(value, bool):
            raise ValueError("a port is a number, not a boolean")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> ServerSpec:
        if self.transport == "unix" and self.port is not None:
            raise ValueError("a unix socket server takes no port")
        if self.transport == "tcp" and self.socket is not None:
            raise ValueError("a tcp server takes no socket")
        if self.transport == "unix" and self.tls:
            raise ValueError("TLS is only offered on tcp servers")
        return self


class SecretSpec(_Model):
    """The ``<secret type='passphrase'>`` of an ``<encryption>``: which passphrase, by
    libvirt secret uuid or usage; its value is never in the document (``--secret``)."""

    type: Literal["passphrase"] = "passphrase"
    uuid: str | None = Field(default=None, min_length=1)
    usage: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_name(self) -> SecretSpec:
        if (self.uuid is None) == (self.usage is None):
            raise ValueError("a <secret> names its passphrase by uuid or by usage (one of them)")
        return self

    @property
    def name(self) -> str:
        """The uuid or usage: what ``--secret NAME=FILE`` names it by."""
        return self.uuid or self.usage or ""


class EncryptionSpec(_Model):
    """``<encryption format='luks'>`` of a target or scratch: QEMU creates it encrypted."""

    format: Literal["luks"] = "luks"
    secret: SecretSpec


class DiskBackupSpec(_Model):
    """One ``<disk>`` of a ``<domainbackup>``.

    ``type='block'``: ``target`` (push) or ``scratch`` (pull) is an existing block
    device, used as it is.  ``encryption``: the target or scratch is LUKS-encrypted qcow2.
    """

    name: str
    backup: bool = True
    backupmode: Literal["full", "incremental"] | None = None
    incremental: str | None = None
    exportname: str | None = None
    exportbitmap: str | None = None
    type: Literal["file", "block"] = "file"
    target: str | None = None
    scratch: str | None = None
    format: Literal["qcow2", "raw"] | None = None
    shallow: bool = False
    reuse: bool = False
    encryption: EncryptionSpec | None = None

    _check = field_validator("name")(lambda v: check_name(v, "disk"))
    _paths = field_validator("target", "scratch")(lambda v: absolute_path(v))

    @field_validator("incremental", "exportbitmap")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else check_checkpoint_name(value, "checkpoint/bitmap")

    @field_validator("exportname")
    @classmethod
    def _export(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "export")

    @model_validator(mode="after")
    def _check_mode(self) -> DiskBackupSpec:
        if self.backupmode == "full" and self.incremental is not None:
            raise ValueError(
                f"backupmode='full' and incremental={self.incremental!r} contradict each other"
            )
        return self

    @model_validator(mode="after")
    def _destination(self) -> DiskBackupSpec:
        if self.type == "block" and self.backup and self.target is None and self.scratch is None:
            raise ValueError(
                "type='block' needs its device: <target dev='/dev/…'/> (push) "
                "or <scratch dev='/dev/…'/> (pull)"
            )
        if self.encryption is not None and self.format == "raw":
            raise ValueError(
                "<encryption> needs the qcow2 format: a LUKS target is qcow2 with encryption"
            )
        return self


class BackupSpec(_Model):
    """A ``<domainbackup>``: what to back up, where, and from which checkpoint."""

    mode: Mode = "push"
    incremental: str | None = None
    server: ServerSpec | None = None
    disks: tuple[DiskBackupSpec, ...] = ()

    @field_validator("incremental")
    @classmethod
    def _incremental(cls, value: str | None) -> str | None:
        return None if value is None else check_checkpoint_name(value)

    @model_validator(mode="after")
    def _check(self) -> BackupSpec:
        names = [d.name for d in self.disks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"disk {sorted(dup)[0]!r} is listed twice")
        if self.mode == "push" and self.server is not None:
            raise ValueError("a push backup takes no <server>")
        for disk in self.disks:
            if self.mode == "push" and disk.scratch is not None:
                raise ValueError(f"disk {disk.name!r}: <scratch> is for pull mode")
            if self.mode == "pull" and disk.target is not None:
                raise ValueError(f"disk {disk.name!r}: <target> is for push mode")
            _check_disk_mode(self.mode, disk)
        return self

    def disk(self, name: str) -> DiskBackupSpec | None:
        """The disk entry named ``name``, if the spec lists it."""
        return next((d for d in self.disks if d.name == name), None)


def _check_disk_mode(mode: Mode, disk: DiskBackupSpec) -> None:
    """Refuse what libvirt's schema allows in the other mode only."""
    if mode == "push":
        for field, value in (("exportname", disk.exportname), ("exportbitmap", disk.exportbitmap)):
            if value is not None:
                raise ValueError(f"disk {disk.name!r}: {field} is for pull mode")
    elif disk.format == "raw":
        raise ValueError(
            f"disk {disk.name!r}: a pull backup's scratch is always qcow2 (driver type 'raw')"
        )


class CheckpointDiskSpec(_Model):
    """One ``<disk>`` of a ``<domaincheckpoint>``."""

    name: str
    checkpoint: Literal["bitmap", "no"] = "bitmap"
    bitmap: str | None = None

    _check = field_validator("name")(lambda v: check_name(v, "disk"))

    @field_validator("bitmap")
    @classmethod
    def _bitmap(cls, value: str | None) -> str | None:
        return None if value is None else check_checkpoint_name(value, "bitmap")

    @model_validator(mode="after")
    def _check_bitmap(self) -> CheckpointDiskSpec:
        if self.checkpoint == "no" and self.bitmap is not None:
            raise ValueError(f"checkpoint='no' takes no bitmap (bitmap={self.bitmap!r})")
        return self


class CheckpointSpec(_Model):
    """A ``<domaincheckpoint>``: a point in time to create; without a name, libvirt's
    default, the creation time in seconds (see :meth:`named`)."""

    name: str | None = None
    description: str | None = None
    disks: tuple[CheckpointDiskSpec, ...] = ()
    # As ``checkpoint-dumpxml`` writes them: what ``checkpoint-create --redefine`` takes
    # over; a new checkpoint's are set by qmpbackup (libvirt ignores them too).
    parent: str | None = None
    creation_time: int | None = Field(default=None, ge=0)

    @field_validator("name", "parent")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_checkpoint_name(value)

    def named(self, now: int) -> NamedCheckpointSpec:
        """This checkpoint with its name: the one given, else ``now`` in seconds."""
        return NamedCheckpointSpec(
            name=self.name or str(now), description=self.description, disks=self.disks
        )


class NamedCheckpointSpec(CheckpointSpec):
    """A checkpoint whose name is settled."""

    name: str
