"""An append-only journal of the QMP steps a run sends, written before and after each.

A run killed at any step leaves a journal saying which steps were sent and
how to undo them.  Each line is one JSON object, written at once; the plan
and every step that creates a file are fsynced before that step is sent (a
file outlives the host; what QEMU holds does not).  A
journal is closed by its ``end`` line once the run's own state (checkpoint
metadata, backup record) is saved too; a journal closed ``done`` is deleted,
one without ``end`` is what ``recover`` reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Journal:
    """The journal of one operation, under ``<state dir>/journal``."""

    def __init__(self, state_dir: Path, operation: str) -> None:
        directory = state_dir / "journal"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.path = directory / f"{stamp}-{os.getpid()}-{operation}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._group: asyncio.Future[None] | None = None

    def write(self, event: str, *, durable: bool = True, **fields: Any) -> None:
        """Append one entry and, unless ``durable`` is false, make it durable (a later
        :meth:`sync` then does)."""
        line = json.dumps({"time": time.time(), "event": event, **fields}) + "\n"
        os.write(self._fd, line.encode())
        if durable:
            os.fsync(self._fd)

    async def sync(self) -> None:
        """Make every entry written so far durable, with one fsync for all the callers
        that ask during the same turn of the event loop (steps sent side by side)."""
        if self._group is not None:
            await asyncio.shield(self._group)
            return
        self._group = asyncio.get_running_loop().create_future()
        group = self._group
        await asyncio.sleep(0)  # let the other lanes append their entries first
        self._group = None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            group.set_exception(exc)
            raise
        group.set_result(None)

    def plan(self, steps: Sequence[Mapping[str, Any]]) -> None:
        """Record the whole plan before its first step: per step, its ``command``, its
        ``undo`` commands and its ``created_files``, as QMP messages and paths."""
        self.write("plan", steps=list(steps))

    def close(self, outcome: str) -> None:
        """Record the outcome; a closed journal needs no recovery, and a ``done`` one is
        removed."""
        if self._fd < 0:
            return
        self.write("end", outcome=outcome)
        os.close(self._fd)
        self._fd = -1
        if outcome == "done":
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class JournalState:
    """What a journal file says: the plan, the steps sent, and how it ended (if it did)."""

    path: Path
    operation: str
    steps: tuple[dict[str, Any], ...]
    sent: int  # steps handed to QEMU (the last one may or may not have run)
    ended: str | None
    # The agent of a freeze the run did not see thawed: the guest may still be frozen.
    frozen_agent: str | None = None

    def sent_steps(self) -> tuple[dict[str, Any], ...]:
        """The planned steps that were sent."""
        return self.steps[: self.sent]


def read_journals(state_dir: Path) -> list[JournalState]:
    """Every journal in ``state_dir``, oldest first; torn last lines are ignored."""
    directory = state_dir / "journal"
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        steps: tuple[dict[str, Any], ...] = ()
        sent = 0
        ended = None
        frozen: str | None = None
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if entry.get("event") == "plan":
                steps = tuple(entry.get("steps", ()))
            elif entry.get("event") == "step":
                sent = max(sent, int(entry.get("index", 0)) + 1)
            elif entry.get("event") == "end":
                ended = str(entry.get("outcome"))
            elif entry.get("event") == "freeze":
                frozen = str(entry.get("agent"))
            elif entry.get("event") == "thawed":
                frozen = None
        operation = path.stem.split("-", 2)[-1]
        found.append(JournalState(path, operation, steps, sent, ended, frozen))
    return found
