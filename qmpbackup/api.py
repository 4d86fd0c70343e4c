"""The public async API: :class:`VM`, one QEMU reached over QMP, and what can be done to
it. Everything the CLI does with a VM is a typed coroutine here. Typical use::

    async with await VM.connect("/run/vm.qmp") as vm:
        begun = await vm.backup_begin(load_backup_spec("backup.xml"))
        await vm.wait_backup(begun.record.id)
        await vm.backup_end(begun.record.id)

Each call that changes QEMU gathers what the planner needs (:mod:`qmpbackup.observe`),
plans with the pure planner, checks the plan against the live QAPI schema, then
runs it (:mod:`qmpbackup.runner`) and saves the state directory's part; nothing is
sent when planning or checking fails.  Repository backups, restores and prunes are
built on this API in :mod:`qmpbackup.repo`.  Every error raised is a
:class:`~qmpbackup.errors.QmpBackupError`.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import structlog

from . import observe
from .errors import JobFailedError
from .files import remove_created_files
from .planner import (
    BackupPlan,
    BeginOptions,
    choose_disks,
    plan_backup_begin,
    plan_backup_end,
    plan_checkpoint_create,
    plan_checkpoint_delete,
    plan_checkpoint_size,
)
from .planner.naming import size_bitmap
from .planner.ownership import bitmap_owners
from .planner.plan import Plan
from .planner.recover import RecoverPlan
from .qapi.capabilities import Capabilities
from .qapi.schema import QAPISchema
from .qmp.graph import BlockGraph, discover
from .qmp.jobs import JobState, query_jobs, wait_job
from .qmp.migration import Migration, query_migration
from .qmp.session import Address, QMPSession, describe_address, parse_address
from .quiesce import agent_freeze, describe_agent
from .recovery import Recovery
from .request.models import BackupSpec, CheckpointSpec
from .results import BackupBegun, BackupEnded, JobInfo, VMInfo
from .runner import Freeze, StepCallback, check_plan, run_journaled
from .state.active import ActiveBackup, ActiveBackupStore, running_server
from .state.checkpoints import Checkpoint, CheckpointStore, find_checkpoint
from .state.directory import default_state_root, locked, scratch_folder, state_key
from .state.journal import Journal

log = structlog.get_logger("qmpbackup.api")


class VM:
    """One QEMU, reached over QMP, with its state directory."""

    def __init__(
        self,
        session: QMPSession,
        schema: QAPISchema,
        state_dir: Path,
        name: str | None,
        key: str | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        self.session = session
        self.schema = schema
        self.state_dir = state_dir
        self.name = name
        #: Names this VM in state and repository folders: its name, UUID or QMP address.
        self.key = key or state_key(name, None, "default")
        #: What this QEMU offers that plans depend on, read once from its schema (and
        #: what a probe of its behaviour found, once one has run).
        self.capabilities = observe.remembered_capabilities(
            state_dir, capabilities or Capabilities.from_schema(schema)
        )
        self._checkpoints = CheckpointStore(state_dir)
        self._active = ActiveBackupStore(state_dir)
        self._recovery = Recovery(
            session, schema, self.capabilities, state_dir, self._checkpoints, self._active
        )

    @classmethod
    async def connect(cls, address: Address | str, state_dir: Path | str | None = None) -> VM:
        """Connect to QEMU's QMP socket (path or ``HOST:PORT``) and read its schema.

        Raises ConnectionFailedError when QEMU cannot be reached or does not speak QMP.
        """
        addr = parse_address(address) if isinstance(address, str) else address
        session = QMPSession(addr)
        await session.connect()
        try:
            schema = QAPISchema.from_introspection(await session.execute("query-qmp-schema"))
            name = (await session.execute("query-name")).get("name")
            uuid = (await session.execute("query-uuid")).get("UUID")
            version = await session.execute("query-version")
        except BaseException:
            await session.disconnect()
            raise
        key = state_key(name, uuid, describe_address(addr))
        if state_dir is None:
            state_dir = default_state_root() / key
        capabilities = Capabilities.from_schema(schema, version)
        return cls(session, schema, Path(state_dir), name, key, capabilities)

    async def close(self) -> None:
        """Close the QMP connection."""
        await self.session.disconnect()

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- inspection ---------------------------------------------------------

    async def graph(self) -> BlockGraph:
        """The block graph as QEMU holds it now."""
        return await discover(self.session, self.capabilities.debug_block_graph)

    def checkpoints(self) -> list[Checkpoint]:
        """Recorded checkpoints, oldest first."""
        return self._checkpoints.load_all()

    def adopt_checkpoints(self, checkpoints: list[Checkpoint]) -> None:
        """Record ``checkpoints`` (rebuilt from the disks' bitmaps) in this host's state."""
        self._checkpoints.save_all(checkpoints)

    def active_backups(self) -> list[ActiveBackup]:
        """The backups begun and not yet ended, by id."""
        return self._active.load_all()

    async def info(self) -> VMInfo:
        """QEMU version, capabilities used, and the disks with their chains and bitmaps."""
        version, name, labels = self.capabilities.version, self.name, self.capabilities.labels()
        agent, graph = await describe_agent(self.session), await self.graph()
        return VMInfo(
            version=version, name=name, capabilities=labels, graph=graph, guest_agent=agent,
            owners=bitmap_owners(graph, self.checkpoints()),
        )  # fmt: skip

    # -- backups ------------------------------------------------------------

    async def plan_backup(
        self,
        spec: BackupSpec,
        checkpoint: CheckpointSpec | None = None,
        options: BeginOptions | None = None,
    ) -> BackupPlan:
        """The plan ``backup_begin`` would run, checked against the live schema, not sent.

        Raises InvalidInputError for a request this VM cannot take, PlanError when its
        state prevents the backup, SchemaMismatchError when QEMU would refuse the plan.
        """
        planned = await self._plan_backup(spec, checkpoint, options)
        check_plan(planned.plan, self.schema)
        return planned

    async def _plan_backup(
        self,
        spec: BackupSpec,
        checkpoint: CheckpointSpec | None,
        options: BeginOptions | None,
        graph: BlockGraph | None = None,
    ) -> BackupPlan:
        graph = graph or await self.graph()
        now = int(time.time())
        backup_id = self._active.next_id()
        checkpoints = self.checkpoints()
        scratch_dir = str(scratch_folder(self.state_dir))
        choices = choose_disks(spec, graph, checkpoints, checkpoint, now, scratch_dir, backup_id)
        facts = await observe.backup_facts(
            self.session, spec, choices, self._active.load_all(), backup_id=backup_id,
            now=now, state_dir=self.state_dir, capabilities=self.capabilities,
            options=options, graph=graph,
        )  # fmt: skip
        return plan_backup_begin(spec, graph, checkpoints, facts, checkpoint, options, choices)

    async def backup_begin(
        self,
        spec: BackupSpec,
        checkpoint: CheckpointSpec | None = None,
        on_step: StepCallback | None = None,
        options: BeginOptions | None = None,
        owned: bool = False,
        recover: bool = False,
    ) -> BackupBegun:
        """Start a backup; with ``checkpoint``, create it at the backup's instant.

        In pull mode ``record.disks[i].uri`` says where each disk's view is served.
        ``owned``: the backup belongs to this process, and is left over once it is gone.
        Raises what :meth:`plan_backup` raises, LeftoversError if an earlier run left
        anything (unless ``recover``), QMPCommandError or JobFailedError when a step
        fails (what was done is undone first), GuestAgentError when ``options.quiesce``
        finds no answering agent (before anything changes) or its freeze or thaw fails.
        """
        opts = options or BeginOptions()
        async with contextlib.AsyncExitStack() as stack:
            freeze = await stack.enter_async_context(
                agent_freeze(self.session, opts.quiesce, opts.guest_agent)
            )
            stack.enter_context(locked(self.state_dir))
            graph = None
            if recover:
                await self._recovery.run(on_step)
            else:
                graph = await self._recovery.refuse_leftovers()
            if spec.mode == "pull":
                running = running_server(self.active_backups())
                self.capabilities = await observe.probed_capabilities(
                    self.session, self.schema, self.state_dir, self.capabilities, running, on_step
                )
            # _run checks the plan against the schema before sending it.
            planned = await self._plan_backup(spec, checkpoint, options, graph)
            if spec.mode == "pull":
                scratch_folder(self.state_dir).mkdir(mode=0o700, exist_ok=True)
            before = await query_migration(self.session)
            journal = await self._run(planned.plan, "backup-begin", on_step, freeze)
            server = planned.record.server
            if server is not None and server.socket and os.path.exists(server.socket):
                os.chmod(server.socket, 0o600)
            pid, was = os.getpid() if owned else None, (before.status, before.error)
            record = planned.record.model_copy(update={"owner_pid": pid, "migration_before": was})
            if planned.checkpoint is not None:
                self._checkpoints.save(planned.checkpoint)
            self._active.save(record)
            journal.close("done")
        log.info("backup.begun", id=record.id, checkpoint=record.checkpoint)
        frozen = freeze.seconds if freeze else None
        return BackupBegun(record=record, checkpoint=planned.checkpoint, frozen_seconds=frozen)

    async def _run(
        self, plan: Plan, operation: str, on_step: StepCallback | None, freeze: Freeze | None = None
    ) -> Journal:
        """:func:`~qmpbackup.runner.run_journaled` in this VM's state directory."""
        session, schema, state_dir = self.session, self.schema, self.state_dir
        return await run_journaled(session, schema, plan, state_dir, operation, on_step, freeze)

    async def _jobs_of(self, backup: ActiveBackup) -> dict[str, JobState]:
        jobs = await query_jobs(self.session)
        return {j: jobs[j] for j in backup.job_ids() if j in jobs}

    async def wait_backup(self, backup_id: int | None = None) -> dict[str, JobState]:
        """Wait until every job of the backup has concluded.

        Raises JobFailedError if one failed, BackupNotFoundError for an unknown backup.
        """
        backup = self._active.load(backup_id)
        states = {j: await wait_job(self.session, j) for j in backup.job_ids()}
        failed = [(d, states[d.job_id].error) for d in backup.disks if states[d.job_id].error]
        if failed:
            detail = "; ".join(f"{d.disk} ({d.target or d.job_id}): {e}" for d, e in failed)
            raise JobFailedError(f"backup id {backup.id} failed: {detail}")
        return states

    async def job_info(self, backup_id: int | None = None) -> JobInfo:
        """Progress of a backup job; BackupNotFoundError for an unknown backup."""
        backup = self._active.load(backup_id)
        return JobInfo.of(backup, await self._jobs_of(backup), time.time())

    async def backup_end(
        self,
        backup_id: int | None = None,
        abort: bool = False,
        on_step: StepCallback | None = None,
    ) -> BackupEnded:
        """End a backup: clean everything it made in QEMU and on the host.

        Raises BackupActiveError while a push copy runs and ``abort`` is not given,
        BackupNotFoundError for an unknown backup, QMPCommandError if a step fails.
        """
        with locked(self.state_dir):
            backup = self._active.load(backup_id)
            graph = await self.graph()
            exports = await self.session.execute("query-block-exports")
            shared = any(
                r.server is not None and r.id != backup.id for r in self._active.load_all()
            )
            ended = plan_backup_end(
                backup,
                await self._jobs_of(backup),
                graph,
                self.checkpoints(),
                abort,
                frozenset(e["id"] for e in exports),
                shared,
            )
            migration = (await query_migration(self.session)).since(
                Migration(*backup.migration_before)
            )
            journal = await self._run(ended.plan, "backup-end", on_step)
            removed = remove_created_files(ended.remove_files)
            if ended.drop_checkpoint is not None:
                self._checkpoints.forget([ended.drop_checkpoint])
            self._active.delete(backup.id)
            journal.close("done")
        return BackupEnded(
            id=backup.id,
            outcome=ended.outcome,
            errors=dict(ended.errors),
            dropped_checkpoint=ended.drop_checkpoint,
            removed_partial=tuple(removed) if backup.mode == "push" else (),
            migration=None if migration is None else migration.describe(),
        )

    # -- recovery -------------------------------------------------------------

    async def plan_recover(self) -> RecoverPlan:
        """What ``recover`` would clean, checked against the schema, nothing sent."""
        return (await self._recovery.plan())[0]

    async def recover(self, on_step: StepCallback | None = None) -> RecoverPlan:
        """Clean everything a crashed or killed run left in QEMU and in the state
        directory; live backups are left alone. Idempotent: returns what was found."""
        with locked(self.state_dir):
            return await self._recovery.run(on_step)

    # -- checkpoints --------------------------------------------------------

    async def checkpoint_create(
        self,
        spec: CheckpointSpec,
        on_step: StepCallback | None = None,
        quiesce: bool = False,
        guest_agent: str | None = None,
    ) -> tuple[Checkpoint, float | None]:
        """Create a checkpoint on its own: one transaction of persistent bitmaps, with
        ``quiesce`` sent with the guest frozen; the checkpoint, and the seconds the guest
        was frozen.

        Raises InvalidInputError for a name or bitmap that exists, PlanError for a disk
        that cannot hold a persistent bitmap, GuestAgentError as :meth:`backup_begin`.
        """
        async with agent_freeze(self.session, quiesce, guest_agent) as freeze:
            with locked(self.state_dir):
                graph, checkpoints, now = await self.graph(), self.checkpoints(), int(time.time())
                plan, checkpoint = plan_checkpoint_create(spec, graph, checkpoints, now, quiesce)
                journal = await self._run(plan, "checkpoint-create", on_step, freeze)
                self._checkpoints.save(checkpoint)
                journal.close("done")
        return checkpoint, freeze.seconds if freeze else None

    async def checkpoint_delete(
        self,
        name: str,
        children: bool = False,
        metadata_only: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[str]:
        """Delete a checkpoint (and its descendants with ``children``); return the names.

        Raises UnknownCheckpointError for an unknown name.
        """
        with locked(self.state_dir):
            plan, doomed = plan_checkpoint_delete(
                name, await self.graph(), self.checkpoints(), children, metadata_only
            )
            journal = await self._run(plan, "checkpoint-delete", on_step)
            names = [c.name for c in doomed]
            self._checkpoints.forget(names)
            journal.close("done")
        return names

    async def checkpoint_sizes(
        self, name: str, on_step: StepCallback | None = None
    ) -> dict[str, int]:
        """Bytes dirtied since checkpoint ``name``, per disk, merged across layers."""
        checkpoint = find_checkpoint(self.checkpoints(), name)
        graph = await self.graph()
        sizes, measure, remove = plan_checkpoint_size(checkpoint, graph)
        if measure.steps:
            (await self._run(measure, "checkpoint-size", on_step)).close("done")
            try:
                measured = await self.graph()
                for entry in checkpoint.bitmap_disks():
                    temp = measured.top_node(entry.name).bitmap(size_bitmap(entry.name))
                    if temp is not None:
                        sizes[entry.name] = temp.count
            finally:
                (await self._run(remove, "checkpoint-size", on_step)).close("done")
        return sizes

    async def checkpoint_xml(
        self, name: str, size: bool = False, on_step: StepCallback | None = None
    ) -> str:
        """``<domaincheckpoint>`` XML of ``name``; with ``size``, dirty bytes per disk."""
        checkpoint = find_checkpoint(self.checkpoints(), name)
        sizes = await self.checkpoint_sizes(name, on_step) if size else None
        return checkpoint.to_xml(sizes, self.name)
