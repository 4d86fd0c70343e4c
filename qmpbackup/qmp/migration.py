"""A live migration that QEMU runs while qmpbackup works: noticed, and said.

QEMU 7.2 and 10.0 accept ``migrate`` while a backup job runs.  Measured with a push
and a pull backup on both: the migration stops the VM for its last phase, fails
there (7.2: ``bdrv_inactivate_all() failed``; 10.0: ``Error in migration
completion: Bad address``), QEMU resumes the VM on this host and the backup job goes
on; QEMU 7.2 sometimes crashes after that (SIGSEGV, about 1 push backup in 4).

``MIGRATION`` events come only with the ``events`` migration capability, which is
the management layer's to set, so a watch also asks ``query-migrate`` whenever QEMU
stops or resumes the VM (``STOP``, ``RESUME``: always sent) and once more at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import QmpBackupError
from .session import QMPSession


@dataclass(frozen=True)
class Migration:
    """What ``query-migrate`` says of the last migration: nothing (``status`` None)
    when this QEMU never began one."""

    status: str | None = None
    error: str | None = None

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> Migration:
        """``query-migrate``'s reply."""
        return cls(status=reply.get("status"), error=reply.get("error-desc"))

    def describe(self) -> str:
        """One line on what became of a migration begun while qmpbackup worked."""
        started = "a live migration was started during the backup and"
        why = f" ({self.error})" if self.error else ""
        if self.status == "failed":
            return f"{started} failed{why}: the VM stayed on this host"
        if self.status == "cancelled":
            return f"{started} cancelled: the VM stayed on this host"
        if self.status == "completed":
            return "the VM migrated away during the backup: this QEMU no longer runs it"
        return f"a live migration was started during the backup (QEMU's last word: {self.status})"

    def since(self, before: Migration) -> Migration | None:
        """This state, when it tells of a migration begun after ``before``; else None."""
        return self if self != before and self.status is not None else None

    @property
    def moved(self) -> bool:
        """True once the VM runs elsewhere: this QEMU's images are no longer its own."""
        return self.status == "completed"


async def query_migration(session: QMPSession) -> Migration:
    """The last migration as ``query-migrate`` reports it.

    Raises DisconnectedError if QEMU goes away.
    """
    return Migration.parse(await session.execute("query-migrate"))


class MigrationWatch:
    """Notices a migration begun between :meth:`watching` and :meth:`outcome`."""

    def __init__(self, session: QMPSession) -> None:
        self._session = session
        self._before = Migration()
        self._seen: Migration | None = None

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[MigrationWatch]:
        """Follow migrations while the block runs.

        Raises DisconnectedError if QEMU goes away before the watch starts.
        """
        self._before = await query_migration(self._session)
        async with self._session.watch({"MIGRATION", "STOP", "RESUME"}) as events:
            follower = asyncio.create_task(self._follow(events))
            try:
                yield self
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    async def _follow(self, events: asyncio.Queue[Mapping[str, Any]]) -> None:
        while True:
            event = await events.get()
            if event["event"] == "MIGRATION":
                self._seen = Migration(status=event["data"].get("status"))
                continue
            # STOP and RESUME may be a user's pause and resume; query-migrate decides.
            try:
                now = await query_migration(self._session)
            except QmpBackupError:
                return
            if now != self._before:
                self._seen = now

    @property
    def seen(self) -> Migration | None:
        """The migration noticed so far, asking QEMU nothing (it may be gone)."""
        return self._seen

    async def outcome(self) -> Migration | None:
        """The migration begun while watching, as it stands now; None if there was none.

        Raises DisconnectedError if QEMU goes away.
        """
        now = await query_migration(self._session)
        if now != self._before or self._seen is not None:
            self._seen = now
        return self._seen
