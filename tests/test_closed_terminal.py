"""A closed terminal harms nothing: the one-shot ``backup`` piped into ``head`` (stdout
closed), with stderr closed, or sent SIGHUP at points along its run never prints a
traceback; a run that loses its reader finishes, a run that gets SIGHUP is aborted
like one that gets SIGTERM, and afterwards no checkpoint promises data no backup
holds, the repository verifies and the next ``--level auto`` is right."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img, qemu_io
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore

from .support import Cli

MiB = 1 << 20


async def _slow_vm(tmp_path: Path) -> tuple[ThrowawayVM, Repository]:
    """A VM with a small disk and a 512 MiB one full of data (a copy that takes a while)."""
    work = tmp_path / "vm"
    work.mkdir()
    big, small = work / "big.qcow2", work / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "512M")
    qemu_io(str(big), "write -P 0x5a 0 512M", fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", str(small), "16M")
    vm = ThrowawayVM(work, [DiskImage("vda", small), DiskImage("vdb", big)], name="slowvm")
    return vm, Repository(tmp_path / "repo", "slowvm")


def _argv(vm: ThrowawayVM, cli: Cli, repo: Repository, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qmpbackup", "--qmp", str(vm.qmp_path),
            "--state-dir", str(cli.state_dir), "backup", "--repo", str(repo.root),
            *extra]  # fmt: skip


async def _consistent(vm: ThrowawayVM, cli: Cli, repo: Repository, tmp_path: Path) -> None:
    """No checkpoint without a complete backup holding it; the repository verifies; the
    next auto run restores to its instant."""
    names = set((await cli.ok("checkpoint-list", "--name")).out.split())
    held = {f"backup-{r.id}" for r in repo.backups()}
    assert names <= held, (names, held)
    await cli.ok("verify", "--repo", str(repo.root))
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("qmpbackup-")]
    assert await vm.session.execute("query-jobs") == []
    await vm.write("vda", 0x77, MiB, 64 << 10)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    level = "incremental" if any(r.disk("vda") for r in repo.backups()) else "full"
    run = await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda", "--level", "auto")
    assert f"vda: {level}" in run.out, run.out
    out = tmp_path / "restored.qcow2"
    out.unlink(missing_ok=True)
    restore(repo, "vda", out, repo.backups()[-1].id)
    assert images_equal(ref, out, "raw")


async def test_backup_piped_into_head_finishes(tmp_path: Path) -> None:
    vm, repo = await _slow_vm(tmp_path)
    async with vm:
        cli = Cli(vm, tmp_path / "state")
        await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda")
        argv = _argv(vm, cli, repo, "--mode", "pull", "--level", "full")
        errors = tmp_path / "stderr.txt"
        shell = f"{shlex.join(argv)} 2>{errors} | head -1; exit ${{PIPESTATUS[0]}}"
        proc = await asyncio.create_subprocess_exec("bash", "-c", shell, stdout=subprocess.PIPE)
        first, _ = await proc.communicate()
        err = errors.read_text()
        assert proc.returncode == 0, err
        assert len(first.splitlines()) == 1
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        # What it could not print went to the log, its result among it.
        assert "output" in err and "Backup" in err, err
        assert len(repo.backups()) == 2 and {d.name for d in repo.backups()[-1].disks} == {
            "vda",
            "vdb",
        }
        await _consistent(vm, cli, repo, tmp_path)


async def test_backup_with_stdout_and_stderr_closed_finishes(tmp_path: Path) -> None:
    vm, repo = await _slow_vm(tmp_path)
    async with vm:
        cli = Cli(vm, tmp_path / "state")
        script = (
            "import os, subprocess, sys\n"
            "out_r, out_w = os.pipe(); err_r, err_w = os.pipe()\n"
            "os.close(out_r); os.close(err_r)\n"  # both readers gone before a line is written
            "sys.exit(subprocess.call(sys.argv[1:], stdout=out_w, stderr=err_w))\n"
        )
        argv = [sys.executable, "-c", script, *_argv(vm, cli, repo, "--mode", "push")]
        proc = await asyncio.create_subprocess_exec(*argv)
        assert await proc.wait() == 0
        assert [{d.name for d in r.disks} for r in repo.backups()] == [{"vda", "vdb"}]
        await _consistent(vm, cli, repo, tmp_path)


_RNG = random.Random(19)
POINTS = sorted(_RNG.uniform(0.0, 1.0) for _ in range(3))


@pytest.mark.parametrize("delay", [-1.0, *POINTS], ids=lambda d: f"after-{d:.2f}s")
async def test_sighup_aborts_cleanly(tmp_path: Path, delay: float) -> None:
    """SIGHUP before the backup began (-1: at once), or ``delay`` seconds after it said
    it started: exit 1 (or 0 if the run was already complete), one line, no traceback."""
    vm, repo = await _slow_vm(tmp_path)
    async with vm:
        cli = Cli(vm, tmp_path / "state")
        await cli.ok("backup", "--repo", str(repo.root), "--disk", "vda")
        before = repo.backups()
        proc = await asyncio.create_subprocess_exec(
            *_argv(vm, cli, repo, "--mode", "pull", "--level", "auto"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        if delay >= 0:
            while b"started" not in await proc.stdout.readline():
                pass
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):  # it may have completed already
            proc.send_signal(signal.SIGHUP)
        out, err = await proc.communicate()
        text = (out + err).decode()
        assert "Traceback" not in text, text
        if proc.returncode == 0:
            assert len(repo.backups()) == len(before) + 1, text
        elif proc.returncode == -signal.SIGHUP:
            # Before Python reached qmpbackup's main: nothing had begun.
            assert delay < 0 and not text and repo.backups() == before, text
        else:
            assert proc.returncode == 1, text
            assert "error: interrupted (SIGHUP)" in text, text
            assert repo.backups() == before
        await _consistent(vm, cli, repo, tmp_path)
