"""``blockpull`` on a running VM: start, follow, abort and describe a disk's pull.

Part of the public async API beside :class:`~qmpbackup.api.VM`. The pull is planned by
:mod:`qmpbackup.planner.blockpull` and sent by the runner with a journal; its job,
``qmpbackup-pull-<disk>``, is QEMU's own and outlives this process: a second
``blockpull`` follows it, ``recover`` leaves it running. It is followed through its
events (``BLOCK_JOB_COMPLETED``, ``BLOCK_JOB_CANCELLED``, ``BLOCK_JOB_ERROR``) and,
for progress, ``query-jobs``. Whether a pull is finished is read from the block graph
(the top layer has no backing file), not from the job, which QEMU dismisses by itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .errors import JobFailedError
from .files import atomic_write_text
from .planner.blockpull import plan_blockpull, plan_pull_abort
from .planner.naming import PULL_PREFIX, pull_job
from .planner.plan import Plan
from .qmp.graph import BlockGraph
from .qmp.jobs import query_jobs
from .runner import StepCallback, check_plan, run_journaled
from .state.directory import locked
from .state.journal import Journal

if TYPE_CHECKING:
    from .api import VM

log = structlog.get_logger("qmpbackup.blockpull")

ProgressCallback = Callable[[int, int], None]
_EVENTS = {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "JOB_STATUS_CHANGE"}


@dataclass(frozen=True)
class PullState:
    """A disk's pull: its top image, the backing files it still reads (top first; none
    once standalone) and its job as QEMU reports it (None when no job runs)."""

    disk: str
    image: str
    backing: tuple[str, ...]
    job: str
    status: str | None = None
    processed: int = 0
    total: int = 0

    @property
    def standalone(self) -> bool:
        """True when the top image has no backing file."""
        return not self.backing


def _state(graph: BlockGraph, disk: str, status: str | None, done: int, total: int) -> PullState:
    found = graph.disk(disk)
    nodes = graph.chain_nodes(found.name)
    return PullState(
        disk=found.name,
        image=graph.image_path(nodes[0]),
        backing=tuple(graph.image_path(n) for n in nodes[1:]),
        job=pull_job(found.name),
        status=status,
        processed=done,
        total=total,
    )


async def pull_state(vm: VM, disk: str) -> PullState:
    """The pull of ``disk`` now. UnknownDiskError for an unknown disk."""
    graph = await vm.graph()
    job = (await query_jobs(vm.session)).get(pull_job(graph.disk(disk).name))
    if job is None:
        return _state(graph, disk, None, 0, 0)
    return _state(graph, disk, job.status, job.current_progress, job.total_progress)


async def pulls(vm: VM) -> list[PullState]:
    """Every pull job QEMU runs, for ``jobinfo``."""
    jobs = await query_jobs(vm.session)
    running = [j for j in jobs.values() if j.id.startswith(PULL_PREFIX)]
    if not running:
        return []
    graph = await vm.graph()
    return [
        _state(graph, j.id.removeprefix(PULL_PREFIX), j.status, j.current_progress,
               j.total_progress)
        for j in running
    ]  # fmt: skip


async def plan_pull(vm: VM, disk: str, bandwidth: int | None = None) -> Plan:
    """The plan ``blockpull_start`` would send, checked against the live schema, not sent.
    Raises what :func:`~qmpbackup.planner.blockpull.plan_blockpull` raises and
    SchemaMismatchError when this QEMU would refuse it."""
    plan = plan_blockpull(
        await vm.graph(), disk, vm.capabilities, await query_jobs(vm.session), bandwidth
    )
    check_plan(plan, vm.schema)
    return plan


async def blockpull_start(
    vm: VM, disk: str, bandwidth: int | None = None, on_step: StepCallback | None = None
) -> PullState:
    """Start pulling ``disk``'s backing chain into its top layer (nothing is sent when its
    pull already runs); the pull's state before it starts. Raises what :func:`plan_pull`
    raises (before anything is sent) and QMPCommandError when QEMU refuses the job."""
    with locked(vm.state_dir):
        before = await pull_state(vm, disk)
        plan = await plan_pull(vm, disk, bandwidth)
        if plan.steps:
            # What the image read, kept for whoever finds it standalone later (a pull
            # started without --wait): the repository's marker is found through it.
            _started_path(vm, before.disk).parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write_text(_started_path(vm, before.disk), json.dumps(asdict(before)))
            # Closed as soon as the job runs: from then on the job is the state.
            (await _run(vm, plan, "blockpull", on_step)).close("done")
            log.info("blockpull.started", disk=before.disk, job=before.job, speed=bandwidth)
    return before


async def _run(vm: VM, plan: Plan, operation: str, on_step: StepCallback | None) -> Journal:
    """Check ``plan`` and send it journaled in ``vm``'s state directory."""
    return await run_journaled(vm.session, vm.schema, plan, vm.state_dir, operation, on_step)


def _started_path(vm: VM, disk: str) -> Path:
    return vm.state_dir / "pulls" / f"{disk}.json"


def started_pull(vm: VM, disk: str) -> PullState | None:
    """The state of ``disk`` when its last pull started, if one was started from this
    state directory and not forgotten since."""
    try:
        return PullState(**json.loads(_started_path(vm, disk).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def forget_pull(vm: VM, disk: str) -> None:
    """Forget what :func:`started_pull` would return (once the image is standalone)."""
    _started_path(vm, disk).unlink(missing_ok=True)


async def blockpull_wait(
    vm: VM, disk: str, on_progress: ProgressCallback | None = None, interval: float = 0.5
) -> PullState:
    """Follow ``disk``'s pull until its job is over; the state then. JobFailedError when
    the job failed, was cancelled or the image still has a backing file after it."""
    job = pull_job((await vm.graph()).disk(disk).name)
    error: str | None = None
    async with vm.session.watch(_EVENTS) as events:
        while True:
            state = (await query_jobs(vm.session)).get(job)
            if state is None:
                break
            if on_progress is not None:
                on_progress(state.current_progress, state.total_progress)
            try:
                event = await asyncio.wait_for(vm.session.next_event(events, job), interval)
            except TimeoutError:
                continue
            data = event.get("data", {})
            if data.get("device", data.get("id")) != job:
                continue
            if event["event"] == "BLOCK_JOB_CANCELLED":
                error = "the pull was cancelled"
            elif event["event"] == "BLOCK_JOB_COMPLETED":
                error = data.get("error")
                if on_progress is not None:
                    on_progress(int(data.get("offset", 0)), int(data.get("len", 0)))
            elif event["event"] == "BLOCK_JOB_ERROR":
                log.warning("blockpull.io-error", disk=disk, operation=data.get("operation"))
    final = await pull_state(vm, disk)
    if error is not None or not final.standalone:
        why = error or f"{final.image} still reads {final.backing[0]}"
        raise JobFailedError(f"blockpull of disk {final.disk} did not finish: {why}")
    log.info("blockpull.done", disk=final.disk, image=final.image)
    return final


async def blockpull_abort(vm: VM, disk: str, on_step: StepCallback | None = None) -> PullState:
    """Cancel ``disk``'s pull and wait until its job is gone; the state then (the image
    keeps its backing file and what was copied). InvalidInputError when none runs."""
    with locked(vm.state_dir):
        name = (await vm.graph()).disk(disk).name
        plan = plan_pull_abort(name, await query_jobs(vm.session))
        check_plan(plan, vm.schema)
        job = pull_job(name)
        async with vm.session.watch({"JOB_STATUS_CHANGE"}) as events:
            (await _run(vm, plan, "blockpull-abort", on_step)).close("done")
            while job in await query_jobs(vm.session):
                while (await vm.session.next_event(events, job))["data"].get("id") != job:
                    pass
    return await pull_state(vm, disk)
