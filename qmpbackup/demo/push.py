"""The demo's sections up to pull mode: setup, Part II, and Part IV in push mode.

Part II is the full push backup; Part IV measures a checkpoint, then walks the
push chain.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

from ..request import BackupSpec, CheckpointSpec, DiskBackupSpec, backup_to_xml
from .chain import ROUNDS, Round, begin_round, check_chains, verify
from .show import (
    CLUSTER,
    MiB,
    allocated_clusters,
    chain_text,
    check,
    header,
    image_info,
    picture,
    say,
    show_file,
    size_text,
)
from .stage import DISKS, NUMBER, Demo
from .throwaway import images_equal, qemu_img


async def setup(demo: Demo) -> None:
    """Show the layout and let the guest write the slides' first data."""
    info = await demo.vm.info()
    say(f"QEMU {info.version} running (pid {demo.machine_pid()})")
    say(f"QMP socket: {demo.machine.qmp_path}")
    for disk in DISKS:
        say(f"{disk}: {chain_text(demo.machine.disks[NUMBER[disk] - 1].path)}")
    await demo.paint_all({"vda": "-BBBB---", "vdb": "XXXX----"}, "(one letter = 1 MiB)")
    await demo.paint_all({"vdb": "-YYYY---"}, "")
    refs = await demo.references("setup")
    say(f"vda reads {picture(refs['vda'])}, vdb reads {picture(refs['vdb'])}")


async def push_full(demo: Demo) -> None:
    """Part II: backup_push_full.xml, shallow qcow2 of vda and raw of vdb, at one instant."""
    header("Part II: full backup, push mode")
    b1, b2 = demo.workdir / "Backup1.1.qcow2", demo.workdir / "Backup2.full.raw"
    spec_path = demo.workdir / "backup_push_full.xml"
    spec = BackupSpec(
        mode="push",
        disks=(
            DiskBackupSpec(name="vda", target=str(b1), format="qcow2", shallow=True),
            DiskBackupSpec(name="vdb", target=str(b2), format="raw"),
        ),
    )
    show_file(spec_path, backup_to_xml(spec))
    refs = await demo.references("full")
    top_layer = allocated_clusters(demo.machine.disks[0].path)
    say(f"$ qmpbackup backup-begin {spec_path.name}")
    begun = await demo.vm.backup_begin(spec, None, demo.show_step)
    say(f"Backup id {begun.record.id} created")
    say(f"backup used description from '{spec_path.name}'")
    await demo.paint_all({"vda": "--CCCC--", "vdb": "--ZZZZ--"}, "right after backup-begin")
    await demo.end_backup(begun.record.id)
    now = await demo.references("after-full")

    for backup in (demo.machine.disks[0].path, b1, demo.machine.disks[1].path, b2):
        say(f"  {chain_text(backup)}")
    check(images_equal(b2, refs["vdb"], "raw"), f"{b2.name} equals vdb at the instant")
    say(f"       vdb then: {picture(refs['vdb'])}, vdb now: {picture(now['vdb'])}")
    check(not images_equal(b2, now["vdb"], "raw"), "the guest's later writes are not in it")
    backing = image_info(b1)[0].get("full-backing-filename")
    base1 = demo.machine.disks[0].backing
    check(backing == str(base1), f"{b1.name} is shallow: its backing file is {backing}")
    copied = allocated_clusters(b1)
    layer = f"holds only clusters of Active1.qcow2's top layer ({size_text(copied)})"
    check(copied <= top_layer, f"{b1.name} {layer}")
    check(images_equal(b1, refs["vda"]), f"Base1.img ← {b1.name} equals vda at the instant")
    say(f"       vda then: {picture(refs['vda'])}, vda now: {picture(now['vda'])}")
    check(not images_equal(b1, now["vda"]), "the guest's later writes are not in it")


async def checkpoint_size(demo: Demo) -> None:
    """Part IV: how much disk is the guest dirtying? checkpoint c1, dumpxml --size, delete."""
    header("Part IV: how much disk is the guest dirtying?")
    say("$ qmpbackup checkpoint-create-as c1")
    await demo.vm.checkpoint_create(CheckpointSpec(name="c1"), demo.show_step)
    demo.track("c1")
    say("Domain checkpoint c1 created")
    await demo.write("vda", "c", 32 * MiB, 128 * 1024)
    say("guest writes 128 KiB on vda at 32 MiB")
    say("$ qmpbackup checkpoint-dumpxml c1 --size")
    xml = await demo.vm.checkpoint_xml("c1", size=True)
    say(xml.rstrip("\n"))
    sizes = {
        disk.get("name"): disk.get("size") for disk in ElementTree.fromstring(xml).iter("disk")
    }
    for disk in DISKS:
        expected = len(demo.dirty["c1"][disk]) * CLUSTER
        check(sizes.get(disk) == str(expected), f"{disk} size='{expected}'")
    say("$ qemu-img measure --size 131072 -O qcow2")
    say(qemu_img("measure", "--size", "131072", "-O", "qcow2").rstrip("\n"))
    say("$ qmpbackup checkpoint-delete c1")
    names = await demo.vm.checkpoint_delete("c1", on_step=demo.show_step)
    del demo.dirty["c1"]
    for name in names:
        say(f"Domain checkpoint {name} deleted")
    graph = await demo.vm.graph()
    left = [d for d in DISKS for layer in graph.chain_nodes(d) if layer.bitmap("c1")]
    check(not left and not demo.vm.checkpoints(), "no bitmap c1 and no checkpoint left")


async def push_chain(demo: Demo) -> None:
    """Part IV, push flavour: full + check1, two incrementals, one differential."""
    header("Part IV: incremental and differential backups, push mode")
    folder = demo.workdir / "chain"
    folder.mkdir()
    for chain_round in ROUNDS:
        await backup_round(demo, folder, chain_round)
    check_chains(demo, folder)


async def backup_round(demo: Demo, folder: Path, backup: Round) -> None:
    """One backup of the chain: begin, guest writes, end, then rebase and compare."""
    say()
    say(f"-- Backup{{1,2}}.{backup.number}.qcow2: {backup.title} --")
    targets = {disk: folder / f"Backup{NUMBER[disk]}.{backup.number}.qcow2" for disk in DISKS}
    spec_path = folder / f"backup_push_{backup.number}.xml"
    disks = tuple(DiskBackupSpec(name=d, target=str(t), format="qcow2") for d, t in targets.items())
    spec = BackupSpec(mode="push", incremental=backup.incremental, disks=disks)
    show_file(spec_path, backup_to_xml(spec))
    refs, expected, begun = await begin_round(demo, folder, backup, spec_path, spec)
    await demo.paint_all(backup.during, "right after backup-begin")
    await demo.end_backup(begun.record.id)
    for disk, target in targets.items():
        verify(target, refs[disk], disk, backup, expected.get(disk))
