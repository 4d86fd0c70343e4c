"""A live migration started while a one-shot backup runs (shared storage, a second
QEMU waiting with ``-incoming``).

QEMU accepts the ``migrate``, stops the VM for the migration's last phase, fails
there and resumes the VM here; the backup job goes on.  The backup says so and
completes, holding the instant (not a write made after it).  QEMU 7.2 sometimes
crashes after that failure (SIGSEGV, a QEMU bug): the backup then ends "QEMU went
away", names the migration, and the repository is as it was.  Either way, once this
QEMU runs again ``recover`` with either host's state directory leaves nothing behind
and the next ``--level auto`` backup is the right one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img, qemu_io
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore

from .support import Cli, allocated_clusters, clusters_of
from .test_pull_backup import pull_xml, uris
from .test_vm_moves import IncomingVM

MiB = 1 << 20
SIZE = 256 * MiB


async def _backup_job(vm: ThrowawayVM) -> str | None:
    jobs = await vm.session.execute("query-jobs")
    return next((j["id"] for j in jobs if j["type"] == "backup"), None)


async def _migrate_and_fail(source: ThrowawayVM, target: IncomingVM) -> str:
    """Start a migration of ``source`` into ``target``; the status it ends in."""
    uri = f"unix:{target.workdir / 'migrate.sock'}"
    await target.session.execute("migrate-incoming", {"uri": uri})
    await source.session.execute("migrate", {"uri": uri})
    for _ in range(600):
        status: str = (await source.session.execute("query-migrate")).get("status", "")
        if status in ("completed", "failed", "cancelled"):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError("the migration never ended")


async def _migrate_during_backup(
    source: ThrowawayVM, target: IncomingVM, argv: list[str], mode: str
) -> tuple[int, str, str]:
    """Run the backup of ``argv``; once begun, write into the guest (after the
    instant) and migrate.  Its exit status and output, and the migration's end."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    lines = []
    while not lines or "started" not in lines[-1]:
        line = (await proc.stdout.readline()).decode()
        assert line, "".join(lines)
        lines.append(line)
    job = await _backup_job(source)
    assert job is not None, "the backup job ended before the migration"
    if mode == "push":
        # Held running at 16 MiB/s, so the migration's last phase meets the job.
        await source.session.execute("block-job-set-speed", {"device": job, "speed": 16 * MiB})
    await source.guest_io("vda", "write -P 0x77 1M 64k")
    status = "QEMU went away"
    try:
        status = await _migrate_and_fail(source, target)
        if mode == "push" and await _backup_job(source) is not None:
            await source.session.execute("block-job-set-speed", {"device": job, "speed": 0})
    except Exception:  # QEMU 7.2 may crash right after the failure
        assert source.process is not None
        try:
            await asyncio.to_thread(source.process.wait, 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("QEMU stopped answering but still runs") from None
    rest = (await proc.stdout.read()).decode()
    return await proc.wait(), "".join(lines) + rest, status


async def _two_qemus(tmp_path: Path) -> tuple[ThrowawayVM, IncomingVM]:
    """A running QEMU on a 256 MiB disk full of 0x5a, and one waiting for it."""
    image = tmp_path / "vda.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(SIZE))
    qemu_io(str(image), f"write -P 0x5a 0 {SIZE}", fmt="qcow2")
    disks = [DiskImage("vda", image)]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    source = ThrowawayVM(tmp_path / "a", disks, name="migvm")
    target = IncomingVM(tmp_path / "b", disks, name="migvm")
    await source.start()
    await target.start()
    return source, target


async def _stop(source: ThrowawayVM, target: IncomingVM) -> None:
    for vm in (source, target):
        await vm.stop()
    # The destination QEMU exits when the migration fails, its socket left behind.
    (target.workdir / "migrate.sock").unlink(missing_ok=True)


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_a_migration_during_a_backup_is_said_and_leaves_nothing(
    tmp_path: Path, mode: str
) -> None:
    repo = Repository(tmp_path / "repo", "migvm")
    source, target = await _two_qemus(tmp_path)
    try:
        host_a = Cli(source, tmp_path / "state-a")
        argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(source.qmp_path)]
        argv += ["--state-dir", str(host_a.state_dir), "backup", "--repo", str(repo.root)]
        argv += ["--mode", mode]
        rc, out, status = await _migrate_during_backup(source, target, argv, mode)
        assert "Traceback" not in out, out
        said = "a live migration was started during the backup and failed"
        assert said in out, out
        if rc == 0:
            assert status == "failed"
            (backup,) = repo.backups()
            restored = tmp_path / "restored.qcow2"
            restore(repo, "vda", restored, backup.id)
            # The instant, not the write made after it.
            qemu_io(str(restored), f"read -P 0x5a 0 {SIZE}", fmt="qcow2")
        else:
            # QEMU 7.2 crashed after the failed migration; nothing of this backup stays.
            assert rc == 1 and "QEMU went away" in out, out
            assert source.process is not None and source.process.poll() is not None
            assert repo.backups() == []
            await source.stop()
            await source.start()
        assert source.process is not None and source.process.poll() is None

        host_b = Cli(source, tmp_path / "state-b")
        await host_a.ok("recover")
        for host in (host_a, host_b):
            dry = await host.ok("recover", "--dry-run", "--repo", str(repo.root))
            assert dry.out.strip() == "Nothing to recover", dry.out
        assert await source.session.execute("query-jobs") == []
        assert await source.session.execute("query-block-exports") == []
        owners = [line for line in (await host_a.ok("info")).out.splitlines() if "bitmap " in line]
        assert all("; checkpoint " in line for line in owners), owners

        await source.write("vda", 0x66, 8 * MiB, 64 << 10)
        ref = await source.reference("vda", tmp_path / "ref.raw")
        run = await host_a.ok("backup", "--repo", str(repo.root), "--level", "auto")
        latest = repo.backups()[-1]
        if rc == 0:
            assert "vda: incremental" in run.out, run.out
            written = clusters_of(1 * MiB, 64 << 10) | clusters_of(8 * MiB, 64 << 10)
            assert allocated_clusters(repo.image_path(latest, "vda")) == written
        else:
            assert "vda: full" in run.out, run.out
        restored = tmp_path / "latest.qcow2"
        restore(repo, "vda", restored, latest.id)
        assert images_equal(ref, restored, "raw")
        assert "verified" in (await host_a.ok("verify", "--repo", str(repo.root))).out
    finally:
        await _stop(source, target)


async def test_backup_end_says_a_migration_was_tried(tmp_path: Path) -> None:
    """The libvirt-style flow: ``backup-begin`` in pull mode, a migration while its
    view is served, then ``backup-end`` says what became of it; the view held the
    instant throughout."""
    source, target = await _two_qemus(tmp_path)
    try:
        cli = Cli(source, tmp_path / "state-a")
        begun = await cli.ok("backup-begin", str(pull_xml(tmp_path / "p.xml")))
        (uri,) = uris(begun.out).values()
        await source.guest_io("vda", "write -P 0x77 1M 64k")
        assert await _migrate_and_fail(source, target) == "failed"
        view = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", f"read -P 0x5a 0 {SIZE}", uri],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert view.returncode == 0 and "failed" not in view.stdout, view.stdout
        ended = await cli.finish()
        said = "a live migration was started during the backup and failed"
        assert "completed" in ended.out and said in ended.out, ended.out
        # The next backup, with no migration, says nothing of one.
        await cli.ok("backup-begin", str(pull_xml(tmp_path / "p2.xml")))
        ended = await cli.finish()
        assert "migration" not in ended.out, ended.out
        assert (await cli.ok("recover", "--dry-run")).out.strip() == "Nothing to recover"
    finally:
        await _stop(source, target)
