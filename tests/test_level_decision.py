"""Per-disk level decisions over block graphs recorded from QEMU 7.2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpbackup.errors import PlanError
from qmpbackup.planner.level import DiskHistory, decide_levels
from qmpbackup.qmp.graph import BlockGraph, graph_from_replies
from qmpbackup.state.checkpoints import Checkpoint, CheckpointDisk

GRAPHS = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-7.2" / "graphs"
CHECK1 = Checkpoint(
    name="check1",
    creation_time=1000,
    disks=(
        CheckpointDisk(name="vda", bitmap="check1"),
        CheckpointDisk(name="vdb", bitmap="check1"),
    ),
)


def graph(scenario: str) -> BlockGraph:
    return graph_from_replies(json.loads((GRAPHS / f"{scenario}.json").read_text()))


def history(disk: str, **changes: object) -> DiskHistory:
    """The disk was last backed up (full) creating check1."""
    fields: dict[str, object] = {
        "disk": disk,
        "image": f"/srv/vm/Active{'ab'.index(disk[-1]) + 1}.qcow2",
        "virtual_size": {"vda": 64 << 20, "vdb": 100 << 20}[disk],
        "granularity": 65536,
        "last_checkpoint": "check1",
        "last_checkpoint_time": 1000,
        "full_checkpoint": "check1",
        "full_checkpoint_time": 1000,
    }
    fields.update(changes)
    return DiskHistory.model_validate(fields)


def decide(
    scenario: str, requested: str = "auto", **histories: DiskHistory | None
) -> dict[str, str]:
    known = {d: h for d, h in histories.items() if h is not None}
    found = decide_levels(requested, ["vda", "vdb"], graph(scenario), [CHECK1], known)  # type: ignore[arg-type]
    return {d.disk: f"{d.level}: {d.reason}" for d in found}


def test_valid_chains_go_incremental() -> None:
    got = decide("slides-check1", vda=history("vda"), vdb=history("vdb"))
    assert got == {"vda": "inc: changes since check1", "vdb": "inc: changes since check1"}


def test_inconsistent_bitmap_falls_back_on_that_disk_only() -> None:
    got = decide("slides-check1-inconsistent", vda=history("vda"), vdb=history("vdb"))
    assert got["vda"].startswith(
        "full: disk 'vda': bitmap 'check1' on node vda-fmt is inconsistent"
    )
    assert got["vdb"] == "inc: changes since check1"


def test_missing_bitmap_new_disk_and_resize() -> None:
    # No bitmaps at all in this graph: both fall back, each saying why.
    got = decide("slides", vda=history("vda"), vdb=None)
    assert got["vda"] == (
        "full: disk 'vda': bitmap 'check1' of the checkpoint is missing in QEMU; take a full backup"
    )
    assert got["vdb"] == "full: no earlier backup of vdb"
    resized = decide("slides-check1", vda=history("vda", virtual_size=32 << 20), vdb=history("vdb"))
    assert resized["vda"] == f"full: vda was resized from {32 << 20} to {64 << 20} bytes"


def test_other_chain_and_other_disk_are_detected() -> None:
    remade = decide(
        "slides-check1", vda=history("vda", last_checkpoint_time=999), vdb=history("vdb")
    )
    assert "belongs to another chain" in remade["vda"]
    coarse = decide("slides-check1", vda=history("vda", granularity=131072), vdb=history("vdb"))
    assert "granularity 65536, not 131072" in coarse["vda"]
    swapped = decide(
        "slides-check1", vda=history("vda", image="/srv/vm/Other.qcow2"), vdb=history("vdb")
    )
    assert (
        swapped["vda"]
        == "full: vda is now /srv/vm/Active1.qcow2, not /srv/vm/Other.qcow2 as backed up"
    )


def test_explicit_inc_refuses_and_diff_uses_the_full_checkpoint() -> None:
    with pytest.raises(PlanError, match="no inc backup of vda: vda was resized"):
        decide("slides-check1", "inc", vda=history("vda", virtual_size=1), vdb=history("vdb"))
    diff = decide(
        "slides-check1",
        "diff",
        vda=history("vda", last_checkpoint="check9", last_checkpoint_time=5),
        vdb=history("vdb"),
    )
    assert diff["vda"] == "diff: changes since check1"
    assert decide("slides-check1", "full", vda=history("vda"), vdb=None)["vdb"] == "full: asked"
