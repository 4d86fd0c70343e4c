"""Pydantic models of the QMP commands qmpbackup sends.

Each model is one command; :meth:`QMPCommand.arguments` gives its QMP
arguments with QAPI's member names.  A member left at ``None`` is omitted
unless the model lists it in ``send_null`` (``backing=None`` sends
``"backing": null`` on a qcow2 node).
The live QEMU schema check (:mod:`qmpbackup.qapi.schema`) runs on top of this.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


def _dash(name: str) -> str:
    return name.replace("_", "-")


class QAPIModel(BaseModel):
    """A QAPI struct: dashes in member names, unknown members refused."""

    # defer_build: a model's validator is built when the first command of its kind is
    # made, not when the module loads (a plan sends a few of the commands defined here).
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, alias_generator=_dash,
        defer_build=True,
    )  # fmt: skip

    send_null: ClassVar[frozenset[str]] = frozenset()

    def to_qapi(self) -> dict[str, Any]:
        """Members with QAPI names; ``None`` left out unless listed in ``send_null``."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None and name not in self.send_null:
                continue
            out[field.alias or name] = _to_json(value)
        return out


def _to_json(value: Any) -> Any:
    if isinstance(value, QMPCommand):
        return {"type": value.execute, "data": value.arguments()}
    if isinstance(value, QAPIModel):
        return value.to_qapi()
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


class QMPCommand(QAPIModel):
    """One QMP command; subclasses name it in ``execute``."""

    execute: ClassVar[str]

    def arguments(self) -> dict[str, Any]:
        """The command's ``arguments`` object."""
        return self.to_qapi()

    def to_qmp(self) -> dict[str, Any]:
        """``{"execute": ..., "arguments": ...}`` as sent on the wire."""
        args = self.arguments()
        return {"execute": self.execute, "arguments": args} if args else {"execute": self.execute}


# -- block nodes ------------------------------------------------------------


class BlockdevCacheOptions(QAPIModel):
    """``BlockdevCacheOptions``."""

    direct: bool | None = None
    no_flush: bool | None = None


class BlockdevAddFile(QMPCommand):
    """``blockdev-add`` of a ``file`` protocol node (``host_device``: a block device)."""

    execute: ClassVar[str] = "blockdev-add"
    driver: Literal["file", "host_device"] = "file"
    node_name: str
    filename: str
    read_only: bool | None = None
    auto_read_only: bool | None = None
    discard: Literal["ignore", "unmap"] | None = None
    detect_zeroes: Literal["off", "on", "unmap"] | None = None
    cache: BlockdevCacheOptions | None = None
    aio: Literal["threads", "native", "io_uring"] | None = None


class LuksEncryption(QAPIModel):
    """qcow2's ``encrypt`` when it is created and opened: LUKS, keyed by a secret object."""

    format: Literal["luks"] = "luks"
    key_secret: str


class BlockdevAddQcow2(QMPCommand):
    """``blockdev-add`` of a ``qcow2`` format node."""

    execute: ClassVar[str] = "blockdev-add"
    send_null: ClassVar[frozenset[str]] = frozenset({"backing"})

    driver: Literal["qcow2"] = "qcow2"
    node_name: str
    file: str
    backing: str | None = None
    read_only: bool | None = None
    discard: Literal["ignore", "unmap"] | None = None
    detect_zeroes: Literal["off", "on", "unmap"] | None = None
    encrypt: LuksEncryption | None = None


class BlockdevAddRaw(QMPCommand):
    """``blockdev-add`` of a ``raw`` format node."""

    execute: ClassVar[str] = "blockdev-add"
    driver: Literal["raw"] = "raw"
    node_name: str
    file: str
    read_only: bool | None = None
    size: int | None = None  # the bytes of ``file`` the node shows (a bigger device)


class BlockdevDel(QMPCommand):
    """``blockdev-del``: remove a node nothing uses any more."""

    execute: ClassVar[str] = "blockdev-del"
    node_name: str


class CreateFileOptions(QAPIModel):
    """``BlockdevCreateOptionsFile``."""

    driver: Literal["file"] = "file"
    filename: str
    size: int = Field(ge=0)
    preallocation: Literal["off", "falloc", "full"] | None = None


class CreateQcow2Options(QAPIModel):
    """``BlockdevCreateOptionsQcow2``."""

    driver: Literal["qcow2"] = "qcow2"
    file: str
    size: int = Field(ge=0)
    backing_file: str | None = None
    backing_fmt: str | None = None
    cluster_size: int | None = None
    preallocation: Literal["off", "metadata", "falloc", "full"] | None = None
    encrypt: LuksEncryption | None = None
    compression_type: Literal["zlib", "zstd"] | None = None


class BlockSetWriteThreshold(QMPCommand):
    """``block-set-write-threshold``: one ``BLOCK_WRITE_THRESHOLD`` event once a write
    reaches past ``write_threshold`` bytes of the node (0 disarms it)."""

    execute: ClassVar[str] = "block-set-write-threshold"
    node_name: str
    write_threshold: int = Field(ge=0)


class BlockdevCreate(QMPCommand):
    """``blockdev-create``: a job that formats an image."""

    execute: ClassVar[str] = "blockdev-create"
    job_id: str
    options: CreateFileOptions | CreateQcow2Options


# -- dirty bitmaps ----------------------------------------------------------


class BlockDirtyBitmapAdd(QMPCommand):
    """``block-dirty-bitmap-add``."""

    execute: ClassVar[str] = "block-dirty-bitmap-add"
    node: str
    name: str
    granularity: int | None = None
    persistent: bool | None = None
    disabled: bool | None = None


class BlockDirtyBitmapRemove(QMPCommand):
    """``block-dirty-bitmap-remove``."""

    execute: ClassVar[str] = "block-dirty-bitmap-remove"
    node: str
    name: str


class BitmapRef(QAPIModel):
    """``BlockDirtyBitmap``: a bitmap on a given node."""

    node: str
    name: str


class BlockDirtyBitmapMerge(QMPCommand):
    """``block-dirty-bitmap-merge``: OR the sources into ``target``."""

    execute: ClassVar[str] = "block-dirty-bitmap-merge"
    node: str
    target: str
    bitmaps: tuple[str | BitmapRef, ...]


# -- jobs -------------------------------------------------------------------

SyncMode = Literal["full", "top", "none", "incremental", "bitmap"]


class BackupPerf(QAPIModel):
    """``BackupPerf`` (``x-perf``): tuning of the backup job."""

    use_copy_range: bool | None = None
    max_workers: int | None = None
    max_chunk: int | None = None


class BlockdevBackup(QMPCommand):
    """``blockdev-backup``: copy ``device`` into the ``target`` node."""

    execute: ClassVar[str] = "blockdev-backup"
    job_id: str
    device: str
    target: str
    sync: SyncMode
    bitmap: str | None = None
    bitmap_mode: Literal["on-success", "never", "always"] | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None
    filter_node_name: str | None = None
    compress: bool | None = None
    x_perf: BackupPerf | None = None


class BlockStream(QMPCommand):
    """``block-stream``: copy into ``device`` what it reads from its backing chain; with
    no base the whole chain, after which ``device`` has no backing file."""

    execute: ClassVar[str] = "block-stream"
    job_id: str
    device: str
    speed: int | None = None


class JobCancel(QMPCommand):
    """``job-cancel``."""

    execute: ClassVar[str] = "job-cancel"
    id: str


class JobDismiss(QMPCommand):
    """``job-dismiss``: forget a concluded job."""

    execute: ClassVar[str] = "job-dismiss"
    id: str


class Transaction(QMPCommand):
    """``transaction``: all actions take effect at one instant, or none does."""

    execute: ClassVar[str] = "transaction"
    actions: tuple[QMPCommand, ...]

    def arguments(self) -> dict[str, Any]:
        """Each action as ``{"type": <command>, "data": <arguments>}``."""
        return {"actions": [_to_json(a) for a in self.actions]}


# -- pull mode: fleecing, NBD server, exports, TLS --------------------------


class BlockdevAddSnapshotAccess(QMPCommand):
    """``blockdev-add`` of a ``snapshot-access`` node: the point-in-time view of a CBW filter."""

    execute: ClassVar[str] = "blockdev-add"
    driver: Literal["snapshot-access"] = "snapshot-access"
    node_name: str
    file: str


class BlockdevAddBlkdebug(QMPCommand):
    """``blockdev-add`` of a ``blkdebug`` filter, used for its request alignment and size limit."""

    execute: ClassVar[str] = "blockdev-add"
    driver: Literal["blkdebug"] = "blkdebug"
    node_name: str
    image: str
    align: int | None = None
    max_transfer: int | None = None
    read_only: bool | None = None


class UnixSocketPath(QAPIModel):
    """``UnixSocketAddress``."""

    path: str


class InetHostPort(QAPIModel):
    """``InetSocketAddress``."""

    host: str
    port: str


class UnixAddress(QAPIModel):
    """``SocketAddressLegacy`` of type ``unix`` (what ``nbd-server-start`` takes)."""

    type: Literal["unix"] = "unix"
    data: UnixSocketPath


class InetAddress(QAPIModel):
    """``SocketAddressLegacy`` of type ``inet``."""

    type: Literal["inet"] = "inet"
    data: InetHostPort


class NbdServerStart(QMPCommand):
    """``nbd-server-start``: QEMU's one NBD server."""

    execute: ClassVar[str] = "nbd-server-start"
    addr: UnixAddress | InetAddress
    tls_creds: str | None = None
    tls_authz: str | None = None


class NbdServerStop(QMPCommand):
    """``nbd-server-stop``."""

    execute: ClassVar[str] = "nbd-server-stop"


class BlockExportAddNbd(QMPCommand):
    """``block-export-add`` of type ``nbd`` (read-only unless ``writable``)."""

    execute: ClassVar[str] = "block-export-add"
    type: Literal["nbd"] = "nbd"
    id: str
    node_name: str
    name: str
    writable: bool = False
    bitmaps: tuple[BitmapRef, ...] | None = None
    allocation_depth: bool | None = None


class BlockExportDel(QMPCommand):
    """``block-export-del``; ``hard`` drops connected clients."""

    execute: ClassVar[str] = "block-export-del"
    id: str
    mode: Literal["safe", "hard"] | None = None
