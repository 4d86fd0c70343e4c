"""What this QEMU can do that qmpbackup's plans depend on, read once from its live schema.

A feature of a newer QEMU is never assumed from its version: it is a member,
command or enum value of the schema QEMU itself reports (``query-qmp-schema``),
looked up by a capability path (see :mod:`qmpbackup.qapi.schema`).  The
planner gets a :class:`Capabilities` value as data and makes its
QEMU-dependent choices from it; ``info`` shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from .schema import QAPISchema

# Each capability: the label ``info`` shows, and its (command, capability path).
# An empty path asks for the command itself.
_PATHS: dict[str, tuple[str, str, str]] = {
    "blockdev_backup": ("blockdev-backup", "blockdev-backup", ""),
    "transaction_backup": (
        "transaction: blockdev-backup",
        "transaction",
        "actions.type=blockdev-backup",
    ),
    "transaction_bitmap_merge": (
        "transaction: block-dirty-bitmap-merge",
        "transaction",
        "actions.type=block-dirty-bitmap-merge",
    ),
    "backup_perf": ("blockdev-backup x-perf", "blockdev-backup", "x-perf"),
    "blockdev_create": ("blockdev-create", "blockdev-create", ""),
    "block_stream": ("block-stream", "block-stream", ""),
    "snapshot_access": ("snapshot-access driver", "blockdev-add", "driver=snapshot-access"),
    "copy_before_write": ("copy-before-write driver", "blockdev-add", "driver=copy-before-write"),
    "block_export": ("block-export-add", "block-export-add", ""),
    "debug_block_graph": ("x-debug-query-block-graph", "x-debug-query-block-graph", ""),
    "qcow2_zstd": (
        "qcow2 zstd compression",
        "blockdev-create",
        "options.driver=qcow2.compression-type=zstd",
    ),
    "read_splitting": (
        "blkdebug align and max-transfer",
        "blockdev-add",
        "driver=blkdebug.max-transfer",
    ),
}


class Capabilities(BaseModel):
    """The features of one QEMU that qmpbackup uses, each True when its schema has it."""

    model_config = ConfigDict(frozen=True)

    #: QEMU's version as ``query-version`` gives it, for people (never for decisions).
    version: str = ""
    blockdev_backup: bool
    transaction_backup: bool
    transaction_bitmap_merge: bool
    #: ``blockdev-backup`` takes ``x-perf``: push jobs then run fewer copy workers.
    backup_perf: bool
    blockdev_create: bool
    snapshot_access: bool
    #: ``block-stream`` exists (``blockpull``); it is sent with members every QEMU
    #: since 7.2 has, and the plan is checked against the schema before it is sent.
    block_stream: bool = False
    copy_before_write: bool
    #: ``blkdebug`` takes ``align`` and ``max-transfer``: the pull view splits reads
    #: at copy-before-write clusters with it (see :mod:`qmpbackup.planner.pull`).
    read_splitting: bool
    block_export: bool
    #: qcow2 images can be created with ``compression-type: zstd`` (``--compress``
    #: falls back to zlib, QEMU's only compression before, where this is False).
    qcow2_zstd: bool = False
    #: ``x-debug-query-block-graph`` names child nodes (discovery needs it behind filters).
    debug_block_graph: bool
    #: Not in any schema: whether snapshot-access answers a read that starts in clusters
    #: copy-before-write saved and runs past them with the guest's new data (QEMU 7.2
    #: does, 10.0 does not). A probe of this QEMU's behaviour sets it; until one has,
    #: it is assumed, so that the pull view splits reads (see ``read_splitting``).
    snapshot_overread: bool = True

    @classmethod
    def from_schema(
        cls, schema: QAPISchema, version: Mapping[str, Any] | None = None
    ) -> Capabilities:
        """The capabilities ``schema`` offers; ``version`` is the reply to ``query-version``."""
        found = {
            field: schema.has_command(command) and (not path or schema.has_member(command, path))
            for field, (_, command, path) in _PATHS.items()
        }
        # The view needs both members; align alone would not bound a read's length.
        found["read_splitting"] = found["read_splitting"] and schema.has_member(
            "blockdev-add", "driver=blkdebug.align"
        )
        return cls(version=describe_version(version) if version else "", **found)

    def labels(self) -> dict[str, bool]:
        """Each capability as ``info`` shows it: a label and whether this QEMU has it."""
        found = {label: getattr(self, field) for field, (label, _, _) in _PATHS.items()}
        found[OVERREAD_LABEL] = self.snapshot_overread
        return found


OVERREAD_LABEL = "snapshot-access reads past saved clusters (probed, or assumed)"


def describe_version(reply: Mapping[str, Any]) -> str:
    """``7.2.22 Debian 1:7.2+dfsg-7`` from a ``query-version`` reply."""
    q = reply["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']} {reply.get('package', '')}".strip()
