"""The demo's pull sections: Part III's full pull backup and Part IV's pull chain.

The full backup is read by ``qemu-img`` and by the built-in NBD client, the
chain with dirty-bitmap block status.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from ..request import BackupSpec, DiskBackupSpec, backup_to_xml
from ..state.directory import scratch_folder
from .chain import ROUNDS, Round, begin_round, check_chains, verify
from .show import MiB, check, header, image_info, picture, say, show_file
from .stage import DISKS, NUMBER, Demo
from .throwaway import images_equal, qemu_img

# The pull chain is the same walk; the guest writes the lowercase letters so that
# each write changes what the disk reads (the push chain left the uppercase ones).
PULL_ROUNDS = tuple(
    replace(r, during={disk: drawing.lower() for disk, drawing in r.during.items()}) for r in ROUNDS
)


async def pull_full(demo: Demo) -> None:
    """Part III: backup_pull_full.xml; vda read by qemu-img, vdb by the built-in client."""
    header("Part III: full backup, pull mode")
    scratch = demo.workdir / "scratch.qcow2"
    size = image_info(demo.machine.disks[1].path)[0]["virtual-size"]
    say(f"$ qemu-img create -f qcow2 {scratch.name} {size // MiB}M")
    qemu_img("create", "-q", "-f", "qcow2", str(scratch), str(size))
    say("(no -b Active2.qcow2 as on the slides: qmpbackup opens the scratch over vdb itself)")
    spec_path = demo.workdir / "backup_pull_full.xml"
    spec = BackupSpec(
        mode="pull",
        server=demo.server,
        disks=(DiskBackupSpec(name="vda"), DiskBackupSpec(name="vdb", scratch=str(scratch))),
    )
    show_file(spec_path, backup_to_xml(spec))
    refs = await demo.references("pull-full")
    say(f"$ qmpbackup backup-begin {spec_path.name}")
    begun = await demo.vm.backup_begin(spec, None, demo.show_step)
    say(f"Backup id {begun.record.id} created")
    say(f"backup used description from '{spec_path.name}'")
    uris = demo.show_uris(begun.record)
    await demo.paint_all({"vda": "--cccc--", "vdb": "--zzzz--"}, "right after backup-begin")
    b1, b2 = demo.workdir / "Backup1.full.raw", demo.workdir / "Backup2.qcow2"
    say(f"$ qemu-img convert -f raw {uris['vda']} -O raw {b1.name}")
    await asyncio.to_thread(qemu_img, "convert", "-f", "raw", uris["vda"], "-O", "raw", str(b1))
    await demo.copy(uris["vdb"], b2)
    now = await demo.references("after-pull-full")
    for disk, backup in (("vda", b1), ("vdb", b2)):
        then = picture(refs[disk])
        check(images_equal(backup, refs[disk]), f"{backup.name} equals {disk} at the instant")
        say(f"       {disk} then: {then}, {disk} now: {picture(now[disk])}")
        check(not images_equal(backup, now[disk]), "the guest's later writes are not in it")
    await demo.end_pull(begun.record.id)
    check(scratch.exists(), f"{scratch.name} is still there: qmpbackup did not create it")
    made = sorted(p.name for p in scratch_folder(demo.vm.state_dir).iterdir())
    left = f": {', '.join(made)} left" if made else ""
    check(not made, f"the scratch qmpbackup created for vda is gone{left}")
    say(f"$ rm {scratch.name}")
    scratch.unlink()


async def pull_chain(demo: Demo) -> None:
    """Part IV, pull flavour: the same chain, read over NBD with dirty-bitmap block status."""
    header("Part IV: incremental and differential backups, pull mode")
    say("The push chain's checkpoints go first, so the pull chain can use the slides' names:")
    say("$ qmpbackup checkpoint-delete check1 --children")
    names = await demo.vm.checkpoint_delete("check1", children=True, on_step=demo.show_step)
    for name in names:
        demo.dirty.pop(name, None)
        say(f"Domain checkpoint {name} deleted")
    graph = await demo.vm.graph()
    left = [d for d in DISKS for layer in graph.chain_nodes(d) for b in layer.bitmaps]
    check(not left and not demo.vm.checkpoints(), "no checkpoint and no bitmap left")
    folder = demo.workdir / "pull-chain"
    folder.mkdir()
    for chain_round in PULL_ROUNDS:
        await pull_round(demo, folder, chain_round)
    check_chains(demo, folder)


async def pull_round(demo: Demo, folder: Path, backup: Round) -> None:
    """One pull backup of the chain: begin, guest writes, read over NBD, end, compare."""
    say()
    say(f"-- Backup{{1,2}}.{backup.number}.qcow2: {backup.title} --")
    spec_path = folder / f"backup_pull_{backup.number}.xml"
    spec = BackupSpec(mode="pull", incremental=backup.incremental, server=demo.server)
    show_file(spec_path, backup_to_xml(spec))
    refs, expected, begun = await begin_round(demo, folder, backup, spec_path, spec)
    demo.show_uris(begun.record)
    await demo.paint_all(backup.during, "right after backup-begin")
    targets: dict[str, Path] = {}
    for job in begun.record.disks:
        assert job.uri is not None
        n = NUMBER[job.disk]
        targets[job.disk] = folder / f"Backup{n}.{backup.number}.qcow2"
        if backup.parent is None or backup.incremental is None:
            await demo.copy(job.uri, targets[job.disk])
            continue
        assert job.export_bitmap is not None
        await demo.show_dirty(
            job.uri, job.export_bitmap, job.disk, backup.incremental, expected[job.disk]
        )
        parent = folder / f"Backup{n}.{backup.parent}.qcow2"
        await demo.copy(job.uri, targets[job.disk], parent, job.export_bitmap)
    await demo.end_pull(begun.record.id)
    for disk, target in targets.items():
        verify(target, refs[disk], disk, backup, expected.get(disk), pulled=True)
