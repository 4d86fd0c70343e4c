"""What the planner is given besides the graph and the checkpoints.

Facts are what the caller observed (files, jobs, exports, host probes, the
capabilities of this QEMU, and for recovery an inventory of QEMU); options are
what the user chose besides the request.  The planner looks nothing up itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..qapi.capabilities import Capabilities
from ..qmp.jobs import JobState
from ..state.active import NbdServer


class DeviceFacts(BaseModel):
    """What the caller found of a path a request names as a block device (``type='block'``)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["block", "missing", "other"]
    size: int = 0
    mounts: tuple[str, ...] = ()  # where it, or a partition of it, is mounted
    holders: tuple[str, ...] = ()  # kernel devices built on it (device-mapper, md, …)
    qemu_nodes: tuple[str, ...] = ()  # this QEMU's nodes that have it open


class BackupFacts(BaseModel):
    """What the caller observed for one ``backup-begin``: nothing here is looked up by
    the planner."""

    model_config = ConfigDict(frozen=True)

    backup_id: int
    now: int
    capabilities: Capabilities
    existing_files: frozenset[str] = frozenset()
    busy_disks: Mapping[str, int] = {}
    job_ids: frozenset[str] = frozenset()
    scratch_dir: str = ""
    default_socket: str = ""
    free_port: int | None = None
    running_server: NbdServer | None = None
    export_names: frozenset[str] = frozenset()
    # Folders of push targets where QEMU can write with O_DIRECT (probed by the caller).
    direct_io_dirs: frozenset[str] = frozenset()
    # Free bytes of each folder holding a pull scratch (observed for bounded scratches).
    free_space: Mapping[str, int] = {}
    # Each block device a target or scratch names (``type='block'``), by its path.
    devices: Mapping[str, DeviceFacts] = {}


class BeginOptions(BaseModel):
    """What the caller gives besides the spec for one ``backup-begin``: for pull, where
    TLS material lives and how much room the fleecing scratches take; for push, whether
    targets may be written with O_DIRECT.

    ``scratch_reserve`` None: each scratch reserves its disk's whole size when it is made,
    so it can never fill up (QEMU's copy-before-write would fail the guest's write).
    A number of bytes: each scratch grows only with what the guest overwrites, that many
    bytes are kept free beside it in a reserve file, and a write threshold on the scratch
    raises ``BLOCK_WRITE_THRESHOLD`` while the reserve is still there; whoever begins such
    a backup must watch for it and end the backup (the one-shot ``backup`` does).

    ``direct_io`` False: push targets go through the page cache even where O_DIRECT
    works, for a caller that reads each target right after its job (the one-shot
    ``backup`` digests it): it reads from memory instead of the disk.

    ``quiesce``: the guest's filesystems are frozen through qemu-guest-agent around the
    transaction alone; ``guest_agent`` is the agent's socket (None: the one QEMU's
    ``org.qemu.guest_agent.0`` port is connected to).

    ``secrets``: see the field.

    ``compress``: each new qcow2 push target is created with this compression type and
    written with compressed clusters (``blockdev-backup`` ``compress``); None: plain.

    ``volatile_bitmaps`` True: a disk of the new checkpoint that cannot keep a persistent
    bitmap (raw, pflash NVRAM, read-only) gets a non-persistent one, valid while this
    QEMU process runs, recorded as such (the one-shot ``backup`` asks for it). False, as
    libvirt: such a disk must be left out of the checkpoint (``checkpoint='no'``).
    """

    model_config = ConfigDict(frozen=True)

    tls_dir: str | None = None
    tls_allow: tuple[str, ...] = ()
    scratch_reserve: int | None = Field(default=None, gt=0)
    direct_io: bool = True
    quiesce: bool = False
    guest_agent: str | None = None
    volatile_bitmaps: bool = False
    compress: Literal["zstd", "zlib"] | None = None
    # ``--secret NAME=FILE``: the file (absolute) holding the passphrase a request's
    # ``<secret uuid=|usage=>`` names; QEMU reads it, qmpbackup never does.
    secrets: Mapping[str, str] = {}


class Inventory(BaseModel):
    """What QEMU holds now, as far as recovery cares."""

    model_config = ConfigDict(frozen=True)

    jobs: Mapping[str, JobState]
    exports: tuple[str, ...]
    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]  # (parent node, child node)
    bitmaps: tuple[tuple[str, str], ...]  # (node, bitmap)
    persistent: tuple[tuple[str, str], ...] = ()  # (node, bitmap) of persistent ones
    objects: tuple[str, ...]
    # (disk, node, bitmap) of each bitmap QEMU reports inconsistent in a disk's chain.
    inconsistent: tuple[tuple[str, str, str], ...] = ()
    disk_of: Mapping[str, str] = {}  # format node -> the disk whose chain holds it
