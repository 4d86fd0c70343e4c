"""The VM moves, the chain continues: two QEMU processes on the same images (shared
storage), a live migration between them (with and without the ``dirty-bitmaps``
capability), each side with its own state directory as on its own host. The side
that never saw the VM adopts the checkpoints its disks' bitmaps prove, takes an
incremental holding only what changed, and after the way back the first side does
the same; ``recover`` on either leaves nothing behind."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img, qemu_io
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore

from .support import Cli, allocated_clusters, clusters_of
from .test_push_backup import push_xml

MiB = 1 << 20


class IncomingVM(ThrowawayVM):
    """A QEMU waiting for a migration (``-incoming defer``) on the same disks."""

    def command_line(self) -> list[str]:
        return [*super().command_line(), "-incoming", "defer"]


async def _migrate(source: ThrowawayVM, target: IncomingVM, bitmaps: bool) -> None:
    """Live-migrate ``source`` into ``target`` over a unix socket; ``source`` is quit."""
    uri = f"unix:{target.workdir / 'migrate.sock'}"
    caps = {"capabilities": [{"capability": "dirty-bitmaps", "state": bitmaps}]}
    for side in (source, target):
        await side.session.execute("migrate-set-capabilities", caps)
    await target.session.execute("migrate-incoming", {"uri": uri})
    await source.session.execute("migrate", {"uri": uri})
    for _ in range(600):
        status = (await source.session.execute("query-migrate")).get("status")
        if status == "completed":
            break
        assert status not in ("failed", "cancelled"), status
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("migration did not complete")
    for _ in range(200):
        if (await target.session.execute("query-status"))["status"] == "running":
            break
        await asyncio.sleep(0.05)
    assert (await target.session.execute("query-status"))["status"] == "running"
    await source.stop()


async def _incremental_holds_only(
    vm: ThrowawayVM, cli: Cli, repo: Repository, tmp_path: Path, pattern: int, offset: int
) -> str:
    """Write 64 KiB at ``offset``, back up with --level auto: it must be an incremental
    of exactly that cluster, restoring to the instant; the run's output."""
    await vm.write("vda", pattern, offset, 64 << 10)
    ref = await vm.reference("vda", tmp_path / f"ref-{pattern:x}.raw")
    run = await cli.ok("backup", "--repo", str(repo.root), "--level", "auto")
    assert "vda: incremental" in run.out, run.out
    latest = repo.backups()[-1]
    assert allocated_clusters(repo.image_path(latest, "vda")) == clusters_of(offset, 64 << 10)
    out = tmp_path / f"restored-{pattern:x}.qcow2"
    restore(repo, "vda", out, latest.id)
    assert images_equal(ref, out, "raw")
    return run.out


@pytest.mark.parametrize("bitmaps", [True, False], ids=["dirty-bitmaps", "no-capability"])
async def test_incrementals_continue_across_live_migration(tmp_path: Path, bitmaps: bool) -> None:
    image = tmp_path / "vda.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    disks = [DiskImage("vda", image)]
    repo = Repository(tmp_path / "repo", "movevm")
    folders = [tmp_path / n for n in ("a1", "b", "a2")]
    for folder in folders:
        folder.mkdir()
    source = ThrowawayVM(folders[0], disks, name="movevm")
    await source.start()
    target = IncomingVM(folders[1], disks, name="movevm")
    back = IncomingVM(folders[2], disks, name="movevm")
    try:
        host_a = Cli(source, tmp_path / "state-a")
        await source.write("vda", 0x11, 0, "4M")
        await host_a.ok("backup", "--repo", str(repo.root), "--level", "full")
        await _incremental_holds_only(source, host_a, repo, tmp_path, 0x12, 8 * MiB)

        # A libvirt-style checkpoint too, dumped on A to be redefined on B.
        await host_a.ok("checkpoint-create-as", "manual")
        dumped = tmp_path / "manual.xml"
        dumped.write_text((await host_a.ok("checkpoint-dumpxml", "manual")).out)

        await target.start()
        await _migrate(source, target, bitmaps)
        host_b = Cli(target, tmp_path / "state-b")
        assert (await host_b.ok("checkpoint-list", "--name")).out.split() == []
        out = await _incremental_holds_only(target, host_b, repo, tmp_path, 0x21, 16 * MiB)
        assert "adopted" in out, out
        redefined = await host_b.ok("checkpoint-create", str(dumped), "--redefine")
        assert "Domain checkpoint manual redefined" in redefined.out, redefined.out
        again = await host_b("checkpoint-create", str(dumped), "--redefine")
        assert again.rc == 2 and "already defined" in again.err, again.err
        # The redefined checkpoint's bitmap saw that one write.
        sized = (await host_b.ok("checkpoint-dumpxml", "manual", "--size")).out
        assert "size='65536'" in sized, sized
        info = (await host_b.ok("info")).out
        assert "adopted" in info and "checkpoint manual (redefined)" in info, info
        assert (await host_b.ok("recover", "--dry-run")).out.strip() == "Nothing to recover"

        await back.start()
        await _migrate(target, back, bitmaps)
        host_a = Cli(back, tmp_path / "state-a")
        out = await _incremental_holds_only(back, host_a, repo, tmp_path, 0x31, 24 * MiB)
        assert "adopted" in out, out
        assert (await host_a.ok("recover", "--dry-run")).out.strip() == "Nothing to recover"
        assert "verified" in (await host_a.ok("verify", "--repo", str(repo.root))).out
        # No bitmap is left that no checkpoint here owns: each one B adopted or made was
        # released or taken over once no backup needed it.
        owners = [line for line in (await host_a.ok("info")).out.splitlines() if "bitmap " in line]
        assert owners and all("; checkpoint " in line for line in owners), owners
    finally:
        for vm in (source, target, back):
            await vm.stop()


# Persistent, recording bitmaps another tool made: abbbi/qmpbackup's
# ``qmpbackup-<uuid>`` (one uuid starting with digits, as a temporary's backup id
# would), and one spelled exactly like a temporary of ours, but persistent.
FOREIGN = (
    "qmpbackup-35dc4fbb-7d8e-4c1b-9a2f-0b1c2d3e4f50",
    "qmpbackup-12345678-9abc-4def-8123-456789abcdef",
    "qmpbackup-5-vda",
)


async def test_another_tools_bitmaps_are_never_touched(vm: ThrowawayVM, cli: Cli,
                                                       tmp_path: Path) -> None:  # fmt: skip
    node = "vda-fmt"
    for name in FOREIGN:
        await vm.session.execute(
            "block-dirty-bitmap-add", {"node": node, "name": name, "persistent": True}
        )
    root = str(tmp_path / "repo")
    await cli.ok("backup", "--repo", root, "--disk", "vda", "--level", "full")
    await vm.write("vda", 0x42, 2 * MiB, 64 << 10)
    await cli.ok("backup", "--repo", root, "--disk", "vda", "--level", "auto", "--mode", "pull")
    # The libvirt-style flow too: a checkpoint, a push backup from it, ended.
    await cli.ok("checkpoint-create-as", "c1")
    await vm.write("vda", 0x43, 3 * MiB, 64 << 10)
    spec = push_xml(tmp_path / "push.xml", {"vda": (tmp_path / "b1.qcow2", "qcow2", False)}, "c1")
    begun = re.search(r"Backup id (\d+) created", (await cli.ok("backup-begin", str(spec))).out)
    assert begun is not None
    assert "completed" in (await cli.finish(int(begun[1]))).out
    assert (await cli.ok("recover", "--dry-run")).out.strip() == "Nothing to recover"
    await cli.ok("recover")
    info = (await cli.ok("info")).out
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    found = {b["name"]: b for n in nodes if n["node-name"] == node for b in n["dirty-bitmaps"]}
    for name in FOREIGN:
        assert found[name]["recording"] and found[name]["persistent"], found[name]
        assert found[name]["count"] >= 64 << 10  # it recorded the write: untouched
        assert (
            f"bitmap {name}:" in info
            and "foreign" in info.split(f"bitmap {name}:")[1].split("\n")[0]
        )


async def _slow_vm(folder: Path, name: str) -> ThrowawayVM:
    """A started QEMU named ``name`` with a 256 MiB disk full of data."""
    folder.mkdir()
    image = folder / "vda.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "256M")
    qemu_io(str(image), "write -P 0x5a 0 256M", fmt="qcow2")
    machine = ThrowawayVM(folder, [DiskImage("vda", image)], name=name)
    await machine.start()
    return machine


async def _backup(machine: ThrowawayVM, state: Path, root: Path) -> tuple[int, str]:
    argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(machine.qmp_path),
            "--state-dir", str(state), "backup", "--repo", str(root), "--mode", "pull"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_one_repository_many_hosts(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    vms = [await _slow_vm(tmp_path / n, n) for n in ("vm1", "vm2")]
    twins = [await _slow_vm(tmp_path / n, "twin") for n in ("twin-a", "twin-b")]
    try:
        # Two VMs, two hosts (state directories), one repository, at once: both run.
        results = await asyncio.gather(
            *(_backup(m, tmp_path / f"state-{m.name}", root) for m in vms)
        )
        assert [rc for rc, _ in results] == [0, 0], results
        for machine in vms:
            repo = Repository(root, machine.name)
            assert len(repo.backups()) == 1
            cli = Cli(machine, tmp_path / f"state-{machine.name}")
            assert (
                "verified"
                in (await cli.ok("verify", "--repo", str(root), "--vm", machine.name)).out
            )
        # One VM (its name in the repository) from two hosts at once: exactly one runs,
        # the other is refused naming the first.
        results = await asyncio.gather(
            *(_backup(m, tmp_path / f"state-{m.workdir.name}", root) for m in twins)
        )
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 1], results
        refused = next(text for rc, text in results if rc == 1)
        assert "another qmpbackup run is using the repository" in refused, refused
        assert f"host {socket.gethostname()}, pid " in refused and "since " in refused, refused
        assert "Traceback" not in refused
        assert len(Repository(root, "twin").backups()) == 1
    finally:
        for machine in (*vms, *twins):
            await machine.stop()


async def test_orphan_one_shot_bitmaps_are_found_and_removed_only_with_proof(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    root = str(tmp_path / "repo")
    await cli.ok("backup", "--repo", root, "--disk", "vda", "--level", "full")
    await vm.write("vda", 0x42, 2 * MiB, 64 << 10)
    await cli.ok("backup", "--repo", root, "--disk", "vda", "--level", "auto")
    last = Repository(root, "testvm").backups()[-1].checkpoint
    # A one-shot checkpoint's bitmap whose backup the repository no longer holds (its
    # host's state is gone), and another tool's.
    orphan = "backup-20200101T000000Z-1"
    for name in (orphan, FOREIGN[0]):
        await vm.session.execute(
            "block-dirty-bitmap-add", {"node": "vda-fmt", "name": name, "persistent": True}
        )
    fresh = Cli(vm, tmp_path / "state-fresh")  # a host that never saw the VM
    listing = (await fresh.ok("checkpoint-list")).out
    assert f"({last}: a one-shot checkpoint's bitmap on vda" in listing, listing
    assert (await fresh.ok("checkpoint-list", "--name")).out.split() == []
    listed = (await fresh.ok("recover", "--dry-run")).out
    assert f"bitmap {orphan} on vda" in listed and f"bitmap {last} on vda" in listed, listed
    assert "pass --repo" in listed and FOREIGN[0] not in listed
    proven = (await fresh.ok("recover", "--dry-run", "--repo", root)).out
    assert f"orphan bitmap {orphan} on vda" in proven and last not in proven, proven
    info = (await fresh.ok("info")).out
    assert f"bitmap {orphan}:" in info and "recover --repo tells an orphan" in info
    removed = (await fresh.ok("recover", "--repo", root)).out
    assert f"orphan bitmap {orphan} removed" in removed, removed
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    names = {b["name"] for n in nodes if n["node-name"] == "vda-fmt" for b in n["dirty-bitmaps"]}
    assert orphan not in names and last in names and FOREIGN[0] in names, names
    # The repository's own checkpoint is adopted by the next backup from that host.
    await vm.write("vda", 0x43, 3 * MiB, 64 << 10)
    run = await fresh.ok("backup", "--repo", root, "--disk", "vda", "--level", "auto")
    assert "vda: incremental" in run.out and "adopted" in run.out, run.out


async def test_a_moved_repository_continues(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """The repository's folder moved (or mounted elsewhere): stock qemu-img opens its
    chains there, it verifies and restores, and the chain continues into it."""
    first = tmp_path / "mnt-a" / "repo"
    await vm.write("vda", 0x51, 0, "2M")
    await cli.ok("backup", "--repo", str(first), "--disk", "vda", "--level", "full")
    await vm.write("vda", 0x52, 4 * MiB, 64 << 10)
    await cli.ok("backup", "--repo", str(first), "--disk", "vda", "--level", "auto")
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    moved = tmp_path / "mnt-b" / "elsewhere"
    moved.parent.mkdir()
    first.rename(moved)
    repo = Repository(moved, "testvm")
    latest = repo.image_path(repo.backups()[-1], "vda")
    chain = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", str(latest)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert chain.count("image: ") == 2 and str(first) not in chain, chain
    assert "verified" in (await cli.ok("verify", "--repo", str(moved))).out
    out = tmp_path / "restored.qcow2"
    restore(repo, "vda", out)
    assert images_equal(ref, out, "raw")
    await vm.write("vda", 0x53, 6 * MiB, 64 << 10)
    run = await cli.ok("backup", "--repo", str(moved), "--disk", "vda", "--level", "auto")
    assert "vda: incremental" in run.out, run.out
    assert allocated_clusters(repo.image_path(repo.backups()[-1], "vda")) == clusters_of(
        6 * MiB, 64 << 10
    )
