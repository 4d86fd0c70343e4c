"""Every disk of a VM, planned over graphs recorded from QEMU 7.2 and 10.0: a qcow2 disk
attached with ``-drive``, a throttled qcow2, a raw disk and the machine's pflash (scenarios
``every-disk`` and ``every-disk-check1`` of ``scripts/record-graph-fixtures``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpbackup.errors import PlanError
from qmpbackup.planner.checkpoint import checkpoint_with_backup
from qmpbackup.planner.level import DiskHistory, decide_levels
from qmpbackup.qmp.graph import BlockGraph, disk_name_from_qdev, graph_from_replies
from qmpbackup.request.loader import parse_checkpoint_spec
from qmpbackup.request.models import CheckpointSpec
from qmpbackup.state.checkpoints import Checkpoint, CheckpointDisk

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VERSIONS = ("qemu-7.2", "qemu-10.0")
DISKS = ["vda", "vdb", "vdc", "pflash1"]
CHECK1 = Checkpoint(
    name="check1",
    creation_time=1000,
    disks=tuple(
        CheckpointDisk(name=d, bitmap="check1", persistent=d in ("vda", "vdb")) for d in DISKS
    ),
)


def graph(version: str, scenario: str) -> BlockGraph:
    path = FIXTURES / version / "graphs" / f"{scenario}.json"
    return graph_from_replies(json.loads(path.read_text(encoding="utf-8")))


def history(found: BlockGraph, disk: str) -> DiskHistory:
    top = found.top_node(disk)
    return DiskHistory(
        disk=disk,
        image=found.image_path(top),
        virtual_size=top.virtual_size,
        granularity=65536,
        last_checkpoint="check1",
        last_checkpoint_time=1000,
        full_checkpoint="check1",
        full_checkpoint_time=1000,
    )


def reasons(found: BlockGraph, requested: str = "auto") -> dict[str, str]:
    past = {d: history(found, d) for d in DISKS}
    decided = decide_levels(requested, DISKS, found, [CHECK1], past)  # type: ignore[arg-type]
    return {d.disk: f"{d.level}: {d.reason}" for d in decided}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_disk_is_found_and_named(version: str) -> None:
    """pflash has no qdev id, and with -blockdev no BlockBackend name: it is named
    ``pflashN`` from its QOM path; pflash0, read-only, is the firmware's code."""
    found = graph(version, "every-disk")
    assert set(found.disks) == {"vda", "vdb", "vdc", "pflash0", "pflash1"}
    assert found.disk("vda-drive").name == "vda"
    assert found.top_node("vda").driver == "qcow2"
    assert found.disk("vdb").top == "vdb-fmt"  # under the throttle filter
    assert found.disk("pflash1").qdev == "/machine/system.flash1"
    assert found.top_node("pflash1").virtual_size == 540672
    assert [d for d in found.disks.values() if d.firmware_code] == [found.disk("pflash0")]


def test_names_from_qdev_paths() -> None:
    assert disk_name_from_qdev("/machine/system.flash1") == "pflash1"
    assert disk_name_from_qdev("/machine/system.flash") is None
    assert disk_name_from_qdev("/machine/peripheral/vda/virtio-backend") == "vda"


@pytest.mark.parametrize("version", VERSIONS)
def test_non_persistent_bitmaps_give_incrementals_while_qemu_runs(version: str) -> None:
    got = reasons(graph(version, "every-disk-check1"))
    assert got["vda"] == got["vdb"] == "inc: changes since check1"
    for disk in ("vdc", "pflash1"):
        assert got[disk] == (
            "inc: changes since check1; raw disk: a non-persistent bitmap, "
            "valid while this QEMU runs"
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_a_restarted_qemu_lost_the_non_persistent_bitmaps(version: str) -> None:
    """The every-disk graph has no bitmap at all, as a fresh QEMU shows the raw disks."""
    got = reasons(graph(version, "every-disk"))
    for disk in ("vdc", "pflash1"):
        assert got[disk] == (
            "full: raw disk: its bitmap of checkpoint check1 was not persistent and is gone "
            "(QEMU restarted since)"
        )
    fresh = graph(version, "every-disk")
    with pytest.raises(PlanError, match="no inc backup of vdc: raw disk: its bitmap"):
        decide_levels("inc", ["vdc"], fresh, [CHECK1], {"vdc": history(fresh, "vdc")})


def test_a_raw_disk_the_checkpoint_does_not_cover_gets_a_full_saying_why() -> None:
    found = graph("qemu-7.2", "every-disk-check1")
    bare = CHECK1.model_copy(update={"disks": CHECK1.disks[:2]})
    decided = decide_levels("auto", ["vdc"], found, [bare], {"vdc": history(found, "vdc")})
    assert decided[0].reason == "raw disk: no persistent bitmap, and checkpoint check1 has none"


def test_checkpoint_with_backup_is_volatile_only_when_asked() -> None:
    found = graph("qemu-7.2", "every-disk")
    spec = CheckpointSpec(name="check2")
    made = checkpoint_with_backup(spec, DISKS, found, [], None, 5, volatile=True)
    assert made is not None
    assert {d.name: d.persistent for d in made.disks} == {
        "vda": True, "vdb": True, "vdc": False, "pflash1": False,
    }  # fmt: skip
    assert "persistent='no'" in made.to_xml()
    # What dumpxml writes loads back (persistent is an output, like size).
    assert parse_checkpoint_spec(made.to_xml()).name == "check2"
    with pytest.raises(PlanError) as refused:
        checkpoint_with_backup(spec, ["vda", "vdc"], found, [], None, 5)
    assert str(refused.value) == (
        "disk 'vdc': checkpoints need a qcow2 top layer, not raw (persistent bitmaps live in "
        "qcow2 files); leave it out of the checkpoint with checkpoint='no' for that disk"
    )
