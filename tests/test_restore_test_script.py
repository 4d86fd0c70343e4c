"""examples/restore-test, the weekly restore test the README's timer runs: the real
guest's disk, backed up (plain chain and encrypted), boots from an instant restore
and mounts its filesystem; the repository is untouched and nothing is left behind,
on success and on failure."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from qmpbackup.repo.repository import Repository

from .guest import cpu_for, ext4_guest
from .support import Cli, repo_hashes

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "restore-test"
MOUNTED = "mounted /dev/vda at /data/a"


def restore_test(
    work: Path, repo: Path, *args: str, boot: list[str]
) -> subprocess.CompletedProcess[str]:
    # This checkout's qmpbackup, whatever an installed one is.
    wrapper = work / "qmpbackup"
    if not wrapper.exists():
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m qmpbackup "$@"\n')
        wrapper.chmod(0o755)
    root = str(SCRIPT.parent.parent)
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TMPDIR=str(work), QMPBACKUP=str(wrapper), PYTHONPATH=pythonpath)
    return subprocess.run(
        [str(SCRIPT), "--repo", str(repo), "--disk", "vda", *args, "--", *boot],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def left_behind(work: Path, repo: Path) -> list[str]:
    """Overlays, QEMUs and markers a run of the script left."""
    found = [str(p) for p in work.glob("qmpbackup-restore-test.*")]
    found += [str(p) for p in repo.rglob(".instant/*.json")]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"{work}/qmpbackup-restore-test." in cmdline.read_bytes().decode(errors="replace"):
                found.append(f"process {cmdline.parent.name}")
        except OSError:
            continue
    return found


@pytest.mark.qemu
@pytest.mark.guest
async def test_the_restore_test_boots_each_backup_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "vm"
    work.mkdir()
    machine = ext4_guest(work, append="qmpbackup.interval=0.2")
    plain, encrypted = tmp_path / "repo", tmp_path / "repo-enc"
    key = tmp_path / "key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    await machine.start()
    try:
        await machine.wait_ready(180)
        cli = Cli(machine, tmp_path / "state")
        for level in ("full", "inc"):
            await cli.ok("backup", "--repo", str(plain), "--level", level, "--quiesce")
        await cli.ok("backup", "--repo", str(encrypted), "--level", "full", "--quiesce",
                     "--encrypt-key", str(key))  # fmt: skip
    finally:
        await machine.stop()
    artifacts = machine.artifacts
    boot = [
        "-cpu", cpu_for(machine.accel), "-kernel", str(artifacts.kernel),
        "-initrd", str(artifacts.initrd),
        "-append", "console=ttyS0 quiet panic=-1 qmpbackup.workload=none",
    ]  # fmt: skip
    accel = ["--accel", machine.accel, "--memory", "256", "--timeout", "180"]
    before = {r: repo_hashes(Repository.open(r)) for r in (plain, encrypted)}

    newest = Repository.open(plain).backups()[-1].id
    ok = restore_test(tmp_path, plain, *accel, "--expect", MOUNTED, boot=boot)
    assert ok.returncode == 0, ok.stderr
    assert f"restore test passed: backup {newest} of vda booted" in ok.stdout
    assert left_behind(tmp_path, plain) == []

    first = Repository.open(plain).backups()[0].id
    ok = restore_test(tmp_path, plain, *accel, "--backup", first, "--expect", MOUNTED, boot=boot)
    assert ok.returncode == 0, ok.stderr
    assert f"backup {first} of vda booted" in ok.stdout

    ok = restore_test(tmp_path, encrypted, *accel, "--encrypt-key", str(key),
                      "--expect", MOUNTED, boot=boot)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert key.read_text() not in ok.stdout + ok.stderr
    assert left_behind(tmp_path, encrypted) == []

    failed = restore_test(tmp_path, plain, *accel[:-2], "--timeout", "5",
                          "--expect", "NEVER-PRINTED", boot=boot)  # fmt: skip
    assert failed.returncode == 1
    assert "restore test FAILED" in failed.stderr and "NEVER-PRINTED" in failed.stderr
    assert left_behind(tmp_path, plain) == []

    refused = restore_test(tmp_path, plain, "--timeout", "soon", boot=[])
    assert refused.returncode == 2 and "restore-test --repo DIR" in refused.stderr

    for repo in (plain, encrypted):
        assert repo_hashes(Repository.open(repo)) == before[repo]
