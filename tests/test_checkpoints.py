"""Checkpoints against a real QEMU: size since a checkpoint, deletion keeps older ones correct."""

from __future__ import annotations

import re
from pathlib import Path

from qmpbackup.demo.throwaway import ThrowawayVM, images_equal

from .conftest import block_state
from .support import Cli, allocated_clusters, clusters_of, rebase
from .test_push_backup import push_xml

MiB = 1024 * 1024


def sizes(xml: str) -> dict[str, int]:
    """``{disk: size}`` from ``checkpoint-dumpxml --size`` output."""
    return {m[0]: int(m[1]) for m in re.findall(r"<disk name='(\w+)'[^>]* size='(\d+)'", xml)}


async def test_dumpxml_size_counts_dirty_bytes(vm: ThrowawayVM, cli: Cli) -> None:
    """The slides: checkpoint-create-as c1, the guest writes 128 KiB, --size says 131072."""
    out = await cli.ok("checkpoint-create-as", "c1")
    assert out.out.strip() == "Domain checkpoint c1 created"
    await vm.write("vda", 0x42, 5 * MiB, 128 * 1024)
    xml = (await cli.ok("checkpoint-dumpxml", "c1", "--size")).out
    assert "<name>c1</name>" in xml
    assert sizes(xml) == {"vda": 131072, "vdb": 0}
    # Without --size no size attribute, and the bitmaps are what QEMU holds.
    assert "size=" not in (await cli.ok("checkpoint-dumpxml", "c1")).out
    nodes = {n["node-name"]: n for n in await vm.session.execute("query-named-block-nodes")}
    bitmap = nodes["vda-fmt"]["dirty-bitmaps"][0]
    assert (bitmap["name"], bitmap["persistent"], bitmap["recording"]) == ("c1", True, True)

    deleted = await cli.ok("checkpoint-delete", "c1")
    assert deleted.out.strip() == "Domain checkpoint c1 deleted"
    assert (await cli.ok("checkpoint-list", "--name")).out.strip() == ""
    assert "c1" not in str(await block_state(vm))


async def test_deleting_middle_checkpoint_keeps_older_incremental(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """A ← B ← C; delete B; the incremental from A still holds every change since A."""
    full = tmp_path / "full.qcow2"
    await vm.write("vda", 0x11, 0, 2 * MiB)
    await cli.ok(
        "backup-begin",
        str(
            push_xml(
                tmp_path / "f.xml",
                {"vda": (full, "qcow2", False), "vdb": (tmp_path / "fb.qcow2", "qcow2", False)},
            )
        ),
        "A",
    )
    await cli.finish(1)
    await vm.write("vda", 0x22, 8 * MiB, 256 * 1024)
    await cli.ok("checkpoint-create-as", "B")
    await vm.write("vda", 0x33, 16 * MiB, 64 * 1024)
    await cli.ok("checkpoint-create-as", "C")
    await vm.write("vda", 0x44, 24 * MiB, 64 * 1024)
    tree = (await cli.ok("checkpoint-list", "--tree")).out
    assert tree.split() == ["A", "└──", "B", "└──", "C"]

    await cli.ok("checkpoint-delete", "B")
    assert (await cli.ok("checkpoint-list", "--name")).out.split() == ["A", "C"]
    # C's parent is now A.
    assert "<name>A</name>" in (await cli.ok("checkpoint-dumpxml", "C")).out

    ref = await vm.reference("vda", tmp_path / "ref.raw")
    inc = tmp_path / "inc.qcow2"
    spec = push_xml(
        tmp_path / "i.xml", {"vda": (inc, "qcow2", False)}, incremental="A", skip=["vdb"]
    )
    await cli.ok("backup-begin", str(spec))
    await cli.finish(1)
    assert allocated_clusters(inc) == (
        clusters_of(8 * MiB, 256 * 1024)
        | clusters_of(16 * MiB, 64 * 1024)
        | clusters_of(24 * MiB, 64 * 1024)
    )
    rebase(inc, full)
    assert images_equal(inc, ref)


async def test_checkpoint_from_file_and_children(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """checkpoint-create from XML (one disk only), then --children deletes the subtree."""
    spec = tmp_path / "check1.xml"
    spec.write_text(
        "<domaincheckpoint><name>check1</name><description>nightly</description>"
        "<disks><disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='no'/></disks>"
        "</domaincheckpoint>"
    )
    assert "Domain checkpoint check1 created" in (await cli.ok("checkpoint-create", str(spec))).out
    await cli.ok("checkpoint-create-as", "check2")
    xml = (await cli.ok("checkpoint-dumpxml", "check1")).out
    assert "<description>nightly</description>" in xml
    assert "<disk name='vdb' checkpoint='no'/>" in xml
    nodes = {n["node-name"]: n for n in await vm.session.execute("query-named-block-nodes")}
    assert [b["name"] for b in nodes["vdb-fmt"].get("dirty-bitmaps", [])] == ["check2"]
    out = await cli.ok("checkpoint-delete", "check1", "--children")
    assert out.out.split("\n")[:2] == [
        "Domain checkpoint check1 deleted",
        "Domain checkpoint check2 deleted",
    ]
    state = str(await block_state(vm))
    assert "check1" not in state and "check2" not in state
