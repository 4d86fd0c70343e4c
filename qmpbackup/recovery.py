"""Recovery of one VM: what a crashed or killed run left, found and cleaned.

It gathers QEMU's state and the state directory's (:func:`observe.inventory`,
records, checkpoints, journals), plans the cleanup with the pure
:func:`~qmpbackup.planner.recover.plan_recover`, runs it, then brings the state
directory in line.  The caller holds the state directory's lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from . import observe
from .errors import GuestAgentError, LeftoversError
from .files import remove_created_files
from .planner.recover import RecoverPlan, plan_recover
from .qapi.capabilities import Capabilities
from .qapi.schema import QAPISchema
from .qmp.graph import BlockGraph
from .qmp.session import QMPSession
from .quiesce import thaw_left_frozen
from .runner import StepCallback, check_plan, run_journaled
from .state.active import ActiveBackupStore
from .state.checkpoints import CheckpointStore
from .state.journal import read_journals

log = structlog.get_logger("qmpbackup.recover")


class Recovery:
    """Finding and cleaning the leftovers of earlier runs on one VM."""

    def __init__(
        self,
        session: QMPSession,
        schema: QAPISchema,
        capabilities: Capabilities,
        state_dir: Path,
        checkpoints: CheckpointStore,
        active: ActiveBackupStore,
    ) -> None:
        self.session = session
        self.schema = schema
        self.capabilities = capabilities
        self.state_dir = state_dir
        self.checkpoints = checkpoints
        self.active = active

    async def plan(self) -> tuple[RecoverPlan, BlockGraph]:
        """What would be cleaned, checked against the schema, and the block graph read
        on the way; nothing is sent."""
        active = self.active.load_all()
        inventory, graph = await observe.inventory(self.session, self.capabilities)
        planned = plan_recover(
            inventory,
            active,
            self.checkpoints.load_all(),
            read_journals(self.state_dir),
            dead_owners=frozenset(
                r.id
                for r in active
                if r.owner_pid is not None and not observe.process_alive(r.owner_pid)
            ),
            scratch_files=observe.scratch_files(self.state_dir),
        )
        check_plan(planned.plan, self.schema)
        return planned, graph

    async def run(self, on_step: StepCallback | None = None) -> RecoverPlan:
        """Clean everything found, in QEMU and in the state directory; what was found.

        A guest a killed run left frozen is thawed first.  Raises what
        :func:`~qmpbackup.runner.run_plan` raises (every cleanup step may fail on its own
        without stopping the others), and GuestAgentError, once the rest is clean, when a
        guest could not be thawed: its journal stays, so a later ``recover`` tries again.
        """
        planned, _ = await self.plan()
        unthawed = await thaw_left_frozen(planned.thaw)
        keep = {str(j.path) for j in read_journals(self.state_dir) if j.frozen_agent in unthawed}
        if planned.plan.steps:
            journal = await run_journaled(
                self.session, self.schema, planned.plan, self.state_dir, "recover", on_step
            )
            journal.close("done")
        remove_created_files(planned.remove_files)
        for name, disks in planned.damaged.items():
            if name not in planned.broken_checkpoints:
                self.checkpoints.uncover(name, list(disks))
        if planned.drop_checkpoints or planned.broken_checkpoints:
            self.checkpoints.forget([*planned.drop_checkpoints, *planned.broken_checkpoints])
        for backup_id in planned.stale_records:
            self.active.delete(backup_id)
        for journal_path in planned.journals:
            if journal_path not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(journal_path)
        log.info("recover.done", found=planned.summary())
        if unthawed:
            agent, why = next(iter(unthawed.items()))
            raise GuestAgentError(f"the guest behind {agent} may still be frozen: {why}")
        return planned

    async def refuse_leftovers(self) -> BlockGraph:
        """The block graph; LeftoversError instead if an earlier run left anything."""
        planned, graph = await self.plan()
        if planned.leftovers:
            found = planned.summary()
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise LeftoversError(
                f"an earlier run left leftovers: {found[0]}{more}; run 'qmpbackup recover' first"
            )
        return graph
