"""The pure planner: observed state in, :class:`~qmpbackup.planner.plan.Plan` out, no I/O."""

from .backup import (
    BackupFacts,
    BackupPlan,
    DiskChoice,
    EndPlan,
    PullOptions,
    choose_disks,
    plan_backup_begin,
    plan_backup_end,
)
from .checkpoint import plan_checkpoint_create, plan_checkpoint_delete, plan_checkpoint_size

__all__ = [
    "BackupFacts",
    "BackupPlan",
    "DiskChoice",
    "EndPlan",
    "PullOptions",
    "choose_disks",
    "plan_backup_begin",
    "plan_backup_end",
    "plan_checkpoint_create",
    "plan_checkpoint_delete",
    "plan_checkpoint_size",
]
