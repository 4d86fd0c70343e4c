"""Plans sent nothing, live-schema rejection, bad input refused with exit 2, abort and cleanup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, make_slides_images
from qmpbackup.errors import SchemaMismatchError
from qmpbackup.planner.plan import Plan, Step
from qmpbackup.qapi.commands import QMPCommand
from qmpbackup.qapi.schema import QAPISchema
from qmpbackup.runner import check_plan

from .conftest import block_state
from .support import Cli
from .test_push_backup import push_xml

MiB = 1024 * 1024

# Commands that only read QEMU state (leftover checks list /objects with qom-list).
READ_ONLY = ("query-", "x-debug-query", "qom-list")


async def test_plan_is_exactly_what_backup_begin_sends(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    spec = push_xml(
        tmp_path / "b.xml",
        {"vda": (tmp_path / "a.qcow2", "qcow2", True), "vdb": (tmp_path / "b.raw", "raw", False)},
    )
    before = await block_state(vm)
    planned = await cli.ok("plan", str(spec), "check1", verbose=True)
    plan = json.loads(planned.out)
    # Planning only reads.
    assert all(c["execute"].startswith(READ_ONLY) for c in planned.qmp_commands())
    assert await block_state(vm) == before
    assert not (tmp_path / "a.qcow2").exists() and not (tmp_path / "b.raw").exists()
    assert (await cli.ok("checkpoint-list", "--name")).out == ""

    explained = (await cli.ok("plan", str(spec), "check1", "--explain")).out
    assert "transaction -- start the backup of vda, vdb at one instant" in explained
    assert "undo: blockdev-del" in explained

    begun = await cli.ok("backup-begin", str(spec), "check1", verbose=True)
    sent = [c for c in begun.qmp_commands() if not c["execute"].startswith(READ_ONLY)]
    # The disks' steps go side by side: the same commands, each disk's in plan order,
    # on the same side of the one transaction.
    assert sorted(map(json.dumps, sent)) == sorted(map(json.dumps, plan))
    cut = [c["execute"] for c in plan].index("transaction")
    assert sent[cut] == plan[cut]
    for disk in ("vda", "vdb"):
        for part in (slice(None, cut), slice(cut + 1, None)):
            mine = [c for c in plan[part] if disk in json.dumps(c)]
            assert [c for c in sent[part] if disk in json.dumps(c)] == mine
    await cli.finish(1)


class _BadBackup(QMPCommand):
    """blockdev-backup with a misspelt member, which pydantic alone cannot know is wrong."""

    execute: ClassVar[str] = "blockdev-backup"
    job_id: str
    device: str
    target: str
    syncc: str


async def test_live_schema_rejects_bad_member(vm: ThrowawayVM) -> None:
    schema = QAPISchema.from_introspection(await vm.session.execute("query-qmp-schema"))
    before = await block_state(vm)
    bad = Plan(
        steps=(
            Step(
                command=_BadBackup(job_id="j", device="vda-fmt", target="t", syncc="full"),
                reason="x",
            ),
        )
    )
    with pytest.raises(
        SchemaMismatchError, match=r"blockdev-backup: syncc: unknown member 'syncc'"
    ):
        check_plan(bad, schema)
    assert await block_state(vm) == before


def _one_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown-disk", "unknown disk 'vdz'"),
        ("unknown-checkpoint", "unknown checkpoint 'nope'"),
        ("malformed", "in "),
        ("existing-target", "exists; remove it or ask for reuse"),
        ("bad-name", "invalid checkpoint name"),
    ],
)
async def test_bad_input_exits_2_and_changes_nothing(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, case: str, message: str
) -> None:
    await cli.ok("checkpoint-create-as", "check0")
    target = tmp_path / "t.qcow2"
    args: list[str]
    if case == "unknown-disk":
        args = [
            "backup-begin",
            str(push_xml(tmp_path / "s.xml", {"vdz": (target, "qcow2", False)})),
        ]
    elif case == "unknown-checkpoint":
        args = [
            "backup-begin",
            str(push_xml(tmp_path / "s.xml", {"vda": (target, "qcow2", False)}, "nope")),
        ]
    elif case == "malformed":
        (tmp_path / "s.xml").write_text(
            "<domainbackup mode='push'><disks><disk name='vda'></domainbackup>"
        )
        args = ["backup-begin", str(tmp_path / "s.xml")]
    elif case == "existing-target":
        target.write_bytes(b"precious user data")
        args = [
            "backup-begin",
            str(push_xml(tmp_path / "s.xml", {"vda": (target, "qcow2", False)})),
        ]
    else:
        args = ["checkpoint-create-as", "bad/name"]
    before = await block_state(vm)
    result = await cli(*args)
    assert result.rc == 2, result
    _one_line_error(result.err)
    assert message in result.err
    assert await block_state(vm) == before
    if case == "existing-target":
        assert target.read_bytes() == b"precious user data"
    else:
        assert not target.exists()
    assert (await cli.ok("checkpoint-list", "--name")).out.split() == ["check0"]


async def test_backup_end_refuses_while_active_then_aborts(tmp_path: Path) -> None:
    disks = make_slides_images(tmp_path / "vm")
    # vdc answers each request after 1 s: its 4 GiB copy runs for a minute, a cancel takes ~1 s.
    disks.append(DiskImage.slow("vdc", 4 << 30, latency_ns=1_000_000_000))
    async with ThrowawayVM(tmp_path / "vm", disks, name="slow") as vm:
        await _refuse_then_abort(vm, Cli(vm, tmp_path / "state"), tmp_path)


async def _refuse_then_abort(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    spec = push_xml(
        tmp_path / "s.xml",
        {"vdb": (tmp_path / "b.qcow2", "qcow2", False), "vdc": (tmp_path / "c.raw", "raw", False)},
        skip=["vda"],
    )
    check = tmp_path / "check1.xml"
    check.write_text(
        "<domaincheckpoint><name>check1</name><disks>"
        "<disk name='vdb'/><disk name='vdc' checkpoint='no'/></disks></domaincheckpoint>"
    )
    await cli.ok("backup-begin", str(spec), str(check))
    info = json.loads((await cli.ok("jobinfo", "--json")).out)
    assert info["status"] == "running"
    assert {d["disk"]: d["status"] for d in info["disks"]}["vdc"] == "running"

    refused = await cli("backup-end", "1")
    assert refused.rc == 1
    assert refused.err.strip() == "error: Backup id 1 still active, need --abort to end now"

    aborted = await cli("backup-end", "1", "--abort")
    assert aborted.rc == 0, aborted.err
    assert "Backup id 1 aborted" in aborted.out
    # The checkpoint made with a backup that did not complete is gone too.
    assert "Domain checkpoint check1 deleted" in aborted.out
    state = await block_state(vm)
    assert "qmpbackup-" not in str(state) and "check1" not in str(state)
    assert state["jobs"] == []
    assert (await cli.ok("checkpoint-list", "--name")).out == ""
    assert "Job type:         None" in (await cli.ok("jobinfo")).out
