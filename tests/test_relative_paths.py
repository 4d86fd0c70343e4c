"""Relative target, scratch and socket paths: resolved against the CLI's current directory
before anything is planned, so that the plan, the "exists" check and QEMU (whose own
directory differs) all see the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import ThrowawayVM

from .support import Cli


async def test_relative_paths_are_the_cli_directorys(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "taken.qcow2").write_bytes(b"keep me")
    taken = tmp_path / "taken.xml"
    taken.write_text(
        "<domainbackup><disks><disk name='vda' type='file'><target file='taken.qcow2'/>"
        "</disk></disks></domainbackup>"
    )
    refused = await cli("backup-begin", str(taken))
    assert refused.rc == 2
    assert refused.err.startswith(f"error: target {elsewhere}/taken.qcow2 exists;")
    assert (elsewhere / "taken.qcow2").read_bytes() == b"keep me"

    push = tmp_path / "push.xml"
    push.write_text(
        "<domainbackup><disks><disk name='vda' type='file'><target file='sub/vda.qcow2'/>"
        "</disk></disks></domainbackup>"
    )
    (elsewhere / "sub").mkdir()
    plan = json.loads((await cli.ok("plan", str(push))).out)
    files = [
        c["arguments"]["options"].get("filename")
        for c in plan
        if "options" in c.get("arguments", {})
    ]
    assert f"{elsewhere}/sub/vda.qcow2" in files
    await cli.ok("backup-begin", str(push))
    await cli.finish(1)
    assert (elsewhere / "sub" / "vda.qcow2").stat().st_size > 0

    pull = tmp_path / "pull.xml"
    pull.write_text(
        "<domainbackup mode='pull'><server transport='unix' socket='nbd.sock'/><disks>"
        "<disk name='vdb' type='file'><scratch file='vdb.scratch'/></disk>"
        "</disks></domainbackup>"
    )
    plan = json.loads((await cli.ok("plan", str(pull))).out)
    text = json.dumps(plan)
    assert f'"path": "{elsewhere}/nbd.sock"' in text
    assert f'"filename": "{elsewhere}/vdb.scratch"' in text
    begun = await cli.ok("backup-begin", str(pull))
    assert f"vdb nbd+unix:///vdb?socket={elsewhere}/nbd.sock" in begun.out
    assert (elsewhere / "vdb.scratch").exists()
    await cli.ok("backup-end", "1")
    assert not (elsewhere / "vdb.scratch").exists()
