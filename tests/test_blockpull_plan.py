"""The pure planner of ``blockpull`` over block graphs recorded from QEMU 7.2 and 10.0:
its one ``block-stream`` passes each version's own schema, and its refusals come before
anything would be sent."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from qmpbackup.errors import InvalidInputError, PlanError, UnknownDiskError
from qmpbackup.planner.blockpull import plan_blockpull, plan_pull_abort
from qmpbackup.qapi.capabilities import Capabilities
from qmpbackup.qapi.schema import QAPISchema
from qmpbackup.qmp.graph import BlockGraph, graph_from_replies
from qmpbackup.qmp.jobs import JobState
from qmpbackup.runner import check_plan

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VERSIONS = ("qemu-7.2", "qemu-10.0")


@cache
def schema(version: str) -> QAPISchema:
    return QAPISchema.from_introspection(
        json.loads((FIXTURES / version / "query-qmp-schema.json").read_text())
    )


def graph(version: str, scenario: str) -> BlockGraph:
    return graph_from_replies(
        json.loads((FIXTURES / version / "graphs" / f"{scenario}.json").read_text())
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scenario", ["slides", "throttle"])
def test_one_block_stream_into_the_top_format_node(version: str, scenario: str) -> None:
    found = graph(version, scenario)
    caps = Capabilities.from_schema(schema(version))
    assert caps.block_stream
    plan = plan_blockpull(found, "vda", caps, {}, bandwidth=50 << 20)
    check_plan(plan, schema(version))
    assert plan.commands() == [
        {
            "execute": "block-stream",
            "arguments": {"job-id": "qmpbackup-pull-vda", "device": found.disk("vda").top,
                          "speed": 50 << 20},
        }
    ]  # fmt: skip
    assert found.node(found.disk("vda").top).driver == "qcow2"  # under a throttle filter too
    assert "undo: job-cancel" in plan.explain()


def test_refusals_before_anything_is_sent() -> None:
    found = graph("qemu-7.2", "slides")
    caps = Capabilities.from_schema(schema("qemu-7.2"))
    with pytest.raises(UnknownDiskError):
        plan_blockpull(found, "vdz", caps, {})
    with pytest.raises(InvalidInputError, match="bandwidth"):
        plan_blockpull(found, "vda", caps, {}, bandwidth=0)
    with pytest.raises(PlanError, match="block-stream"):
        plan_blockpull(found, "vda", caps.model_copy(update={"block_stream": False}), {})
    with pytest.raises(InvalidInputError, match="no blockpull"):
        plan_pull_abort("vda", {})


def test_a_running_pull_is_followed_not_started_again() -> None:
    found = graph("qemu-10.0", "slides")
    caps = Capabilities.from_schema(schema("qemu-10.0"))
    running = {"qmpbackup-pull-vda": JobState(id="qmpbackup-pull-vda", status="running")}
    assert plan_blockpull(found, "vda", caps, running).steps == ()
    abort = plan_pull_abort("vda", running)
    check_plan(abort, schema("qemu-10.0"))
    assert abort.commands() == [
        {"execute": "job-cancel", "arguments": {"id": "qmpbackup-pull-vda"}}
    ]
