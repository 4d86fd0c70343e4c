"""The public async API: everything the CLI does, as typed coroutines.

Typical use::

    async with await VM.connect("/run/vm.qmp") as vm:
        begun = await vm.backup_begin(load_backup_spec("backup.xml"))
        await vm.wait_backup(begun.record.id)
        await vm.backup_end(begun.record.id)

Every method discovers the block graph afresh, plans with the pure planner,
checks the plan against the live QAPI schema, then runs it; nothing is sent
when planning or checking fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict

from .errors import JobFailedError, LeftoversError
from .planner import (
    BackupFacts,
    BackupPlan,
    PullOptions,
    choose_disks,
    naming,
    plan_backup_begin,
    plan_backup_end,
    plan_checkpoint_create,
    plan_checkpoint_delete,
    plan_checkpoint_size,
)
from .planner.plan import Plan, Step
from .planner.recover import Inventory, RecoverPlan, plan_recover
from .qapi.capabilities import Capabilities
from .qapi.schema import QAPISchema
from .qmp.graph import BlockGraph, discover, graph_from_replies, query_graph_replies
from .qmp.jobs import JobState, query_jobs, wait_job
from .qmp.session import Address, QMPSession, describe_address, parse_address
from .repo.backup import RepositoryBackup, backup_to_repository, release_checkpoints
from .repo.progress import EventSink
from .repo.prune import PruneResult, prune, unneeded_checkpoints
from .repo.repository import Repository
from .request.models import BackupSpec, CheckpointSpec, Mode, RequestedLevel
from .runner import check_plan, run_plan
from .state.active import BackupRecord, BackupRecordStore
from .state.checkpoints import Checkpoint, CheckpointDisk, CheckpointStore, find_checkpoint
from .state.journal import Journal, read_journals
from .state.lock import default_state_root, locked, state_key

log = structlog.get_logger("qmpbackup.api")

StepCallback = Callable[[int, Step], None]


class BackupBegun(BaseModel):
    """What ``backup-begin`` started."""

    model_config = ConfigDict(frozen=True)

    record: BackupRecord
    checkpoint: Checkpoint | None


class BackupEnded(BaseModel):
    """How a backup ended."""

    model_config = ConfigDict(frozen=True)

    id: int
    outcome: str
    errors: dict[str, str]
    dropped_checkpoint: str | None
    # Push targets qmpbackup created for a backup that did not complete, now deleted.
    removed_partial: tuple[str, ...] = ()


class DiskProgress(BaseModel):
    """Progress of one disk's copy."""

    model_config = ConfigDict(frozen=True)

    disk: str
    status: str
    processed: int
    total: int
    error: str | None = None
    uri: str | None = None


class JobInfo(BaseModel):
    """State of one backup job, as ``jobinfo`` shows it."""

    model_config = ConfigDict(frozen=True)

    id: int
    mode: str
    status: str
    elapsed: float
    processed: int
    total: int
    disks: tuple[DiskProgress, ...]

    @property
    def rate(self) -> float:
        """Bytes per second since the backup began."""
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0


class VMInfo(BaseModel):
    """What ``info`` shows: QEMU version, capabilities, disks."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    version: str
    name: str | None
    capabilities: dict[str, bool]
    graph: BlockGraph


def _direct_io(folder: str) -> bool:
    """True when a file in ``folder`` can be opened with O_DIRECT (not on tmpfs, say)."""
    try:
        fd, path = tempfile.mkstemp(prefix=".qmpbackup-direct-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now, for the NBD server."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


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
        #: What this QEMU offers that plans depend on, read once from its schema.
        self.capabilities = capabilities or Capabilities.from_schema(schema)
        self.state_dir = state_dir
        self.name = name
        #: Names this VM in state and repository folders: its name, UUID or QMP address.
        self.key = key or state_key(name, None, "default")
        self.checkpoint_store = CheckpointStore(state_dir)
        self.records = BackupRecordStore(state_dir)

    @classmethod
    async def connect(cls, address: Address | str, state_dir: Path | str | None = None) -> VM:
        """Connect to QEMU's QMP socket (path or ``HOST:PORT``) and read its schema."""
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

    @property
    def _local(self) -> bool:
        """True when QEMU is on this host (a unix socket): its files are ours to probe."""
        return isinstance(self.session.address, str)

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
        return self.checkpoint_store.load_all()

    async def info(self) -> VMInfo:
        """QEMU version, capabilities used, and the disks with their chains and bitmaps."""
        return VMInfo(
            version=self.capabilities.version,
            name=self.name,
            capabilities=self.capabilities.labels(),
            graph=await self.graph(),
        )

    # -- backups ------------------------------------------------------------

    async def _backup_facts(
        self, spec: BackupSpec, graph: BlockGraph, checkpoint: CheckpointSpec | None
    ) -> BackupFacts:
        now = int(time.time())
        backup_id = self.records.next_id()
        scratch_dir = str(self.state_dir / "scratch")
        choices = choose_disks(
            spec, graph, self.checkpoints(), checkpoint, now, scratch_dir, backup_id
        )
        active = self.records.load_all()
        running = next((r.server for r in active if r.server is not None), None)
        wanted = spec.server
        free_port = None
        if spec.mode == "pull" and running is None and wanted is not None and not wanted.port:
            free_port = find_free_port(wanted.name or "localhost")
        return BackupFacts(
            backup_id=backup_id,
            now=now,
            capabilities=self.capabilities,
            existing_files=frozenset(c.target for c in choices if os.path.lexists(c.target)),
            busy_disks={d.disk: r.id for r in active for d in r.disks},
            job_ids=frozenset(await query_jobs(self.session)),
            scratch_dir=scratch_dir,
            default_socket=str(self.state_dir / "nbd.sock"),
            free_port=free_port,
            running_server=running,
            export_names=frozenset(d.export for r in active for d in r.disks if d.export),
            direct_io_dirs=frozenset(
                folder
                for folder in {os.path.dirname(c.target) for c in choices}
                if spec.mode == "push" and self._local and _direct_io(folder)
            ),
        )

    async def plan_backup(
        self,
        spec: BackupSpec,
        checkpoint: CheckpointSpec | None = None,
        options: PullOptions | None = None,
    ) -> BackupPlan:
        """The plan ``backup_begin`` would run, checked against the live schema, not sent."""
        planned = await self._plan_backup(spec, checkpoint, options)
        check_plan(planned.plan, self.schema)
        return planned

    async def _plan_backup(
        self,
        spec: BackupSpec,
        checkpoint: CheckpointSpec | None,
        options: PullOptions | None,
        graph: BlockGraph | None = None,
    ) -> BackupPlan:
        graph = graph or await self.graph()
        facts = await self._backup_facts(spec, graph, checkpoint)
        return plan_backup_begin(spec, graph, self.checkpoints(), facts, checkpoint, options)

    async def backup_begin(
        self,
        spec: BackupSpec,
        checkpoint: CheckpointSpec | None = None,
        on_step: StepCallback | None = None,
        options: PullOptions | None = None,
        owned: bool = False,
        recover: bool = False,
    ) -> BackupBegun:
        """Start a backup; with ``checkpoint``, create it at the backup's instant.

        In pull mode ``record.disks[i].uri`` says where each disk's view is served.
        ``owned``: the backup belongs to this process, and is left over once it is gone.
        Leftovers of an earlier run refuse the backup (LeftoversError) unless ``recover``.
        """
        with locked(self.state_dir):
            graph = None
            if recover:
                await self._recover_locked(on_step)
            else:
                graph = await self._refuse_leftovers()
            # _run checks the plan against the schema before sending it.
            planned = await self._plan_backup(spec, checkpoint, options, graph)
            if spec.mode == "pull":
                (self.state_dir / "scratch").mkdir(mode=0o700, exist_ok=True)
            journal = await self._run(planned.plan, "backup-begin", on_step)
            server = planned.record.server
            if server is not None and server.socket and os.path.exists(server.socket):
                os.chmod(server.socket, 0o600)
            record = planned.record
            if owned:
                record = record.model_copy(update={"owner_pid": os.getpid()})
            if planned.checkpoint is not None:
                self.checkpoint_store.save(planned.checkpoint)
            self.records.save(record)
            journal.close("done")
        log.info("backup.begun", id=record.id, checkpoint=record.checkpoint)
        return BackupBegun(record=record, checkpoint=planned.checkpoint)

    async def _run(self, plan: Plan, operation: str, on_step: StepCallback | None) -> Journal:
        """Check and send ``plan``, journaled; the caller closes the journal ``done`` once
        it has saved its own state, so that ``recover`` sees a run killed in between."""
        check_plan(plan, self.schema)
        journal = Journal(self.state_dir, operation)
        await run_plan(self.session, plan, journal, on_step)
        return journal

    async def _jobs_of(self, record: BackupRecord) -> dict[str, JobState]:
        jobs = await query_jobs(self.session)
        return {j: jobs[j] for j in record.job_ids() if j in jobs}

    async def wait_backup(self, backup_id: int | None = None) -> dict[str, JobState]:
        """Wait until every job of the backup has concluded; raise JobFailedError on error."""
        record = self.records.load(backup_id)
        states = {j: await wait_job(self.session, j) for j in record.job_ids()}
        failed = {j: s.error for j, s in states.items() if s.error}
        if failed:
            detail = "; ".join(f"{j}: {e}" for j, e in failed.items())
            raise JobFailedError(f"backup id {record.id} failed: {detail}")
        return states

    async def job_info(self, backup_id: int | None = None) -> JobInfo:
        """Progress of a backup job."""
        record = self.records.load(backup_id)
        jobs = await self._jobs_of(record)
        disks = tuple(
            DiskProgress(
                disk=d.disk,
                status=jobs[d.job_id].status if d.job_id in jobs else "gone",
                processed=jobs[d.job_id].current_progress if d.job_id in jobs else 0,
                total=jobs[d.job_id].total_progress if d.job_id in jobs else 0,
                error=jobs[d.job_id].error
                if d.job_id in jobs
                else f"job {d.job_id} is gone (QEMU restarted?)",
                uri=d.uri,
            )
            for d in record.disks
        )
        statuses = {d.status for d in disks}
        if any(d.error for d in disks):
            status = "failed"
        elif statuses <= {"concluded", "gone"}:
            status = "completed"
        else:
            status = "running"
        return JobInfo(
            id=record.id,
            mode=record.mode,
            status=status,
            elapsed=time.time() - record.started,
            processed=sum(d.processed for d in disks),
            total=sum(d.total for d in disks),
            disks=disks,
        )

    async def backup_end(
        self,
        backup_id: int | None = None,
        abort: bool = False,
        on_step: StepCallback | None = None,
    ) -> BackupEnded:
        """End a backup: refuse while copying unless ``abort``; clean everything it made."""
        with locked(self.state_dir):
            record = self.records.load(backup_id)
            graph = await self.graph()
            exports = await self.session.execute("query-block-exports")
            shared = any(
                r.server is not None and r.id != record.id for r in self.records.load_all()
            )
            ended = plan_backup_end(
                record,
                await self._jobs_of(record),
                graph,
                self.checkpoints(),
                abort,
                frozenset(e["id"] for e in exports),
                shared,
            )
            journal = await self._run(ended.plan, "backup-end", on_step)
            removed = []
            for path in ended.remove_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
            if ended.drop_checkpoint is not None:
                self._forget_checkpoints([ended.drop_checkpoint])
            self.records.delete(record.id)
            journal.close("done")
        return BackupEnded(
            id=record.id,
            outcome=ended.outcome,
            errors=dict(ended.errors),
            dropped_checkpoint=ended.drop_checkpoint,
            removed_partial=tuple(removed) if record.mode == "push" else (),
        )

    # -- recovery -------------------------------------------------------------

    async def _inventory(self) -> tuple[Inventory, BlockGraph]:
        """What recovery looks at, and the block graph read in the same queries."""
        debug = self.capabilities.debug_block_graph
        replies = await query_graph_replies(self.session, debug)
        block = graph_from_replies(replies)
        nodes = replies["query-named-block-nodes"]
        edges: list[tuple[str, str]] = []
        if debug:
            graph = replies["x-debug-query-block-graph"]
            names = {n["id"]: n["name"] for n in graph["nodes"] if n["type"] == "block-driver"}
            edges = [
                (names[e["parent"]], names[e["child"]])
                for e in graph["edges"]
                if e["parent"] in names and e["child"] in names
            ]
        objects = await self.session.execute("qom-list", {"path": "/objects"})
        disk_of = {n: disk.name for disk in block.disks.values() for n in disk.chain}
        return Inventory(
            jobs=await query_jobs(self.session),
            exports=tuple(e["id"] for e in await self.session.execute("query-block-exports")),
            nodes=tuple(n["node-name"] for n in nodes),
            edges=tuple(edges),
            bitmaps=tuple(
                (n["node-name"], b["name"])
                for n in nodes
                for b in n.get("dirty-bitmaps", ())
                if b.get("name")
            ),
            objects=tuple(o["name"] for o in objects),
            inconsistent=tuple(
                (disk_of[node.node_name], node.node_name, b.name)
                for node in block.nodes.values()
                if node.node_name in disk_of
                for b in node.bitmaps
                if b.inconsistent
            ),
            disk_of=disk_of,
        ), block

    async def plan_recover(self) -> RecoverPlan:
        """What ``recover`` would clean, checked against the schema, nothing sent."""
        return (await self._plan_recover())[0]

    async def _plan_recover(self) -> tuple[RecoverPlan, BlockGraph]:
        records = self.records.load_all()
        scratch = self.state_dir / "scratch"
        inventory, graph = await self._inventory()
        planned = plan_recover(
            inventory,
            records,
            self.checkpoints(),
            read_journals(self.state_dir),
            dead_owners=frozenset(
                r.id for r in records if r.owner_pid is not None and not _alive(r.owner_pid)
            ),
            scratch_files=sorted(str(p) for p in scratch.iterdir()) if scratch.is_dir() else (),
        )
        check_plan(planned.plan, self.schema)
        return planned, graph

    async def recover(self, on_step: StepCallback | None = None) -> RecoverPlan:
        """Clean everything a crashed or killed run left in QEMU and in the state
        directory; live backups are left alone. Idempotent: returns what was found."""
        with locked(self.state_dir):
            return await self._recover_locked(on_step)

    async def _recover_locked(self, on_step: StepCallback | None) -> RecoverPlan:
        planned = await self.plan_recover()
        if planned.plan.steps:
            (await self._run(planned.plan, "recover", on_step)).close("done")
        for path in planned.remove_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for name, disks in planned.damaged.items():
            if name not in planned.broken_checkpoints:
                self._uncover(name, list(disks))
        if planned.drop_checkpoints or planned.broken_checkpoints:
            self._forget_checkpoints([*planned.drop_checkpoints, *planned.broken_checkpoints])
        for backup_id in planned.stale_records:
            self.records.delete(backup_id)
        for journal in planned.journals:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal)
        log.info("recover.done", found=planned.summary())
        return planned

    async def _refuse_leftovers(self) -> BlockGraph:
        """LeftoversError if an earlier run left anything; else the block graph."""
        planned, graph = await self._plan_recover()
        if planned.leftovers:
            found = planned.summary()
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise LeftoversError(
                f"an earlier run left leftovers: {found[0]}{more}; run 'qmpbackup recover' first"
            )
        return graph

    # -- repository backups -------------------------------------------------

    async def backup(
        self,
        repository: Path | str,
        *,
        level: RequestedLevel = "auto",
        mode: Mode = "push",
        disks: Sequence[str] | None = None,
        on_event: EventSink | None = None,
        recover: bool = False,
    ) -> RepositoryBackup:
        """One-shot backup into ``repository``: levels decided per disk, begin, copy,
        digests and check, commit, end; checkpoints no backup needs are deleted.

        On failure or cancellation the backup job is aborted and the repository is
        left as it was. ``recover`` cleans an earlier run's leftovers first.
        """
        return await backup_to_repository(
            self,
            Path(repository),
            level=level,
            mode=mode,
            disks=disks,
            on_event=on_event,
            unneeded=unneeded_checkpoints,
            recover=recover,
        )

    async def release_checkpoints(self, names: Sequence[str]) -> list[str]:
        """Delete those of ``names`` that are checkpoints of this VM (e.g. what
        :func:`qmpbackup.repo.prune.prune` released); return the names deleted."""
        return await release_checkpoints(self, names)

    async def prune(self, repository: Path | str, keep: int, dry_run: bool = False) -> PruneResult:
        """:func:`qmpbackup.repo.prune.prune` the repository, then delete the checkpoints
        no remaining backup needs."""
        result = prune(Repository.open(Path(repository), self.key), keep, dry_run=dry_run)
        if not dry_run:
            await self.release_checkpoints(result.released)
        return result

    # -- checkpoints --------------------------------------------------------

    async def plan_checkpoint_create(self, spec: CheckpointSpec) -> tuple[Plan, Checkpoint]:
        """The plan that creates ``spec``, checked, not sent."""
        plan, checkpoint = await self._plan_checkpoint_create(spec)
        check_plan(plan, self.schema)
        return plan, checkpoint

    async def _plan_checkpoint_create(self, spec: CheckpointSpec) -> tuple[Plan, Checkpoint]:
        return plan_checkpoint_create(
            spec, await self.graph(), self.checkpoints(), int(time.time())
        )

    async def checkpoint_create(
        self, spec: CheckpointSpec, on_step: StepCallback | None = None
    ) -> Checkpoint:
        """Create a checkpoint on its own: one transaction of persistent bitmaps."""
        with locked(self.state_dir):
            plan, checkpoint = await self._plan_checkpoint_create(spec)
            journal = await self._run(plan, "checkpoint-create", on_step)
            self.checkpoint_store.save(checkpoint)
            journal.close("done")
        return checkpoint

    async def checkpoint_delete(
        self,
        name: str,
        children: bool = False,
        metadata_only: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[str]:
        """Delete a checkpoint (and its descendants with ``children``); return the names."""
        with locked(self.state_dir):
            plan, doomed = plan_checkpoint_delete(
                name, await self.graph(), self.checkpoints(), children, metadata_only
            )
            journal = await self._run(plan, "checkpoint-delete", on_step)
            names = [c.name for c in doomed]
            self._forget_checkpoints(names)
            journal.close("done")
        return names

    def _uncover(self, name: str, disks: Sequence[str]) -> None:
        """Checkpoint ``name`` no longer covers ``disks`` (their bitmaps are gone)."""
        checkpoint = find_checkpoint(self.checkpoints(), name)
        entries = tuple(
            CheckpointDisk(name=d.name, checkpoint="no") if d.name in disks else d
            for d in checkpoint.disks
        )
        self.checkpoint_store.save(checkpoint.model_copy(update={"disks": entries}))

    def _forget_checkpoints(self, names: list[str]) -> None:
        """Drop metadata of ``names``; their children take their parent."""
        remaining = [c for c in self.checkpoints() if c.name not in names]
        parents = {c.name: c.parent for c in self.checkpoints()}
        for checkpoint in remaining:
            parent = checkpoint.parent
            while parent in names:
                parent = parents.get(parent)
            if parent != checkpoint.parent:
                self.checkpoint_store.save(checkpoint.model_copy(update={"parent": parent}))
        for name in names:
            self.checkpoint_store.delete(name)

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
                    temp = measured.top_node(entry.name).bitmap(naming.size_bitmap(entry.name))
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


async def connect(address: str, state_dir: Path | str | None = None) -> VM:
    """Shorthand for :meth:`VM.connect`."""
    return await VM.connect(address, state_dir)
