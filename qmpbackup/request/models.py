"""Request models: what a user asks for, independent of the input format.

libvirt ``<domainbackup>`` / ``<domaincheckpoint>`` XML, YAML and JSON all
load into these models (see :mod:`qmpbackup.request.loader`).
"""

from __future__ import annotations

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerSpec(_Model):
    """NBD server address of a pull backup."""

    transport: Literal["tcp", "unix"] = "tcp"
    name: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    socket: str | None = None
    tls: bool = False

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

    @field_validator("incremental", "exportname", "exportbitmap")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "checkpoint/export")

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
        return None if value is None else check_name(value, "checkpoint")

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
        return self

    def disk(self, name: str) -> DiskBackupSpec | None:
        """The disk entry named ``name``, if the spec lists it."""
        return next((d for d in self.disks if d.name == name), None)


class CheckpointDiskSpec(_Model):
    """One ``<disk>`` of a ``<domaincheckpoint>``."""

    name: str
    checkpoint: Literal["bitmap", "no"] = "bitmap"
    bitmap: str | None = None

    _check = field_validator("name")(lambda v: check_name(v, "disk"))

    @field_validator("bitmap")
    @classmethod
    def _bitmap(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "bitmap")


class CheckpointSpec(_Model):
    """A ``<domaincheckpoint>``: a named point in time to create."""

    name: str
    description: str | None = None
    disks: tuple[CheckpointDiskSpec, ...] = ()

    _check = field_validator("name")(lambda v: check_name(v, "checkpoint"))
