"""The runner: checks a plan against the live schema, sends it, follows its jobs.

Each step is journaled before it is sent and after it answered.  When a step
fails, the steps already done are undone in reverse order, the files they
created are removed, and the error is raised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from .errors import (
    DisconnectedError,
    JobFailedError,
    QmpBackupError,
    QMPCommandError,
    SchemaMismatchError,
)
from .graph import CommandRunner
from .journal import Journal
from .plan import Plan, Step
from .planner.backup import JobState
from .qapi.commands import JobCancel, JobDismiss, QMPCommand
from .qapi.schema import QAPISchema
from .session import QMPSession

log = structlog.get_logger("qmpbackup.runner")

StepCallback = Callable[[int, Step], None]


def check_plan(plan: Plan, schema: QAPISchema) -> None:
    """Check every command of ``plan`` (and every undo) against QEMU's schema."""
    for step in plan.steps:
        for command in (step.command, *step.undo):
            if not schema.has_command(command.execute):
                raise SchemaMismatchError(command.execute, "", "unknown command in this QEMU")
            schema.check_command(command.execute, command.arguments())


def parse_jobs(reply: list[Mapping[str, Any]]) -> dict[str, JobState]:
    """``query-jobs`` as :class:`JobState` by job id."""
    return {
        job["id"]: JobState(
            id=job["id"],
            status=job["status"],
            error=job.get("error"),
            current_progress=job.get("current-progress", 0),
            total_progress=job.get("total-progress", 0),
        )
        for job in reply
    }


async def query_jobs(qmp: CommandRunner) -> dict[str, JobState]:
    """Every job QEMU has, by id."""
    return parse_jobs(await qmp.execute("query-jobs"))


async def wait_job(session: QMPSession, job_id: str) -> JobState:
    """Wait until ``job_id`` has concluded; return its final state."""
    async with session.watch({"JOB_STATUS_CHANGE"}) as events:
        while True:
            state = (await query_jobs(session)).get(job_id)
            if state is None:
                raise JobFailedError(f"job {job_id} vanished before it concluded")
            if state.status == "concluded":
                return state
            while (await events.get())["data"].get("id") != job_id:
                pass


async def wait_export_deleted(session: QMPSession, export_id: str) -> None:
    """Wait until QEMU no longer lists the block export ``export_id``."""
    async with session.watch({"BLOCK_EXPORT_DELETED"}) as events:
        while True:
            exports = await session.execute("query-block-exports")
            if not any(e["id"] == export_id for e in exports):
                return
            while (await events.get())["data"].get("id") != export_id:
                pass


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
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            log.info("undo.removed", path=path)


async def run_plan(
    session: QMPSession,
    plan: Plan,
    journal: Journal | None = None,
    on_step: StepCallback | None = None,
) -> list[Any]:
    """Send ``plan`` step by step; on failure undo what was done, then raise."""
    if journal is not None:
        journal.plan(plan)
    done: list[Step] = []
    replies: list[Any] = []
    for number, step in enumerate(plan.steps):
        if on_step is not None:
            on_step(number, step)
        if journal is not None:
            journal.write("step", index=number, execute=step.command.execute)
        try:
            try:
                replies.append(await run_command(session, step.command))
            except QMPCommandError as exc:
                if not step.may_fail:
                    raise
                log.info("plan.step_skipped", step=step.describe(), error=str(exc))
                replies.append(None)
            if step.await_export_deleted:
                await wait_export_deleted(session, step.await_export_deleted)
            if step.await_job:
                final = await wait_job(session, step.await_job)
                if final.error and not step.job_may_fail:
                    with contextlib.suppress(QmpBackupError):
                        await run_command(session, JobDismiss(id=step.await_job))
                    raise JobFailedError(
                        f"could not {step.reason} (job {step.await_job}): {final.error}"
                    )
        except QmpBackupError as exc:
            if journal is not None:
                journal.write("failed", index=number, error=str(exc))
            # The caller reports the error in one line; this is for -v.
            log.info("plan.failed", step=step.describe(), error=str(exc))
            if isinstance(exc, DisconnectedError) or not session.connected:
                # Nothing can be undone without QEMU, and whether this step ran is
                # unknown: the open journal is what lets ``recover`` finish the job.
                raise DisconnectedError(
                    f"lost the connection to QEMU during {step.command.execute}: what was "
                    "done is left in QEMU; run 'qmpbackup recover'"
                ) from exc
            await rollback(session, [*done, step] if step.await_job else done)
            if journal is not None:
                journal.close("rolled-back")
            raise
        done.append(step)
        if journal is not None:
            journal.write("done", index=number)
    if journal is not None:
        # The caller closes the journal once it has saved its own state.
        journal.write("sent")
    return replies


async def rollback(session: QMPSession, steps: list[Step]) -> None:
    """Undo ``steps`` in reverse order, best effort, and remove the files they created."""
    for step in reversed(steps):
        if session.connected:
            await _undo(session, step.undo)
        _remove_files(step.created_files)
