"""``restore --instant`` and ``blockpull`` on real QEMU: a new QEMU boots the overlay of a
backup's chain, the guest reads and writes it, the pull makes it standalone; the
repository's files never change, prune waits for the pull; a killed pull or QEMU loses
nothing and the pull starts again. Plain (push and pull backups), compressed and
encrypted chains."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, qemu_io
from qmpbackup.repo.repository import Repository

from .support import Cli, qemu_img_info, repo_hashes

MiB = 1 << 20
PASSPHRASE = b"correct horse battery staple, instant"


class OverlayVM(ThrowawayVM):
    """A new QEMU started with the options ``restore --instant`` printed."""

    def __init__(self, workdir: Path, overlay: Path, options: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, [DiskImage(name="vda", path=overlay)], name="restored")
        self.options = options

    def command_line(self) -> list[str]:
        disks, self.disks = self.disks, []
        try:
            argv = super().command_line()
        finally:
            self.disks = disks
        for line in self.options:
            argv += line.split(" ", 1)
        return argv


def printed_options(output: str) -> list[str]:
    """The QEMU options ``restore --instant`` printed, one per line."""
    return [
        line.strip()
        for line in output.splitlines()
        if line.strip().startswith(("-blockdev", "-device", "-object"))
    ]


def same(a: Path, b: Path) -> bool:
    """``qemu-img compare -U``: equal guest content, also while a QEMU has ``a`` open."""
    proc = subprocess.run(["qemu-img", "compare", "-U", "-q", str(a), str(b)], check=False)
    assert proc.returncode in (0, 1), f"qemu-img compare {a} {b} failed"
    return proc.returncode == 0


async def _backups(vm: ThrowawayVM, cli: Cli, root: str, *extra: str) -> list[str]:
    """Full push, incremental pull, incremental push of vda, each after guest writes."""
    runs = [("full", "push", 0x41), ("inc", "pull", 0x42), ("inc", "push", 0x43)]
    for level, mode, pattern in runs:
        await vm.write("vda", pattern, f"{pattern - 0x40}M", "512K")
        await cli.ok("backup", "--repo", root, "--disk", "vda", "--level", level,
                     "--mode", mode, *extra)  # fmt: skip
    return [r.id for r in Repository(root, "testvm").backups()]


async def _expected(cli: Cli, root: str, backup: str, out: Path, *extra: str) -> Path:
    """A full restore of ``backup`` plus the writes the restored guest makes."""
    await cli.ok("restore", "--repo", root, "--disk", "vda", "--backup", backup,
                 "--out", str(out), *extra)  # fmt: skip
    for command in _GUEST_WRITES:
        qemu_io(str(out), command, fmt="qcow2")
    return out


_GUEST_WRITES = ["write -P 0x77 1M 256K", "write -P 0x78 40M 1M"]


async def _restored_vm(tmp_path: Path, restore_out: str, overlay: Path) -> OverlayVM:
    machine = OverlayVM(tmp_path / "restored", overlay, printed_options(restore_out))
    await machine.start()
    return machine


async def test_instant_restore_then_blockpull(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    root = str(tmp_path / "repo")
    ids = await _backups(vm, cli, root)
    repo = Repository(root, "testvm")
    before = repo_hashes(repo)
    overlay = tmp_path / "instant.qcow2"
    started = time.monotonic()
    made = await cli.ok(
        "restore", "--repo", root, "--disk", "vda", "--instant", "--out", str(overlay)
    )
    assert time.monotonic() - started < 5  # a whole CLI process; the restore itself is ms
    assert "blockpull vda --wait" in made.out
    assert qemu_img_info(overlay)["backing-filename"] == str(
        repo.image_path(repo.get(ids[-1]), "vda")
    )
    refused = await cli(
        "restore", "--repo", root, "--disk", "vda", "--instant", "--out", str(overlay)
    )
    assert refused.rc == 2 and "exists" in refused.err
    expected = await _expected(cli, root, ids[-1], tmp_path / "expected.qcow2")

    restored = await _restored_vm(tmp_path, made.out, overlay)
    try:
        await restored.guest_io("vda", "read -P 0x43 3M 512K")  # the instant's data, at once
        await restored.guest_io("vda", "read -P 0x41 1M 512K")
        for command in _GUEST_WRITES:
            await restored.guest_io("vda", command)
        prune = await cli("prune", "--repo", root, "--keep", "1")
        assert prune.rc == 1 and str(overlay) in prune.err, prune.err
        pull = Cli(restored, tmp_path / "state-restored")
        assert "block-stream" in (await pull.ok("blockpull", "vda", "--dry-run")).out
        done = await pull.ok("blockpull", "vda", "--wait", "--no-progress")
        assert "Pull complete" in done.out and "marker" in done.out, done.out
        await restored.guest_io("vda", "flush")
        assert "backing-filename" not in qemu_img_info(overlay)
        assert same(overlay, expected)
        again = await pull.ok("blockpull", "vda", "--wait")
        assert "nothing to pull" in again.out
    finally:
        await restored.stop()
    assert same(overlay, expected)
    assert repo_hashes(repo) == before
    # The chain was made read-only: the repository's own operations do not mind.
    assert not any(p.stat().st_mode & 0o222 for p in repo.chain(ids[-1], "vda"))
    await vm.write("vda", 0x44, "5M", "64K")
    await cli.ok("backup", "--repo", root, "--disk", "vda", "--level", "inc", "--mode", "pull")
    await cli.ok("verify", "--repo", root)
    await cli.ok("prune", "--repo", root, "--keep", "1")
    await cli.ok("verify", "--repo", root)


async def _wait_progress(machine: ThrowawayVM) -> int:
    """Wait until the pull job of vda has copied something (asked on the harness's own
    monitor: a following blockpull holds the other); its progress."""
    for _ in range(400):
        jobs = await machine.session.execute("query-jobs")
        job = next((j for j in jobs if j["id"] == "qmpbackup-pull-vda"), None)
        if job is not None and job["current-progress"] > 0:
            assert job["current-progress"] < job["total-progress"], "the pull was not slow"
            return int(job["current-progress"])
        await asyncio.sleep(0.05)
    raise AssertionError("the pull made no progress")


async def test_killed_pull_and_killed_qemu_lose_nothing(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    root = str(tmp_path / "repo")
    await vm.write("vda", 0x55, "20M", "8M")  # data enough for a slow pull
    ids = await _backups(vm, cli, root)
    overlay = tmp_path / "instant.qcow2"
    made = await cli.ok(
        "restore", "--repo", root, "--disk", "vda", "--instant", "--out", str(overlay)
    )
    expected = await _expected(cli, root, ids[-1], tmp_path / "expected.qcow2")
    restored = await _restored_vm(tmp_path, made.out, overlay)
    pull = Cli(restored, tmp_path / "state-restored")
    try:
        for command in _GUEST_WRITES:
            await restored.guest_io("vda", command)
        # What a guest flushed survives a SIGKILL of QEMU (what it did not, may not).
        await restored.guest_io("vda", "flush")
        # Without --wait the job runs on; --abort stops it, the backing file stays.
        await pull.ok("blockpull", "vda", "--bandwidth", "512K")
        await _wait_progress(restored)
        assert "Block pull" in (await pull.ok("jobinfo")).out
        assert "left alone" in (await pull.ok("recover")).out
        assert "aborted" in (await pull.ok("blockpull", "vda", "--abort")).out
        assert "backing-filename" in qemu_img_info(overlay)
        # A blockpull killed while it follows the job: the job runs on in QEMU.
        argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(restored.qmp_path),
                "--state-dir", str(pull.state_dir), "blockpull", "vda", "--wait",
                "--bandwidth", "512K", "--no-progress"]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL)
        await _wait_progress(restored)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await _wait_progress(restored)
        await restored.kill()  # SIGKILL QEMU mid-stream
        assert "backing-filename" in qemu_img_info(overlay)
        assert same(overlay, expected)
        await restored.start()
        await restored.guest_io("vda", "read -P 0x78 40M 1M")
        await pull.ok("recover")
        done = await pull.ok("--log-format", "json", "blockpull", "vda", "--wait")
        events = [json.loads(x)["event"] for x in done.out.splitlines() if x.startswith("{")]
        assert events[0] == "backup.pull-begin" and events[-1] == "backup.pull-done", events
        assert "backup.progress" in events and "Pull complete" in done.out
        assert "backing-filename" not in qemu_img_info(overlay)
    finally:
        await restored.stop()
    assert same(overlay, expected)
    await cli.ok("prune", "--repo", root, "--keep", "1")


async def _at_rest(vm: ThrowawayVM, cli: Cli, tmp_path: Path, *extra: str) -> None:
    root = str(tmp_path / "repo")
    ids = await _backups(vm, cli, root, *extra)
    repo = Repository(root, "testvm")
    before = repo_hashes(repo)
    overlay = tmp_path / "instant.qcow2"
    restore_extra = [x for x in extra if x != "--compress"]
    made = await cli.ok("restore", "--repo", root, "--disk", "vda", "--instant",
                        "--out", str(overlay), *restore_extra)  # fmt: skip
    assert PASSPHRASE.decode() not in made.out
    expected = await _expected(cli, root, ids[-1], tmp_path / "expected.qcow2", *restore_extra)
    restored = await _restored_vm(tmp_path, made.out, overlay)
    try:
        await restored.guest_io("vda", "read -P 0x42 2M 512K")
        for command in _GUEST_WRITES:
            await restored.guest_io("vda", command)
        pull = Cli(restored, tmp_path / "state-restored")
        if "--compress" in extra:
            # Without --wait: a later blockpull finds the image standalone and releases
            # the marker through what the state directory kept of the pull's start.
            await pull.ok("blockpull", "vda")
            while "qmpbackup-pull-vda" in str(await restored.session.execute("query-jobs")):
                await asyncio.sleep(0.1)
            later = await pull.ok("blockpull", "vda")
            assert "nothing to pull" in later.out and "marker" in later.out, later.out
        else:
            await pull.ok("blockpull", "vda", "--wait", "--no-progress")
    finally:
        await restored.stop()
    assert "backing-filename" not in qemu_img_info(overlay)
    assert same(overlay, expected)
    assert repo_hashes(repo) == before
    assert not list((repo.base / ".instant").glob("*.json"))


async def test_encrypted_chain_restores_instantly(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key = tmp_path / "key"
    key.write_bytes(PASSPHRASE)
    await _at_rest(vm, cli, tmp_path, "--encrypt-key", str(key))


async def test_compressed_chain_restores_instantly(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    await _at_rest(vm, cli, tmp_path, "--compress")


async def test_stale_marker_is_explained_and_cleared(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    root = str(tmp_path / "repo")
    await _backups(vm, cli, root)
    overlay = tmp_path / "instant.qcow2"
    await cli.ok("restore", "--repo", root, "--disk", "vda", "--instant", "--out", str(overlay))
    overlay.unlink()
    refused = await cli("prune", "--repo", root, "--keep", "1")
    assert refused.rc == 1 and "stale" in refused.err and "--clear-stale-instant" in refused.err
    needs = await cli("prune", "--repo", root)
    assert needs.rc == 2 and "--keep N" in needs.err
    repo = Repository(root, "testvm")
    markers, backups = list((repo.base / ".instant").glob("*.json")), repo.backups()
    dry = await cli.ok("prune", "--repo", root, "--clear-stale-instant", "--dry-run")
    assert "would be cleared" in dry.out and "is gone" in dry.out
    assert list((repo.base / ".instant").glob("*.json")) == markers
    # Alone, the flag clears the stale markers and prunes nothing.
    done = await cli.ok("prune", "--repo", root, "--clear-stale-instant")
    assert "cleared" in done.out and "is gone" in done.out
    assert not list((repo.base / ".instant").glob("*.json"))
    assert repo.backups() == backups
    await cli.ok("prune", "--repo", root, "--keep", "1")
    assert len(repo.backups()) == 1
