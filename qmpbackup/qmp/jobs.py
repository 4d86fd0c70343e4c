"""QEMU's jobs and block exports as qmpbackup follows them: their state, and waiting for them.

A job is followed through ``JOB_STATUS_CHANGE`` events, watched before QEMU is
asked, so that no change between the question and the wait is missed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import JobFailedError
from .session import CommandRunner, QMPSession


class JobState(BaseModel):
    """A QEMU job as ``query-jobs`` reports it."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: str
    error: str | None = None
    current_progress: int = 0
    total_progress: int = 0


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
    """Wait until ``job_id`` has concluded; return its final state.

    Raises JobFailedError if the job disappears first, DisconnectedError if QEMU does.
    """
    async with session.watch({"JOB_STATUS_CHANGE"}) as events:
        while True:
            state = (await query_jobs(session)).get(job_id)
            if state is None:
                raise JobFailedError(f"job {job_id} vanished before it concluded")
            if state.status == "concluded":
                return state
            while (await session.next_event(events, f"job {job_id}"))["data"].get("id") != job_id:
                pass


async def wait_export_deleted(session: QMPSession, export_id: str) -> None:
    """Wait until QEMU no longer lists the block export ``export_id``.

    Raises DisconnectedError if QEMU goes away first.
    """
    async with session.watch({"BLOCK_EXPORT_DELETED"}) as events:
        while True:
            exports = await session.execute("query-block-exports")
            if not any(e["id"] == export_id for e in exports):
                return
            what = f"export {export_id} to go"
            while (await session.next_event(events, what))["data"].get("id") != export_id:
                pass
