"""Plans: ordered QMP steps, each with its reason and its undo."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..qapi.commands import QMPCommand, Transaction


class Step(BaseModel):
    """One QMP command (or one ``transaction``) of a plan.

    ``await_job`` names a job that must conclude before the next step (without
    error, unless ``job_may_fail``: a cancelled job ends with one); ``undo`` is
    what reverts the step; ``created_files`` are host files the step creates,
    removed when the step is undone.  ``await_export_deleted`` waits until QEMU
    has really dropped that export (deletion finishes when clients are gone).
    A step with ``may_fail`` is cleanup whose failure is logged, not raised.
    ``lane`` (a disk) marks steps that only touch that disk's own nodes: in a
    run of consecutive laned steps, each lane keeps its order while different
    lanes may be sent concurrently.  ``quiesce`` marks the step that sets a backup's or a
    checkpoint's instant: the guest's filesystems are frozen through its agent right
    before it is sent and thawed right after it answered.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    command: QMPCommand
    reason: str
    undo: tuple[QMPCommand, ...] = ()
    await_job: str | None = None
    job_may_fail: bool = False
    await_export_deleted: str | None = None
    may_fail: bool = False
    created_files: tuple[str, ...] = ()
    lane: str | None = None
    quiesce: bool = False

    def describe(self) -> str:
        """One line: the command and its reason."""
        return f"{self.command.execute}: {self.reason}"


class Plan(BaseModel):
    """An ordered list of steps; nothing is sent until a runner runs it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    steps: tuple[Step, ...] = ()

    def commands(self) -> list[dict[str, Any]]:
        """The QMP messages in send order."""
        return [step.command.to_qmp() for step in self.steps]

    def to_json(self) -> str:
        """:meth:`commands` as indented JSON."""
        return json.dumps(self.commands(), indent=2)

    def explain(self) -> str:
        """Each step with its reason, its arguments and its undo, for people."""
        lines: list[str] = []
        for number, step in enumerate(self.steps, 1):
            lines.append(f"{number}. {step.command.execute} -- {step.reason}")
            if step.quiesce:
                lines.append(
                    "     quiesced: qemu-guest-agent's guest-fsfreeze-freeze right before, "
                    "guest-fsfreeze-thaw right after (also if it fails)"
                )
            if isinstance(step.command, Transaction):
                for action in step.command.actions:
                    lines.append(f"     {action.execute} {json.dumps(action.arguments())}")
            else:
                lines.append(f"     {json.dumps(step.command.arguments())}")
            if step.await_job:
                lines.append(f"     then wait for job {step.await_job} to conclude")
            for undo in step.undo:
                lines.append(f"     undo: {undo.execute} {json.dumps(undo.arguments())}")
            for path in step.created_files:
                lines.append(f"     undo: remove {path}")
        return "\n".join(lines)

    def segments(self) -> list[list[int]]:
        """Step indexes grouped into segments: a step without a lane alone, or a run of
        consecutive laned steps (whose lanes are independent of each other)."""
        out: list[list[int]] = []
        for index, step in enumerate(self.steps):
            previous = self.steps[index - 1].lane if index else None
            if step.lane is not None and previous is not None and out:
                out[-1].append(index)
            else:
                out.append([index])
        return out

    def __add__(self, other: Plan) -> Plan:
        return Plan(steps=self.steps + other.steps)
