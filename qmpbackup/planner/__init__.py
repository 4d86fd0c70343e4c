"""The pure planner: observed state in, :class:`~qmpbackup.planner.plan.Plan` out, no I/O.

The names below load their module on first use, so that a command importing one
small part of the planner (the repository's level decision) does not pay for all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .begin import MODES, BackupPlan, plan_backup_begin
    from .checkpoint import plan_checkpoint_create, plan_checkpoint_delete, plan_checkpoint_size
    from .disks import DiskChoice, choose_disks
    from .end import EndPlan, plan_backup_end
    from .facts import BackupFacts, BeginOptions

_HOMES = {
    "MODES": "begin",
    "BackupPlan": "begin",
    "plan_backup_begin": "begin",
    "plan_checkpoint_create": "checkpoint",
    "plan_checkpoint_delete": "checkpoint",
    "plan_checkpoint_size": "checkpoint",
    "DiskChoice": "disks",
    "choose_disks": "disks",
    "EndPlan": "end",
    "plan_backup_end": "end",
    "BackupFacts": "facts",
    "BeginOptions": "facts",
}

__all__ = [
    "MODES",
    "BackupFacts",
    "BackupPlan",
    "BeginOptions",
    "DiskChoice",
    "EndPlan",
    "choose_disks",
    "plan_backup_begin",
    "plan_backup_end",
    "plan_checkpoint_create",
    "plan_checkpoint_delete",
    "plan_checkpoint_size",
]


__getattr__ = exports(__name__, _HOMES)
