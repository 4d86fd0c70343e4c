"""An append-only journal of the QMP steps a run sends, written before and after each.

A run killed at any step leaves a journal saying which steps were sent and
how to undo them.  Each line is one JSON object; every line is fsynced.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .plan import Plan


class Journal:
    """The journal of one operation, under ``<state dir>/journal``."""

    def __init__(self, state_dir: Path, operation: str) -> None:
        directory = state_dir / "journal"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.path = directory / f"{stamp}-{os.getpid()}-{operation}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, event: str, **fields: Any) -> None:
        """Append one entry and make it durable."""
        line = json.dumps({"time": time.time(), "event": event, **fields}) + "\n"
        os.write(self._fd, line.encode())
        os.fsync(self._fd)

    def plan(self, plan: Plan) -> None:
        """Record the whole plan, with undos, before its first step."""
        self.write(
            "plan",
            steps=[
                {
                    "command": step.command.to_qmp(),
                    "undo": [u.to_qmp() for u in step.undo],
                    "created_files": list(step.created_files),
                }
                for step in plan.steps
            ],
        )

    def close(self, outcome: str) -> None:
        """Record the outcome; a closed journal needs no recovery."""
        self.write("end", outcome=outcome)
        os.close(self._fd)
