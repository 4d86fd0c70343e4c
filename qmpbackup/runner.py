"""The runner: checks a plan against the live schema, sends it, follows its jobs.

Each step is journaled before it is sent and after it answered.  When a step
fails, the steps already done are undone in reverse order, the files they
created are removed, and the error is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from .errors import (
    DisconnectedError,
    GuestAgentError,
    JobFailedError,
    QmpBackupError,
    QMPCommandError,
    SchemaMismatchError,
)
from .files import remove_created_files
from .planner.plan import Plan, Step
from .qapi.commands import JobCancel, JobDismiss, QMPCommand
from .qapi.schema import QAPISchema
from .qmp.jobs import query_jobs, wait_export_deleted, wait_job
from .qmp.session import QMPSession
from .state.journal import Journal

log = structlog.get_logger("qmpbackup.runner")

StepCallback = Callable[[int, Step], None]


class Agent(Protocol):
    """What freezes a guest's filesystems (a :class:`~qmpbackup.qga.GuestAgent`)."""

    @property
    def path(self) -> str:
        """Where the agent is reached: recorded in the journal for ``recover``."""

    async def freeze(self) -> int:
        """Freeze the guest's filesystems; how many."""

    async def thaw(self) -> int:
        """Thaw them; how many."""


@dataclass
class Freeze:
    """The agent that freezes the guest around a plan's ``quiesce`` step, and, once
    thawed, how long the guest was frozen (seconds)."""

    agent: Agent
    seconds: float | None = None


def check_plan(plan: Plan, schema: QAPISchema) -> None:
    """Check every command of ``plan`` (and every undo) against QEMU's schema."""
    for step in plan.steps:
        for command in (step.command, *step.undo):
            if not schema.has_command(command.execute):
                raise SchemaMismatchError(command.execute, "", "unknown command in this QEMU")
            schema.check_command(command.execute, command.arguments())


async def run_command(session: QMPSession, command: QMPCommand) -> Any:
    """Send one command model."""
    return await session.execute(command.execute, command.arguments())


async def _undo(session: QMPSession, commands: tuple[QMPCommand, ...]) -> None:
    for command in commands:
        try:
            await run_command(session, command)
            if isinstance(command, JobCancel):
                await wait_job(session, command.id)
                await run_command(session, JobDismiss(id=command.id))
        except QmpBackupError as exc:
            log.warning("undo.failed", command=command.execute, error=str(exc))


def _remove_files(paths: tuple[str, ...]) -> None:
    for path in remove_created_files(paths):
        log.info("undo.removed", path=path)


async def run_plan(
    session: QMPSession,
    plan: Plan,
    journal: Journal | None = None,
    on_step: StepCallback | None = None,
    freeze: Freeze | None = None,
) -> list[Any]:
    """Send ``plan`` step by step; on failure undo what was done, then raise.

    A ``quiesce`` step is sent with the guest frozen through ``freeze``'s agent: the
    freeze is journaled first (so that ``recover`` thaws a guest a killed run left
    frozen), and the thaw follows the step's answer whatever it was, also when the
    run is cancelled.  GuestAgentError when the freeze or the thaw fails.

    Within a run of laned steps (see :meth:`Plan.segments`) each lane is sent in
    order and the lanes side by side: their round trips and job waits overlap,
    and their journal entries share fsyncs.  Once a step fails no lane starts
    another step; the ones in flight finish, then everything done is undone.
    """
    if journal is not None:
        journal.plan(
            [
                {
                    "command": step.command.to_qmp(),
                    "undo": [u.to_qmp() for u in step.undo],
                    "created_files": list(step.created_files),
                }
                for step in plan.steps
            ]
        )
    if freeze is None and any(step.quiesce for step in plan.steps):
        raise GuestAgentError("the plan quiesces the guest but no guest agent was given")
    run = _Run(session, plan, journal, on_step, [None] * len(plan.steps), freeze)
    for segment in plan.segments():
        lanes: dict[str | None, list[int]] = {}
        for index in segment:
            lanes.setdefault(plan.steps[index].lane, []).append(index)
        failures: list[tuple[int, QmpBackupError]] = []
        if len(lanes) > 1:
            await asyncio.gather(*(run.lane(ix, failures, True) for ix in lanes.values()))
        else:
            await run.lane(segment, failures, False)
        if failures:
            await _fail(session, plan, journal, run.done, sorted(failures, key=lambda f: f[0]))
    if journal is not None:
        # The caller closes the journal once it has saved its own state.
        journal.write("sent")
    return run.replies


async def run_journaled(
    session: QMPSession,
    schema: QAPISchema,
    plan: Plan,
    state_dir: Path,
    operation: str,
    on_step: StepCallback | None = None,
    freeze: Freeze | None = None,
) -> Journal:
    """Check ``plan`` against ``schema``, then send it with a journal in ``state_dir``.

    The caller closes the journal ``done`` once it has saved its own state, so that
    ``recover`` sees a run killed in between.  Raises SchemaMismatchError before
    anything is sent, else what :func:`run_plan` raises.
    """
    check_plan(plan, schema)
    journal = Journal(state_dir, operation)
    await run_plan(session, plan, journal, on_step, freeze)
    return journal


@dataclass
class _Run:
    """One run of a plan: what it sends through, and what it has done so far."""

    session: QMPSession
    plan: Plan
    journal: Journal | None
    on_step: StepCallback | None
    replies: list[Any]
    freeze: Freeze | None = None
    done: list[Step] = field(default_factory=list)

    async def lane(
        self, indexes: list[int], failures: list[tuple[int, QmpBackupError]], grouped: bool
    ) -> None:
        """Send the steps ``indexes`` in order until one fails (or another lane's did).
        ``grouped``: other lanes run alongside, so journal entries share fsyncs."""
        for number in indexes:
            if failures:
                return
            step = self.plan.steps[number]
            if self.on_step is not None:
                self.on_step(number, step)
            if self.journal is not None:
                # Only a file outlives the host: what a step makes in QEMU dies with
                # it, and if only this process dies the entry is in the page cache
                # for recover to read.  So only a step that creates files waits for
                # its entry to be on disk.
                durable = bool(step.created_files)
                execute = step.command.execute
                self.journal.write(
                    "step", index=number, execute=execute, durable=durable and not grouped
                )
                if durable and grouped:
                    await self.journal.sync()
            try:
                if step.quiesce and self.freeze is not None:
                    self.replies[number] = await self._send_frozen(step, self.freeze)
                else:
                    self.replies[number] = await _send_step(self.session, step)
            except QmpBackupError as exc:
                failures.append((number, exc))
                return
            self.done.append(step)
            if self.journal is not None:
                # Made durable by the next entry's fsync; recover checks QEMU anyway.
                self.journal.write("done", index=number, durable=False)

    async def _send_frozen(self, step: Step, freeze: Freeze) -> Any:
        """Send ``step`` with the guest frozen: freeze, the step, thaw, and nothing else
        in between, so that the guest stays frozen for one round trip."""
        if self.journal is not None:
            self.journal.write("freeze", agent=freeze.agent.path)
        started = time.monotonic()
        try:
            await freeze.agent.freeze()
        except BaseException:
            # A freeze that timed out may have frozen some filesystems: thaw them.
            with contextlib.suppress(QmpBackupError):
                await freeze.agent.thaw()
            raise
        try:
            return await _send_step(self.session, step)
        finally:
            await self._thaw(freeze, started)

    async def _thaw(self, freeze: Freeze, started: float) -> None:
        try:
            await freeze.agent.thaw()
        except QmpBackupError as exc:
            log.error("guest.thaw_failed", agent=freeze.agent.path, error=str(exc))
            raise GuestAgentError(
                f"the guest's filesystems could not be thawed ({exc}): "
                "run 'qmpbackup recover' to thaw them"
            ) from None
        freeze.seconds = time.monotonic() - started
        log.info("guest.thawed", agent=freeze.agent.path, frozen_ms=round(freeze.seconds * 1e3, 1))
        if self.journal is not None:
            self.journal.write("thawed", durable=False)


# QEMU's LUKS key setup times PBKDF2 with the thread's CPU time, and fails a create job
# at random with this when the kernel has accounted no time yet (a QEMU bug, fixed
# upstream in 2025, that Debian 12's 7.2 carries): such a job is sent again.
_TRANSIENT_JOB_ERRORS = ("Unable to get accurate CPU usage",)
_ATTEMPTS = 10


async def _send_step(session: QMPSession, step: Step) -> Any:
    """Send one step and wait for what it waits for; its reply.  A job that fails with
    a transient error of QEMU's (:data:`_TRANSIENT_JOB_ERRORS`) is started again."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return await _send_step_once(session, step)
        except JobFailedError as exc:
            if attempt == _ATTEMPTS or not any(e in str(exc) for e in _TRANSIENT_JOB_ERRORS):
                raise
            log.warning("plan.step_retried", step=step.describe(), error=str(exc))
            await asyncio.sleep(0.05 * attempt)  # the next measurement, on a calmer CPU


async def _send_step_once(session: QMPSession, step: Step) -> Any:
    """Send one step and wait for what it waits for; its reply."""
    job = step.await_job
    # A job the step starts is followed by its events alone, watched from before the
    # command is sent so that none is missed: no query-jobs round trip while it runs.
    starts_job = job is not None and getattr(step.command, "job_id", None) == job
    async with session.watch({"JOB_STATUS_CHANGE"} if starts_job else set()) as events:
        try:
            reply = await run_command(session, step.command)
        except QMPCommandError as exc:
            if not step.may_fail:
                raise
            log.info("plan.step_skipped", step=step.describe(), error=str(exc))
            return None
        if step.await_export_deleted:
            await wait_export_deleted(session, step.await_export_deleted)
        if job is None:
            return reply
        if starts_job:
            error = await _wait_started_job(session, events, job)
        else:
            error = (await wait_job(session, job)).error
    if error and not step.job_may_fail:
        with contextlib.suppress(QmpBackupError):
            await run_command(session, JobDismiss(id=job))
        raise JobFailedError(f"could not {step.reason} (job {job}): {error}")
    return reply


async def _wait_started_job(
    session: QMPSession, events: asyncio.Queue[Mapping[str, Any]], job_id: str
) -> str | None:
    """Wait until a job whose every status change is in ``events`` concludes; its error.

    A job that fails passes through ``aborting``; only then is QEMU asked for the error.
    """
    aborted = False
    while True:
        data = (await session.next_event(events, f"job {job_id}"))["data"]
        if data.get("id") != job_id:
            continue
        aborted = aborted or data.get("status") == "aborting"
        if data.get("status") == "concluded":
            break
    if not aborted:
        return None
    state = (await query_jobs(session)).get(job_id)
    if state is None:
        raise JobFailedError(f"job {job_id} vanished before it concluded")
    return state.error or f"job {job_id} was aborted"


async def _fail(
    session: QMPSession,
    plan: Plan,
    journal: Journal | None,
    done: list[Step],
    failures: list[tuple[int, QmpBackupError]],
) -> None:
    """Journal and undo a failed segment; raise the first failure (in plan order)."""
    number, exc = failures[0]
    step = plan.steps[number]
    if journal is not None:
        for index, error in failures:
            journal.write("failed", index=index, error=str(error))
    # The caller reports the error in one line; this is for -v.
    log.info("plan.failed", step=step.describe(), error=str(exc))
    if any(isinstance(e, DisconnectedError) for _, e in failures) or not session.connected:
        # Nothing can be undone without QEMU, and whether this step ran is
        # unknown: the open journal is what lets ``recover`` finish the job.
        raise DisconnectedError(
            f"lost the connection to QEMU during {step.command.execute}: what was "
            "done is left in QEMU; run 'qmpbackup recover'"
        ) from exc
    # A failed step whose job was started has something to undo too.
    started = [plan.steps[i] for i, _ in failures if plan.steps[i].await_job]
    await rollback(session, [*done, *started])
    if journal is not None:
        journal.close("rolled-back")
    raise exc


async def rollback(session: QMPSession, steps: list[Step]) -> None:
    """Undo ``steps`` in reverse order, best effort, and remove the files they created."""
    for step in reversed(steps):
        if session.connected:
            await _undo(session, step.undo)
        _remove_files(step.created_files)


_T = TypeVar("_T")


async def uninterrupted(work: Awaitable[_T]) -> _T:
    """Await ``work`` to its end: a cancel meanwhile (a stop signal) is absorbed, not
    raised, for what must not stop half-way once a result is committed."""
    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    current = asyncio.current_task()
    while current is not None and current.cancelling():
        current.uncancel()
    return task.result()
