"""A real Linux guest (scripts/build-guest) on two ext4 disks: it boots, its agent
answers and freezes both filesystems, and after a clean shutdown every file its
workload listed is on the images with its exact content."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from .guest import (
    check_files,
    e2fsck_clean,
    expected_content,
    ext4_guest,
    guest_artifacts,
    read_manifest,
)
from .guest_agent import GuestAgent


def test_shell_and_python_agree_on_file_content(tmp_path: Path) -> None:
    """scripts/guest/workload.sh, run by the guest's busybox on the host, writes what
    expected_content() says."""
    artifacts = guest_artifacts()
    shell = [str(artifacts.busybox), "sh"] if artifacts else [shutil.which("sh") or "/bin/sh"]
    script = Path(__file__).resolve().parent.parent / "scripts" / "guest" / "workload.sh"
    numbers = [1, 2, 43, 999, 123456]
    loop = "; ".join(f"write_one {tmp_path} {n}" for n in numbers)
    subprocess.run([*shell, "-c", f". {script}; {loop}"], check=True)
    names = [f"f-{n:06d}" for n in numbers]
    assert (tmp_path / "MANIFEST").read_text().split() == names
    for name in names:
        assert (tmp_path / name).read_bytes() == expected_content(name), name


@pytest.mark.qemu
@pytest.mark.guest
async def test_guest_writes_freezes_and_shuts_down_clean(tmp_path: Path) -> None:
    work = tmp_path / "vm"
    work.mkdir()
    machine = ext4_guest(work)
    vda, vdb = (disk.path for disk in machine.disks)
    await machine.start()
    try:
        ready = await machine.wait_ready(180)
        print(f"guest ready after {ready:.1f} s ({machine.accel})")
        with GuestAgent(machine.agent_path) as agent:
            agent.ping()
            await asyncio.sleep(3)
            assert agent.fsfreeze_freeze() >= 2
            assert agent.fsfreeze_status() == "frozen"
            assert agent.fsfreeze_thaw() >= 2
            assert agent.fsfreeze_status() == "thawed"
            agent.shutdown()
        assert await machine.wait_exit(60), machine.console()[-2000:]
    finally:
        await machine.stop()
    assert "unmounted /data/a" in machine.console(), machine.console()[-2000:]
    for image in (vda, vdb):
        manifest = read_manifest(image)
        check = check_files(image)
        fsck = e2fsck_clean(image)
        print(f"{image.name}: {check.listed} listed, {check.correct} correct, "
              f"{len(check.wrong)} wrong, {len(check.missing)} missing; "
              f"e2fsck clean={fsck.clean} needs_recovery={fsck.needs_recovery}")  # fmt: skip
        assert len(manifest) == check.listed > 0
        assert check.correct == check.listed, check
        assert fsck.clean and not fsck.needs_recovery, fsck.output
