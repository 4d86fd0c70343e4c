"""``qmpbackup demo`` end to end, push and pull: every check passes, nothing is left."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def qemu_processes_using(path: Path) -> list[int]:
    """Pids of QEMU processes whose command line mentions ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"qemu-system" in argv[0] and any(str(path).encode() in arg for arg in argv):
            found.append(int(proc.name))
    return found


def test_demo_walks_the_slides(tmp_path: Path) -> None:
    """The demo exits 0, prints the slides' messages and QMP, and cleans up."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README's setup")
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "qmpbackup", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
    assert "Backup id 1 created" in out
    assert "Backup id 1 completed" in out
    assert "size='131072'" in out
    assert any(
        line.startswith("  -> ") and '"execute": "transaction"' in line for line in out.splitlines()
    )
    # Part III and Part IV in pull mode: NBD URIs, dirty extents, the pulled chain.
    pull = out.partition("== Part III: full backup, pull mode ==")[2]
    assert "vda nbd+unix:///vda?socket=" in pull
    assert "Backup1.full.raw equals vda at the instant" in pull
    assert "Backup2.qcow2 equals vdb at the instant" in pull
    assert "scratch.qcow2 is still there" in pull
    assert "NBD_CMD_BLOCK_STATUS on qemu:dirty-bitmap:backup-vda" in pull
    assert "  ---!!!!-   (! = dirty MiB)" in pull
    assert "ok: Backup1.1.qcow2 ← Backup1.4.qcow2" in pull
    assert "ok: Backup2.1.qcow2 ← Backup2.2.qcow2 ← Backup2.3.qcow2" in pull
    assert "FAILED" not in out
    assert "all checks passed" in out
    assert not qemu_processes_using(workdir)
    assert not workdir.exists()


def test_demo_keep_leaves_the_files(tmp_path: Path) -> None:
    """With --keep the work directory stays, with the chain; QEMU still stops."""
    workdir = tmp_path / "kept"
    proc = subprocess.run(
        [sys.executable, "-m", "qmpbackup", "demo", "--workdir", str(workdir), "--keep"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert f"work directory kept: {workdir}" in proc.stdout
    assert (workdir / "chain" / "Backup1.4.qcow2").is_file()
    assert (workdir / "Backup2.full.raw").is_file()
    assert (workdir / "pull-chain" / "Backup1.4.qcow2").is_file()
    assert (workdir / "Backup1.full.raw").is_file()
    assert not (workdir / "scratch.qcow2").exists()
    assert not qemu_processes_using(workdir)


def test_demo_refuses_a_non_empty_workdir(tmp_path: Path) -> None:
    """A work directory with files in it is refused (exit 2) and left as it was."""
    (tmp_path / "precious").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "qmpbackup", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: work directory")
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]
