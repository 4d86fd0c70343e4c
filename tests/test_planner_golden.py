"""Golden tests of the pure planner over block graphs recorded from QEMU 7.2.

The graphs come from ``fixtures/qemu-7.2/graphs/*.json`` (recorded by
``scripts/record-graph-fixtures``).  Each case's plan is compared exactly
with ``fixtures/plans/<case>.json``; after an intended change of the
planner, rewrite them with ``QMPBACKUP_REGEN=1 pytest tests/test_planner_golden.py``
and review the diff.  Every golden plan must also pass the live-schema check
against the recorded 7.2 schema, and the planner must do no I/O.  A begin plan
records the capabilities (from the recorded schema) it was made with.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.errors import (
    BackupActiveError,
    InvalidInputError,
    PlanError,
    SchemaMismatchError,
    TargetExistsError,
    UnknownCheckpointError,
    UnknownDiskError,
)
from qmpbackup.planner import (
    BackupFacts,
    BackupPlan,
    BeginOptions,
    EndPlan,
    plan_backup_begin,
    plan_backup_end,
    plan_checkpoint_create,
    plan_checkpoint_delete,
    plan_checkpoint_size,
)
from qmpbackup.planner.plan import Plan
from qmpbackup.qapi.capabilities import Capabilities
from qmpbackup.qapi.schema import QAPISchema
from qmpbackup.qmp.graph import Bitmap, BlockGraph, BlockNode, graph_from_replies
from qmpbackup.qmp.jobs import JobState
from qmpbackup.request.models import (
    BackupSpec,
    CheckpointDiskSpec,
    CheckpointSpec,
    DiskBackupSpec,
    ServerSpec,
)
from qmpbackup.runner import check_plan
from qmpbackup.state.active import ActiveBackup, NbdServer
from qmpbackup.state.checkpoints import Checkpoint, CheckpointDisk

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ROOT / "fixtures" / "qemu-7.2" / "graphs"
QEMU_10 = ROOT / "fixtures" / "qemu-10.0"
GOLDEN = ROOT / "fixtures" / "plans"
SCHEMA = ROOT / "fixtures" / "qemu-7.2" / "query-qmp-schema.json"
VERSION = ROOT / "fixtures" / "qemu-7.2" / "query-version.json"
REGEN = os.environ.get("QMPBACKUP_REGEN") == "1"

NOW = 1_700_000_000
SCENARIOS = (
    "slides",
    "slides-check1",
    "slides-check1-check2",
    "slides-check1-inconsistent",
    "throttle",
    "drive",
    "bitmap-two-layers",
)


# -- inputs -------------------------------------------------------------------


@cache
def replies(scenario: str) -> dict[str, Any]:
    """The recorded QMP replies of ``scenario``."""
    data: dict[str, Any] = json.loads((GRAPHS / f"{scenario}.json").read_text(encoding="utf-8"))
    return data


def graph(scenario: str) -> BlockGraph:
    """The block graph of ``scenario``."""
    return graph_from_replies(replies(scenario))


@cache
def schema() -> QAPISchema:
    """The recorded QEMU 7.2 schema."""
    return QAPISchema.from_introspection(json.loads(SCHEMA.read_text(encoding="utf-8")))


@cache
def capabilities() -> Capabilities:
    """What the recorded QEMU 7.2 offers."""
    return Capabilities.from_schema(schema(), json.loads(VERSION.read_text(encoding="utf-8")))


def checkpoint(name: str, parent: str | None, created: int) -> Checkpoint:
    """A checkpoint's metadata covering vda and vdb with a bitmap of its name."""
    return Checkpoint(
        name=name,
        parent=parent,
        creation_time=created,
        disks=(
            CheckpointDisk(name="vda", checkpoint="bitmap", bitmap=name),
            CheckpointDisk(name="vdb", checkpoint="bitmap", bitmap=name),
        ),
    )


CHECK1 = checkpoint("check1", None, NOW - 2000)
CHECK2 = checkpoint("check2", "check1", NOW - 1000)


def facts(**extra: Any) -> BackupFacts:
    """Backup id 1 at :data:`NOW`, nothing existing or busy unless given."""
    return BackupFacts(**{"backup_id": 1, "now": NOW, "capabilities": capabilities(), **extra})


def slides_push(incremental: str | None = None) -> BackupSpec:
    """The slides' push spec: vda shallow into qcow2, vdb into raw (full) or qcow2 (inc)."""
    if incremental is None:
        return BackupSpec(
            mode="push",
            disks=(
                DiskBackupSpec(
                    name="vda", target="/backups/Backup1.1.qcow2", format="qcow2", shallow=True
                ),
                DiskBackupSpec(name="vdb", target="/backups/Backup2.full.raw", format="raw"),
            ),
        )
    return BackupSpec(
        mode="push",
        incremental=incremental,
        disks=(
            DiskBackupSpec(name="vda", target=f"/backups/Backup1.{incremental}.qcow2"),
            DiskBackupSpec(name="vdb", target=f"/backups/Backup2.{incremental}.qcow2"),
        ),
    )


def with_backup_nodes(base: BlockGraph, record: ActiveBackup) -> BlockGraph:
    """``base`` as QEMU shows it while ``record``'s backup runs: targets and temporary bitmaps."""
    nodes = dict(base.nodes)
    for disk in record.disks:
        for node in (*disk.view_nodes, *disk.target_nodes):
            driver = "file" if node.endswith("-file") else "qcow2"
            nodes[node] = BlockNode(node_name=node, driver=driver, filename=disk.target or "")
        for node, name in disk.temporary_bitmaps:
            extra = Bitmap(name=name, granularity=65536, count=0, recording=False, busy=True)
            nodes[node] = nodes[node].model_copy(update={"bitmaps": (*nodes[node].bitmaps, extra)})
    return base.model_copy(update={"nodes": nodes})


# -- serialization ------------------------------------------------------------


def plan_json(plan: Plan) -> dict[str, Any]:
    """Everything a plan says: the QMP sequence and, per step, reason, undo, job, files."""
    return {
        "commands": plan.commands(),
        "steps": [
            {
                "execute": step.command.execute,
                "reason": step.reason,
                "undo": [c.to_qmp() for c in step.undo],
                "await_job": step.await_job,
                "job_may_fail": step.job_may_fail,
                "created_files": list(step.created_files),
            }
            for step in plan.steps
        ],
    }


def begin_json(planned: BackupPlan, made_with: Capabilities | None = None) -> dict[str, Any]:
    return {
        "capabilities": (made_with or capabilities()).model_dump(mode="json"),
        "plan": plan_json(planned.plan),
        "record": planned.record.model_dump(mode="json"),
        "checkpoint": planned.checkpoint.model_dump(mode="json") if planned.checkpoint else None,
    }


def end_json(ended: EndPlan) -> dict[str, Any]:
    return {
        "plan": plan_json(ended.plan),
        "outcome": ended.outcome,
        "errors": dict(ended.errors),
        "drop_checkpoint": ended.drop_checkpoint,
    }


# -- cases --------------------------------------------------------------------

Result = tuple[dict[str, Any], list[Plan]]


def push_full() -> Result:
    planned = plan_backup_begin(slides_push(), graph("slides"), [], facts())
    return begin_json(planned), [planned.plan]


def push_full_new_checkpoint() -> Result:
    planned = plan_backup_begin(
        slides_push(), graph("slides"), [], facts(), CheckpointSpec(name="check1")
    )
    return begin_json(planned), [planned.plan]


def push_default_targets() -> Result:
    planned = plan_backup_begin(BackupSpec(mode="push"), graph("slides"), [], facts())
    return begin_json(planned), [planned.plan]


def incremental_check1_new_check2() -> BackupPlan:
    """The slides' second backup: incremental from check1, creating check2."""
    return plan_backup_begin(
        slides_push("check1"),
        graph("slides-check1"),
        [CHECK1],
        facts(),
        CheckpointSpec(name="check2"),
    )


def push_incremental_check1_new_check2() -> Result:
    planned = incremental_check1_new_check2()
    return begin_json(planned), [planned.plan]


def push_incremental_check2() -> Result:
    planned = plan_backup_begin(
        slides_push("check2"), graph("slides-check1-check2"), [CHECK1, CHECK2], facts()
    )
    return begin_json(planned), [planned.plan]


def push_differential_check1() -> Result:
    """Differential: from the older check1 while check2 exists."""
    planned = plan_backup_begin(
        slides_push("check1"), graph("slides-check1-check2"), [CHECK1, CHECK2], facts()
    )
    return begin_json(planned), [planned.plan]


def push_incremental_two_layers() -> Result:
    planned = plan_backup_begin(
        slides_push("check1"), graph("bitmap-two-layers"), [CHECK1], facts()
    )
    return begin_json(planned), [planned.plan]


def push_full_throttle() -> Result:
    planned = plan_backup_begin(slides_push(), graph("throttle"), [], facts())
    return begin_json(planned), [planned.plan]


def push_full_drive() -> Result:
    spec = BackupSpec(
        mode="push",
        disks=(
            DiskBackupSpec(name="vda", target="/backups/vda.qcow2"),
            DiskBackupSpec(name="drive-vdb", target="/backups/vdb.qcow2"),
        ),
    )
    planned = plan_backup_begin(spec, graph("drive"), [], facts())
    return begin_json(planned), [planned.plan]


def checkpoint_create_check1() -> Result:
    plan, made = plan_checkpoint_create(CheckpointSpec(name="check1"), graph("slides"), [], NOW)
    return {"plan": plan_json(plan), "checkpoint": made.model_dump(mode="json")}, [plan]


def checkpoint_create_check2() -> Result:
    plan, made = plan_checkpoint_create(
        CheckpointSpec(name="check2", description="after the first incremental"),
        graph("slides-check1"),
        [CHECK1],
        NOW,
    )
    return {"plan": plan_json(plan), "checkpoint": made.model_dump(mode="json")}, [plan]


def _delete(name: str, children: bool, metadata_only: bool) -> Result:
    plan, doomed = plan_checkpoint_delete(
        name, graph("slides-check1-check2"), [CHECK1, CHECK2], children, metadata_only
    )
    return {"plan": plan_json(plan), "deleted": [c.name for c in doomed]}, [plan]


def checkpoint_delete_check1() -> Result:
    return _delete("check1", children=False, metadata_only=False)


def checkpoint_delete_check1_children() -> Result:
    return _delete("check1", children=True, metadata_only=False)


def checkpoint_delete_metadata_only() -> Result:
    return _delete("check2", children=False, metadata_only=True)


def checkpoint_size_two_layers() -> Result:
    sizes, measure, remove = plan_checkpoint_size(CHECK1, graph("bitmap-two-layers"))
    result = {"sizes": sizes, "measure": plan_json(measure), "remove": plan_json(remove)}
    return result, [measure, remove]


def _begun_incremental() -> tuple[ActiveBackup, BlockGraph]:
    """Backup 1, incremental from check1 creating check2, as running in QEMU."""
    planned = incremental_check1_new_check2()
    return planned.record, with_backup_nodes(graph("slides-check1-check2"), planned.record)


def _job(job_id: str, status: str, error: str | None = None) -> JobState:
    return JobState(id=job_id, status=status, error=error, current_progress=1, total_progress=2)


def backup_end_completed() -> Result:
    record, running = _begun_incremental()
    jobs = {j: _job(j, "concluded") for j in record.job_ids()}
    ended = plan_backup_end(record, jobs, running, [CHECK1, CHECK2], abort=False)
    return end_json(ended), [ended.plan]


def backup_end_aborted() -> Result:
    record, running = _begun_incremental()
    jobs = {j: _job(j, "running") for j in record.job_ids()}
    ended = plan_backup_end(record, jobs, running, [CHECK1, CHECK2], abort=True)
    return end_json(ended), [ended.plan]


def backup_end_failed() -> Result:
    record, running = _begun_incremental()
    vda, vdb = record.job_ids()
    jobs = {
        vda: _job(vda, "concluded"),
        vdb: _job(vdb, "concluded", "Could not write to target: No space left on device"),
    }
    ended = plan_backup_end(record, jobs, running, [CHECK1, CHECK2], abort=False)
    return end_json(ended), [ended.plan]


def backup_end_full_completed() -> Result:
    planned = plan_backup_begin(slides_push(), graph("slides"), [], facts())
    running = with_backup_nodes(graph("slides"), planned.record)
    jobs = {j: _job(j, "concluded") for j in planned.record.job_ids()}
    ended = plan_backup_end(planned.record, jobs, running, [], abort=False)
    return end_json(ended), [ended.plan]


# -- pull mode ------------------------------------------------------------------

UNIX_FACTS = {"scratch_dir": "/state/scratch", "default_socket": "/state/nbd.sock"}


def pull_full_slides() -> Result:
    """backup_pull_full.xml: vdb's scratch named, vda's made in the state directory."""
    spec = BackupSpec(
        mode="pull",
        server=ServerSpec(name="localhost", port=10809),
        disks=(
            DiskBackupSpec(name="vda"),
            DiskBackupSpec(name="vdb", scratch="/home/eblake/scratch.qcow2"),
        ),
    )
    planned = plan_backup_begin(
        spec,
        graph("slides"),
        [],
        facts(existing_files=frozenset({"/home/eblake/scratch.qcow2"}), **UNIX_FACTS),
    )
    return begin_json(planned), [planned.plan]


def pull_incremental_check1_new_check2() -> Result:
    """backup_pull_2.xml + check2.xml, default unix socket, shallow vda."""
    spec = BackupSpec(
        mode="pull",
        incremental="check1",
        disks=(DiskBackupSpec(name="vda", shallow=True, exportbitmap="vda-changes"),),
    )
    planned = plan_backup_begin(
        spec,
        graph("slides-check1"),
        [CHECK1],
        facts(**UNIX_FACTS),
        CheckpointSpec(name="check2"),
    )
    return begin_json(planned), [planned.plan]


def pull_tls_auto_port() -> Result:
    spec = BackupSpec(mode="pull", server=ServerSpec(name="localhost", tls=True))
    planned = plan_backup_begin(
        spec,
        graph("slides"),
        [],
        facts(free_port=40123, **UNIX_FACTS),
        None,
        BeginOptions(tls_dir="/etc/pki/qemu", tls_allow=("O=Example,CN=backup-client",)),
    )
    return begin_json(planned), [planned.plan]


def pull_full_snapshot_access_fixed() -> Result:
    """The slides' pull backup on a QEMU whose snapshot-access the probe found reading
    only the instant (10.0): each disk's export is the snapshot-access node itself."""
    fixed = capabilities().model_copy(update={"snapshot_overread": False})
    planned = plan_backup_begin(
        BackupSpec(mode="pull"), graph("slides"), [], facts(capabilities=fixed, **UNIX_FACTS)
    )
    commands = json.dumps(planned.plan.commands())
    assert "blkdebug" not in commands and '"node-name": "qmpbackup-1-vda-access"' in commands
    return begin_json(planned, fixed), [planned.plan]


def pull_bounded_scratch() -> Result:
    """A pull backup whose scratches grow with the guest's overwrites (the one-shot
    backup's): a reserve file beside each, and a write threshold at its share of the
    folder's free space."""
    planned = plan_backup_begin(
        BackupSpec(mode="pull", incremental="check1"),
        graph("slides-check1"),
        [CHECK1],
        facts(free_space={"/state/scratch": 10 << 30}, **UNIX_FACTS),
        CheckpointSpec(name="check2"),
        BeginOptions(scratch_reserve=64 << 20),
    )
    assert all(d.write_threshold == (10 << 30) // 2 - (64 << 20) for d in planned.record.disks)
    return begin_json(planned), [planned.plan]


def pull_joins_running_server() -> Result:
    """A second pull backup of vdb while backup 1 serves vda: no second server."""
    running = NbdServer(transport="tcp", host="localhost", port=10809)
    spec = BackupSpec(
        mode="pull", disks=(DiskBackupSpec(name="vda", backup=False), DiskBackupSpec(name="vdb"))
    )
    planned = plan_backup_begin(
        spec,
        graph("slides"),
        [],
        facts(backup_id=2, running_server=running, busy_disks={"vda": 1}, **UNIX_FACTS),
    )
    return begin_json(planned), [planned.plan]


def _begun_pull() -> tuple[ActiveBackup, BlockGraph]:
    spec = BackupSpec(mode="pull", incremental="check1")
    planned = plan_backup_begin(
        spec, graph("slides-check1"), [CHECK1], facts(**UNIX_FACTS), CheckpointSpec(name="check2")
    )
    return planned.record, with_backup_nodes(graph("slides-check1-check2"), planned.record)


def pull_end_completed() -> Result:
    record, running = _begun_pull()
    jobs = {j: _job(j, "running") for j in record.job_ids()}
    exports = frozenset(d.export_id for d in record.disks if d.export_id)
    ended = plan_backup_end(record, jobs, running, [CHECK1, CHECK2], False, exports)
    return end_json(ended), [ended.plan]


def pull_end_aborted_shared_server() -> Result:
    record, running = _begun_pull()
    jobs = {j: _job(j, "running") for j in record.job_ids()}
    exports = frozenset(d.export_id for d in record.disks if d.export_id)
    ended = plan_backup_end(record, jobs, running, [CHECK1, CHECK2], True, exports, True)
    return end_json(ended), [ended.plan]


# The one-shot's checkpoint on the every-disk VM: persistent bitmaps on the qcow2 disks,
# non-persistent ones on the raw disk and the NVRAM (pflash0, the firmware, left out).
EVERY_CHECK1 = Checkpoint(
    name="check1",
    creation_time=NOW - 2000,
    disks=tuple(
        CheckpointDisk(name=d, bitmap="check1", persistent=d in ("vda", "vdb"))
        for d in ("vda", "vdb", "vdc", "pflash1")
    ),
)


def pull_incremental_every_disk() -> Result:
    """The one-shot's second pull backup of a VM with every kind of disk: a qcow2 -drive,
    a throttled qcow2, a raw disk and a pflash NVRAM, each an incremental from check1,
    creating check2 with non-persistent bitmaps where no persistent one can live."""
    spec = BackupSpec(
        mode="pull",
        incremental="check1",
        disks=(
            DiskBackupSpec(name="pflash0", backup=False),
            *(DiskBackupSpec(name=d) for d in ("vda", "vdb", "vdc", "pflash1")),
        ),
    )
    planned = plan_backup_begin(
        spec,
        graph("every-disk-check1"),
        [EVERY_CHECK1],
        facts(**UNIX_FACTS),
        CheckpointSpec(name="check2"),
        BeginOptions(volatile_bitmaps=True),
    )
    return begin_json(planned), [planned.plan]


CASES: dict[str, Callable[[], Result]] = {
    "pull-incremental-every-disk": pull_incremental_every_disk,
    "pull-full-slides": pull_full_slides,
    "pull-incremental-check1-new-check2": pull_incremental_check1_new_check2,
    "pull-tls-auto-port": pull_tls_auto_port,
    "pull-joins-running-server": pull_joins_running_server,
    "pull-bounded-scratch": pull_bounded_scratch,
    "pull-full-snapshot-access-fixed": pull_full_snapshot_access_fixed,
    "pull-end-completed": pull_end_completed,
    "pull-end-aborted-shared-server": pull_end_aborted_shared_server,
    "push-full": push_full,
    "push-full-new-checkpoint": push_full_new_checkpoint,
    "push-default-targets": push_default_targets,
    "push-incremental-check1-new-check2": push_incremental_check1_new_check2,
    "push-incremental-check2": push_incremental_check2,
    "push-differential-check1": push_differential_check1,
    "push-incremental-two-layers": push_incremental_two_layers,
    "push-full-throttle": push_full_throttle,
    "push-full-drive": push_full_drive,
    "checkpoint-create-check1": checkpoint_create_check1,
    "checkpoint-create-check2": checkpoint_create_check2,
    "checkpoint-delete-check1": checkpoint_delete_check1,
    "checkpoint-delete-check1-children": checkpoint_delete_check1_children,
    "checkpoint-delete-metadata-only": checkpoint_delete_metadata_only,
    "checkpoint-size-two-layers": checkpoint_size_two_layers,
    "backup-end-completed": backup_end_completed,
    "backup-end-aborted": backup_end_aborted,
    "backup-end-failed": backup_end_failed,
    "backup-end-full-completed": backup_end_full_completed,
}


def _golden_text(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


# -- golden comparisons ---------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fixture_graph_loads(scenario: str) -> None:
    """Every recorded scenario yields vda and vdb with a two-layer chain, on QEMU 7.2 and
    10.0 alike (the same disks, chains and bitmaps, from each QEMU's own replies)."""
    found = graph(scenario)
    assert set(found.disks) == {"vda", "vdb"}
    for disk in found.disks.values():
        assert len(disk.chain) == 2, disk
    newer = _graph_10(scenario)
    assert newer.disks == found.disks
    assert {n: [b.name for b in node.bitmaps] for n, node in newer.nodes.items()} == {
        n: [b.name for b in node.bitmaps] for n, node in found.nodes.items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_plan(case: str) -> None:
    result, _ = CASES[case]()
    path = GOLDEN / f"{case}.json"
    text = _golden_text(result)
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with QMPBACKUP_REGEN=1 to write it"
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert result == expected, f"{case} differs from {path} (QMPBACKUP_REGEN=1 to accept)"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_plan_passes_live_schema(case: str) -> None:
    _, plans = CASES[case]()
    for plan in plans:
        check_plan(plan, schema())


def test_no_golden_file_is_orphaned() -> None:
    """Every file under fixtures/plans belongs to a case (renamed cases leave none behind)."""
    if REGEN:
        for path in GOLDEN.glob("*.json"):
            if path.stem not in CASES:
                path.unlink()
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(CASES)


# -- what the golden plans must say -------------------------------------------------


def _actions(plan: Plan) -> list[dict[str, Any]]:
    transaction = plan.commands()[-1]
    assert transaction["execute"] == "transaction"
    actions: list[dict[str, Any]] = transaction["arguments"]["actions"]
    return actions


def test_push_full_is_one_transaction_shallow_and_raw() -> None:
    planned = plan_backup_begin(slides_push(), graph("slides"), [], facts())
    commands = planned.plan.commands()
    assert [c["execute"] for c in commands].count("transaction") == 1
    backups = {a["data"]["device"]: a["data"] for a in _actions(planned.plan)}
    assert backups["vda-fmt"]["sync"] == "top"
    assert backups["vdb-fmt"]["sync"] == "full"
    creates = [c["arguments"]["options"] for c in commands if c["execute"] == "blockdev-create"]
    qcow2 = next(o for o in creates if o["driver"] == "qcow2")
    assert qcow2["backing-file"] == "/srv/vm/Base1.img"
    assert qcow2["backing-fmt"] == "raw"
    raw = next(o for o in creates if o.get("filename") == "/backups/Backup2.full.raw")
    assert raw["size"] == 100 * 1024 * 1024


def test_incremental_merges_every_layer_into_a_temporary_bitmap() -> None:
    planned = plan_backup_begin(
        slides_push("check1"), graph("bitmap-two-layers"), [CHECK1], facts()
    )
    merges = {
        a["data"]["node"]: a["data"]["bitmaps"]
        for a in _actions(planned.plan)
        if a["type"] == "block-dirty-bitmap-merge"
    }
    assert merges["vda-fmt"] == [
        {"node": "vda-fmt", "name": "check1"},
        {"node": "vda-base", "name": "check1"},
    ]
    assert merges["vdb-fmt"] == [{"node": "vdb-fmt", "name": "check1"}]


def test_new_checkpoint_is_in_the_backup_transaction() -> None:
    planned = incremental_check1_new_check2()
    adds = [
        a["data"]
        for a in _actions(planned.plan)
        if a["type"] == "block-dirty-bitmap-add" and a["data"]["name"] == "check2"
    ]
    assert {a["node"] for a in adds} == {"vda-fmt", "vdb-fmt"}
    assert all(a["persistent"] for a in adds)
    assert planned.checkpoint is not None and planned.checkpoint.parent == "check1"


def test_backup_end_drops_checkpoint_only_when_not_completed() -> None:
    assert backup_end_completed()[0]["drop_checkpoint"] is None
    assert backup_end_aborted()[0]["drop_checkpoint"] == "check2"
    assert backup_end_failed()[0]["drop_checkpoint"] == "check2"
    assert backup_end_failed()[0]["errors"] == {
        "vdb": "Could not write to target: No space left on device"
    }


# -- refusals -----------------------------------------------------------------


def test_refuses_unknown_disk() -> None:
    spec = BackupSpec(mode="push", disks=(DiskBackupSpec(name="vdz", target="/b/z.qcow2"),))
    with pytest.raises(UnknownDiskError, match=r"unknown disk 'vdz' \(disks: vda, vdb\)"):
        plan_backup_begin(spec, graph("slides"), [], facts())


def test_refuses_unknown_checkpoint() -> None:
    with pytest.raises(UnknownCheckpointError, match="unknown checkpoint 'nope'"):
        plan_backup_begin(slides_push("nope"), graph("slides-check1"), [CHECK1], facts())


def test_refuses_unknown_checkpoint_on_delete() -> None:
    with pytest.raises(UnknownCheckpointError, match="unknown checkpoint 'check9'"):
        plan_checkpoint_delete("check9", graph("slides-check1"), [CHECK1])


def test_refuses_existing_target() -> None:
    existing = frozenset({"/backups/Backup2.full.raw"})
    with pytest.raises(TargetExistsError, match=r"target /backups/Backup2.full.raw exists"):
        plan_backup_begin(slides_push(), graph("slides"), [], facts(existing_files=existing))


def test_refuses_busy_disk() -> None:
    with pytest.raises(PlanError, match=r"disk 'vda' is already being backed up by backup id 3"):
        plan_backup_begin(slides_push(), graph("slides"), [], facts(busy_disks={"vda": 3}))


def test_refuses_existing_job_id() -> None:
    jobs = frozenset({"qmpbackup-1-vda"})
    with pytest.raises(PlanError, match="QEMU already has a job qmpbackup-1-vda"):
        plan_backup_begin(slides_push(), graph("slides"), [], facts(job_ids=jobs))


def test_refuses_new_checkpoint_name_that_exists() -> None:
    with pytest.raises(InvalidInputError, match="checkpoint 'check1' already exists"):
        plan_backup_begin(
            slides_push("check1"),
            graph("slides-check1"),
            [CHECK1],
            facts(),
            CheckpointSpec(name="check1"),
        )
    with pytest.raises(InvalidInputError, match="checkpoint 'check1' already exists"):
        plan_checkpoint_create(CheckpointSpec(name="check1"), graph("slides-check1"), [CHECK1], NOW)


def test_refuses_bitmap_name_already_on_the_disk() -> None:
    """No metadata for check1 but the bitmap exists in QEMU: still refused."""
    with pytest.raises(InvalidInputError, match="disk 'vda' already has a bitmap named 'check1'"):
        plan_checkpoint_create(CheckpointSpec(name="check1"), graph("slides-check1"), [], NOW)


def test_refuses_inconsistent_bitmap() -> None:
    with pytest.raises(PlanError, match=r"disk 'vda': bitmap 'check1' .* is inconsistent"):
        plan_backup_begin(
            slides_push("check1"), graph("slides-check1-inconsistent"), [CHECK1], facts()
        )


def test_refuses_missing_bitmap() -> None:
    """check1 is recorded as a checkpoint but QEMU has no such bitmap."""
    with pytest.raises(PlanError, match=r"disk 'vda': bitmap 'check1' .* is missing"):
        plan_backup_begin(slides_push("check1"), graph("slides"), [CHECK1], facts())


def test_refuses_end_while_copying_without_abort() -> None:
    record, running = _begun_incremental()
    jobs = {j: _job(j, "running") for j in record.job_ids()}
    with pytest.raises(BackupActiveError, match="Backup id 1 still active, need --abort"):
        plan_backup_end(record, jobs, running, [CHECK1, CHECK2], abort=False)


# -- graph shapes -------------------------------------------------------------


def test_throttle_resolves_to_the_format_node_under_the_filter() -> None:
    found = graph("throttle")
    vda = found.disk("vda")
    assert vda.root_node == "vda-throttle"
    assert found.node("vda-throttle").driver == "throttle"
    assert vda.top == "vda-fmt"
    planned = plan_backup_begin(slides_push(), found, [], facts())
    devices = {a["data"]["device"] for a in _actions(planned.plan)}
    assert devices == {"vda-fmt", "vdb-fmt"}
    plan, _ = plan_checkpoint_create(CheckpointSpec(name="check1"), found, [], NOW)
    assert {a["data"]["node"] for a in _actions(plan)} == {"vda-fmt", "vdb-fmt"}


@pytest.mark.parametrize("name", ["vdb", "drive-vdb"])
def test_drive_setup_accepts_qdev_id_and_blockbackend_name(name: str) -> None:
    found = graph("drive")
    assert found.disk(name).name == "vdb"
    spec = BackupSpec(
        mode="push",
        disks=(DiskBackupSpec(name=name, target="/backups/vdb.qcow2"), DiskBackupSpec(name="vda")),
    )
    planned = plan_backup_begin(spec, found, [], facts())
    jobs = {d.disk: d for d in planned.record.disks}
    assert jobs["vdb"].target == "/backups/vdb.qcow2"
    assert jobs["vdb"].source_node == found.disk("vdb").top
    assert jobs["vda"].target.startswith("/srv/vm/Active1.qcow2.")  # type: ignore[union-attr]


def test_drive_setup_excludes_disk_by_blockbackend_name() -> None:
    spec = BackupSpec(
        mode="push",
        disks=(DiskBackupSpec(name="vda"), DiskBackupSpec(name="drive-vdb", backup=False)),
    )
    planned = plan_backup_begin(spec, graph("drive"), [], facts())
    assert [d.disk for d in planned.record.disks] == ["vda"]


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_unlisted_disks_are_left_out(mode: str) -> None:
    """libvirt's meaning: once <disks> lists any disk, a disk it does not list is as
    backup='no'; with no <disks> at all, every disk is backed up."""
    listed = BackupSpec.model_validate({"mode": mode, "disks": [{"name": "vdb"}]})
    planned = plan_backup_begin(listed, graph("slides"), [], facts(**UNIX_FACTS))
    assert [d.disk for d in planned.record.disks] == ["vdb"]
    assert "vda" not in json.dumps(planned.plan.commands()).replace("Active1", "")
    everything = BackupSpec.model_validate({"mode": mode})
    planned = plan_backup_begin(everything, graph("slides"), [], facts(**UNIX_FACTS))
    assert [d.disk for d in planned.record.disks] == ["vda", "vdb"]
    only_no = BackupSpec.model_validate({"mode": mode, "disks": [{"name": "vda", "backup": False}]})
    with pytest.raises(InvalidInputError, match="the request backs up no disk"):
        plan_backup_begin(only_no, graph("slides"), [], facts(**UNIX_FACTS))


def test_checkpoint_leaves_unlisted_disks_out() -> None:
    """A checkpoint that lists vda gives vdb no bitmap, on its own and with a backup."""
    spec = CheckpointSpec(name="c1", disks=(CheckpointDiskSpec(name="vda"),))
    plan, made = plan_checkpoint_create(spec, graph("slides"), [], NOW)
    assert {a["data"]["node"] for a in _actions(plan)} == {"vda-fmt"}
    assert [(d.name, d.checkpoint) for d in made.disks] == [("vda", "bitmap"), ("vdb", "no")]
    planned = plan_backup_begin(BackupSpec(mode="push"), graph("slides"), [], facts(), spec)
    assert planned.checkpoint is not None
    assert [(d.name, d.checkpoint) for d in planned.checkpoint.disks] == [
        ("vda", "bitmap"),
        ("vdb", "no"),
    ]


# -- purity -------------------------------------------------------------------


def test_planner_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case runs with sockets, files, stat and subprocesses forbidden."""
    for scenario in SCENARIOS:
        replies(scenario)  # load the fixtures before I/O is forbidden
    schema()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the planner did I/O: {args!r}")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(io, "open", forbidden)
    monkeypatch.setattr(os, "open", forbidden)
    monkeypatch.setattr(os, "stat", forbidden)
    monkeypatch.setattr(os, "lstat", forbidden)
    monkeypatch.setattr(os, "listdir", forbidden)
    monkeypatch.setattr(os, "scandir", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    results = {name: case()[0] for name, case in CASES.items()}
    monkeypatch.undo()
    assert set(results) == set(CASES)


# -- capabilities as data ---------------------------------------------------------


def _schema_without(type_member: tuple[str, str]) -> QAPISchema:
    """The recorded 7.2 schema with one member removed from one object type."""
    reply = json.loads(SCHEMA.read_text(encoding="utf-8"))
    type_name, member = type_member
    for entry in reply:
        if entry["name"] == type_name:
            entry["members"] = [m for m in entry["members"] if m["name"] != member]
            break
    else:
        raise AssertionError(f"no type {type_name} in the recorded schema")
    return QAPISchema.from_introspection(reply)


def _arg_type(command: str) -> str:
    """The name of ``command``'s argument type in the recorded schema."""
    reply = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return str(next(e["arg-type"] for e in reply if e.get("name") == command))


def _without_key(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _without_key(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without_key(v, key) for v in value]
    return value


def test_plans_differ_exactly_by_the_capabilities_of_their_qemu() -> None:
    """The same backups planned for QEMU 7.2 and for a schema without blockdev-backup's
    x-perf: the push plans differ exactly there (and each passes its own schema's check),
    the pull plans not at all (fleecing jobs copy nothing)."""
    stripped = _schema_without((_arg_type("blockdev-backup"), "x-perf"))
    older = Capabilities.from_schema(stripped)
    assert not older.backup_perf and capabilities().backup_perf
    assert older.model_copy(
        update={"backup_perf": True, "version": ""}
    ) == capabilities().model_copy(update={"version": ""})

    pull_spec = BackupSpec(mode="pull", incremental="check1")
    for spec, checkpoints, scenario, extra in (
        (slides_push(), [], "slides", {}),
        (slides_push("check1"), [CHECK1], "slides-check1", {}),
        (pull_spec, [CHECK1], "slides-check1", UNIX_FACTS),
    ):
        new = plan_backup_begin(spec, graph(scenario), checkpoints, facts(**extra))
        old = plan_backup_begin(
            spec, graph(scenario), checkpoints, facts(capabilities=older, **extra)
        )
        new_json = begin_json(new)["plan"]
        old_json = begin_json(old)["plan"]
        if spec.mode == "push":
            assert new_json != old_json
            assert "x-perf" in json.dumps(new_json) and "x-perf" not in json.dumps(old_json)
        assert _without_key(new_json, "x-perf") == old_json
        check_plan(old.plan, stripped)
        check_plan(new.plan, schema())
        if spec.mode == "push":
            with pytest.raises(SchemaMismatchError, match="x-perf"):
                check_plan(new.plan, stripped)


def test_bounded_scratch_needs_room_beside_its_reserve() -> None:
    """A bounded scratch is refused, before anything is sent, where its folder cannot hold
    the reserves and a little room for each scratch; the whole-disk reservation is not in
    such a plan, and is in the default one."""
    spec = BackupSpec(mode="pull")
    options = BeginOptions(scratch_reserve=48 << 20)
    with pytest.raises(PlanError, match=r"/state/scratch has 100663296 bytes free: too little"):
        plan_backup_begin(
            spec,
            graph("slides"),
            [],
            facts(free_space={"/state/scratch": 96 << 20}, **UNIX_FACTS),
            None,
            options,
        )
    roomy = facts(free_space={"/state/scratch": 1 << 30}, **UNIX_FACTS)
    bounded = json.dumps(
        plan_backup_begin(spec, graph("slides"), [], roomy, None, options).plan.commands()
    )
    default = json.dumps(plan_backup_begin(spec, graph("slides"), [], roomy).plan.commands())
    assert "falloc" in default and "block-set-write-threshold" not in default
    assert '"size": 50331648, "preallocation": "falloc"}' in bounded  # the reserve file
    assert bounded.count("falloc") == 2 and bounded.count("block-set-write-threshold") == 2


def test_pull_view_needs_read_splitting() -> None:
    """Without blkdebug's align, the point-in-time view cannot keep reads within
    copy-before-write clusters: a pull backup is refused, a push backup is not."""
    reply = json.loads(SCHEMA.read_text(encoding="utf-8"))
    options = next(e for e in reply if e["name"] == _arg_type("blockdev-add"))
    blkdebug_type = next(v["type"] for v in options["variants"] if v["case"] == "blkdebug")
    older = Capabilities.from_schema(_schema_without((blkdebug_type, "align")))
    assert not older.read_splitting and capabilities().read_splitting
    with pytest.raises(PlanError, match="pull mode is not offered"):
        plan_backup_begin(
            BackupSpec(mode="pull"), graph("slides"), [], facts(capabilities=older, **UNIX_FACTS)
        )
    pushed = plan_backup_begin(slides_push(), graph("slides"), [], facts(capabilities=older))
    assert pushed.plan == plan_backup_begin(slides_push(), graph("slides"), [], facts()).plan


# -- the other end of the supported range: QEMU 10.0 ----------------------------------


def _graph_10(scenario: str) -> BlockGraph:
    """The block graph of ``scenario`` from QEMU 10.0's own replies."""
    return graph_from_replies(json.loads((QEMU_10 / "graphs" / f"{scenario}.json").read_text()))


@cache
def _schema_10() -> QAPISchema:
    return QAPISchema.from_introspection(
        json.loads((QEMU_10 / "query-qmp-schema.json").read_text(encoding="utf-8"))
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_plan_on_qemu_10(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every golden case planned for QEMU 10.0 (its graphs, its capabilities) passes 10.0's
    own schema check and equals the 7.2 golden plan but for the capabilities recorded:
    nothing 10.0 adds changes a plan yet."""
    version = json.loads((QEMU_10 / "query-version.json").read_text(encoding="utf-8"))
    newer = Capabilities.from_schema(_schema_10(), version)
    assert newer.version.startswith("10.0.")
    monkeypatch.setattr(sys.modules[__name__], "capabilities", lambda: newer)
    monkeypatch.setattr(sys.modules[__name__], "graph", _graph_10)
    result, plans = CASES[case]()
    for plan in plans:
        check_plan(plan, _schema_10())
    expected = json.loads((GOLDEN / f"{case}.json").read_text(encoding="utf-8"))
    if "capabilities" in expected:
        # The same capabilities but for the schema's, and for what the case set by hand.
        recorded = expected.pop("capabilities")
        assert result.pop("capabilities") == {
            **newer.model_dump(mode="json"),
            "snapshot_overread": recorded["snapshot_overread"],
        }
    assert result == expected
