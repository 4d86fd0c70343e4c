"""The pure planner: observed state in, :class:`~qmpbackup.planner.plan.Plan` out, no I/O."""

from .begin import MODES, BackupPlan, plan_backup_begin
from .checkpoint import plan_checkpoint_create, plan_checkpoint_delete, plan_checkpoint_size
from .disks import DiskChoice, choose_disks
from .end import EndPlan, plan_backup_end
from .facts import BackupFacts, BeginOptions

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
