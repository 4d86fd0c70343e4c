"""A push job that fails in QEMU: its error text reaches the user, and everything is cleaned."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import ThrowawayVM

from .conftest import block_state
from .support import Cli
from .test_push_backup import push_xml

MiB = 1024 * 1024


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a backup target there runs out of space."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_enospc_failure_is_reported_and_cleaned(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, tiny_fs: Path
) -> None:
    await vm.write("vdb", 0x66, 0, 8 * MiB)
    target = tiny_fs / "vdb.raw"
    spec = push_xml(tmp_path / "s.xml", {"vdb": (target, "raw", False)})
    spec.write_text(spec.read_text().replace("</disks>", "<disk name='vda' backup='no'/></disks>"))
    await cli.ok("backup-begin", str(spec), "check1")

    # jobinfo shows the failure with QEMU's own words once the job concluded.
    for _ in range(200):
        info = json.loads((await cli.ok("jobinfo", "--json")).out)
        if info["status"] != "running":
            break
    assert info["status"] == "failed"
    assert "No space left on device" in info["disks"][0]["error"]

    ended = await cli("backup-end", "1")
    assert ended.rc == 1
    assert ended.err.strip() == (
        "error: Backup id 1 failed: vdb: No space left on device; checkpoint check1 removed; "
        f"partial target {target} deleted"
    )
    assert os.listdir(tiny_fs) == []
    state = await block_state(vm)
    assert "qmpbackup-" not in str(state) and "check1" not in str(state)
    assert state["jobs"] == []
    assert (await cli.ok("checkpoint-list", "--name")).out == ""
    # The backup record is gone: the next backup gets id 1 again and works.
    good = push_xml(tmp_path / "g.xml", {"vdb": (tmp_path / "ok.raw", "raw", False)})
    good.write_text(good.read_text().replace("</disks>", "<disk name='vda' backup='no'/></disks>"))
    assert "Backup id 1 created" in (await cli.ok("backup-begin", str(good))).out
    assert "Backup id 1 completed" in (await cli.finish(1)).out
