"""Quiesced and crash-consistent backups of a real Linux guest that keeps writing files.

The guest (scripts/build-guest) writes files of known content on ext4 ``vda`` and
``vdb``, fsyncing each before listing it in ``MANIFEST``.  A backup taken with
``--quiesce`` restores to filesystems that are clean without a journal replay; one
taken without is crash-consistent (clean after the replay).  In both, every file the
manifest lists is there with its exact content.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .guest import (
    GUEST_REPORT,
    GuestVM,
    check_files,
    e2fsck_clean,
    ext4_guest,
)
from .guest_agent import GuestAgent
from .qmp_cutter import QmpCutter
from .support import Cli, CliResult
from .test_faults import spawn

pytestmark = [pytest.mark.qemu, pytest.mark.guest]


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[GuestVM]:
    """The guest on two ext4 disks (vda qcow2, vdb raw), its workload running. vdb is
    raw: it cannot keep a persistent bitmap, and is backed up all the same."""
    work = tmp_path / "vm"
    work.mkdir()
    machine = ext4_guest(work, append="qmpbackup.interval=0.02")
    await machine.start()
    try:
        await machine.wait_ready(180)
        await asyncio.sleep(1.0)  # the workload lists its first files
        yield machine
    finally:
        await machine.stop()


def restore_raw(repo: Path, backup_id: str, disk: str, out: Path) -> None:
    """``qmpbackup restore`` of one disk to a raw image (a repository command: no QEMU)."""
    proc = subprocess.run(
        [sys.executable, "-m", "qmpbackup", "restore", "--repo", str(repo), "--disk", disk,
         "--backup", backup_id, "--out", str(out), "--format", "raw"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def restored_checks(repo: Path, backup_id: str, tmp_path: Path, quiesced: bool) -> dict[str, int]:
    """Restore each disk of ``backup_id`` to raw, check its filesystem and its files; the
    number of files each manifest lists (every one present with its content)."""
    counts = {}
    for disk in ("vda", "vdb"):
        out = tmp_path / f"{backup_id}-{disk}.raw"
        restore_raw(repo, backup_id, disk, out)
        # Frozen, ext4 flushed its journal: clean as it is.  Not frozen: the journal
        # holds what the instant had in flight, and the filesystem is clean once replayed.
        as_is = e2fsck_clean(out)
        if quiesced:
            assert as_is.clean and not as_is.needs_recovery, as_is.output
        else:
            assert as_is.needs_recovery, "a live ext4 is caught with its journal in use"
            replayed = e2fsck_clean(out, replay=True)
            assert replayed.clean, replayed.output
        check = check_files(out, replay=not quiesced)
        assert check.listed > 0 and check.correct == check.listed, check
        counts[disk] = check.listed
    kind = "quiesced" if quiesced else "crash-consistent, journal replayed"
    GUEST_REPORT.append(f"backup {backup_id} ({kind}): files listed and exact {counts}")
    return counts


def events(result: CliResult) -> list[dict[str, Any]]:
    """The JSON log lines of a ``-v --log-format json`` run."""
    return [json.loads(line) for line in result.err.splitlines() if line.startswith("{")]


def frozen_window(logged: list[dict[str, Any]]) -> list[str]:
    """The QMP commands sent between the agent's freeze and its thaw."""
    inside, sent = False, list[str]()
    for entry in logged:
        what = entry.get("execute")
        if entry.get("event") == "qga.command" and what == "guest-fsfreeze-freeze":
            inside = True
        elif entry.get("event") == "qga.command" and what == "guest-fsfreeze-thaw":
            return sent
        elif inside and entry.get("event") == "qmp.command":
            sent.append(str(what))
    raise AssertionError("no freeze and thaw in the log")


async def test_quiesced_pull_backups_restore_clean_without_replay(
    guest: GuestVM, tmp_path: Path
) -> None:
    cli, repo = Cli(guest, tmp_path / "state"), tmp_path / "repo"
    assert f"Guest agent:   {guest.agent_path}\n" in (await cli.ok("info")).out
    spec = tmp_path / "before.xml"
    spec.write_text(  # vdb is raw: a checkpoint of its own must leave it out, as libvirt's
        "<domaincheckpoint><name>before</name><disks><disk name='vda'/>"
        "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>"
    )
    made = await cli.ok("checkpoint-create", str(spec), "--quiesce")
    assert re.search(r"^guest frozen for \d+ ms$", made.out, re.M), made.out
    await cli.ok("checkpoint-delete", "before")
    totals, levels = [], []
    for level in ("full", "auto", "auto"):
        ran = await cli.ok("backup", "--repo", str(repo), "--level", level, "--mode", "pull",
                           "--quiesce", "--no-progress", verbose=True)  # fmt: skip
        # JSON lines: the backup's events on stdout, the log (every QMP and agent
        # command) on stderr.
        told = {e["event"]: e for e in map(json.loads, ran.out.splitlines())}
        assert 0 < told["backup.quiesced"]["seconds"] < 30, told
        assert frozen_window(events(ran)) == ["transaction"]
        backup_id = told["backup.committed"]["backup"]
        levels.append(told["backup.level"]["level"])
        totals.append(await asyncio.to_thread(restored_checks, repo, backup_id, tmp_path, True))
        await asyncio.sleep(0.5)
    assert levels == ["full", "inc", "inc"]
    assert all(a["vda"] <= b["vda"] for a, b in itertools.pairwise(totals))
    with GuestAgent(guest.agent_path) as agent:
        assert agent.fsfreeze_status() == "thawed"


async def test_crash_consistent_push_backups_are_clean_after_replay(
    guest: GuestVM, tmp_path: Path
) -> None:
    cli, repo = Cli(guest, tmp_path / "state"), tmp_path / "repo"
    for level in ("full", "auto"):
        ran = await cli.ok("backup", "--repo", str(repo), "--level", level, "--mode", "push",
                           "--no-progress")  # fmt: skip
        assert "guest frozen" not in ran.out
        if level == "full":
            pushed = await cli.ok("backup", "--repo", str(repo), "--mode", "push", "--quiesce",
                                  "--no-progress")  # fmt: skip
            assert re.search(r"^guest frozen for \d+ ms$", pushed.out, re.M), pushed.out
        backup_id = re.findall(r"^Backup (\S+) completed$", ran.out, re.M)[-1]
        await asyncio.to_thread(restored_checks, repo, backup_id, tmp_path, False)
        await asyncio.sleep(0.5)


async def test_quiesce_without_an_agent_is_refused(tmp_path: Path) -> None:
    from qmpbackup.demo.throwaway import ThrowawayVM, make_slides_images

    machine = ThrowawayVM(tmp_path / "vm", make_slides_images(tmp_path / "vm"), name="noagent")
    await machine.start()
    try:
        cli = Cli(machine, tmp_path / "state")
        assert "Guest agent:   none" in (await cli.ok("info")).out
        before = await machine.session.execute("query-named-block-nodes", {"flat": True})
        ran = await cli("backup", "--repo", str(tmp_path / "repo"), "--quiesce")
        assert ran.rc == 1 and ran.err.count("\n") == 1, ran.err
        assert ran.err.startswith("error: --quiesce needs qemu-guest-agent"), ran.err
        after = await machine.session.execute("query-named-block-nodes", {"flat": True})
        assert [n["node-name"] for n in after] == [n["node-name"] for n in before]
        assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*.qcow2"))
    finally:
        await machine.stop()


async def frozen_then(guest: GuestVM, cli: Cli, tmp_path: Path, sig: signal.Signals) -> int:
    """Start a quiesced one-shot whose transaction never reaches QEMU, send ``sig`` once
    the guest is frozen; the run's exit status."""
    proxy = tmp_path / "hold.sock"
    async with QmpCutter(proxy, guest.qmp_path, lambda m: m.get("execute") == "transaction",
                         "hold") as cutter:  # fmt: skip
        proc = await spawn(Cli(guest, cli.state_dir, qmp=proxy),
                           "backup", "--repo", str(tmp_path / "repo"), "--quiesce",
                           "--no-progress")  # fmt: skip
        await asyncio.wait_for(cutter.cut_seen.wait(), 120)
        proc.send_signal(sig)
        return await asyncio.wait_for(proc.wait(), 60)


async def manifest_length(guest: GuestVM) -> int:
    """Files listed on vda now, as the guest sees them (read through the agent)."""
    with GuestAgent(guest.agent_path) as agent:
        started = agent.execute(
            "guest-exec",
            {"path": "/bin/sh", "arg": ["-c", "wc -l < /data/a/MANIFEST"], "capture-output": True},
        )
        for _ in range(100):
            status = agent.execute("guest-exec-status", {"pid": started["pid"]})
            if status.get("exited"):
                return int(base64.b64decode(status.get("out-data", "")).decode().strip())
            await asyncio.sleep(0.1)
    raise AssertionError("guest-exec did not finish")


async def test_killed_while_frozen_recover_thaws(guest: GuestVM, tmp_path: Path) -> None:
    """SIGKILL between freeze and thaw leaves the guest frozen (nothing can thaw it);
    ``recover`` finds the freeze in the journal and thaws it; the workload resumes."""
    cli = Cli(guest, tmp_path / "state")
    assert await frozen_then(guest, cli, tmp_path, signal.SIGKILL) == -signal.SIGKILL
    with GuestAgent(guest.agent_path) as agent:
        assert agent.fsfreeze_status() == "frozen"
    recovered = await cli.ok("recover")
    assert "guest left frozen by an interrupted run: thaw it through" in recovered.out
    with GuestAgent(guest.agent_path) as agent:
        assert agent.fsfreeze_status() == "thawed"
    listed = await manifest_length(guest)
    await asyncio.sleep(1.0)
    assert await manifest_length(guest) > listed, "the workload resumes once thawed"
    assert (await cli.ok("recover")).out.strip() == "Nothing to recover"


async def test_sigterm_while_frozen_thaws_before_exit(guest: GuestVM, tmp_path: Path) -> None:
    cli = Cli(guest, tmp_path / "state")
    assert await frozen_then(guest, cli, tmp_path, signal.SIGTERM) == 1
    with GuestAgent(guest.agent_path) as agent:
        assert agent.fsfreeze_status() == "thawed"
    await cli.ok("recover")
    with GuestAgent(guest.agent_path) as agent:
        assert agent.fsfreeze_status() == "thawed"


async def test_failed_transaction_thaws(guest: GuestVM, tmp_path: Path) -> None:
    """QMP drops at the transaction (the run cannot know whether QEMU ran it): the run
    fails with one line, and the guest is thawed all the same."""
    cli = Cli(guest, tmp_path / "state")
    proxy = tmp_path / "cut.sock"
    async with QmpCutter(proxy, guest.qmp_path, lambda m: m.get("execute") == "transaction",
                         "before"):  # fmt: skip
        ran = await Cli(guest, cli.state_dir, qmp=proxy)(
            "backup", "--repo", str(tmp_path / "repo"), "--quiesce", "--no-progress"
        )
    assert ran.rc == 1 and "lost the connection to QEMU during transaction" in ran.err, ran.err
    with GuestAgent(guest.agent_path) as agent:
        assert agent.fsfreeze_status() == "thawed"


async def test_plan_explains_the_quiesced_step(tmp_path: Path) -> None:
    """``plan --quiesce`` needs no agent (nothing is sent): it shows the freeze around the
    transaction, and only there."""
    from qmpbackup.demo.throwaway import ThrowawayVM, make_slides_images

    machine = ThrowawayVM(tmp_path / "vm", make_slides_images(tmp_path / "vm"), name="plan")
    await machine.start()
    try:
        spec = tmp_path / "b.xml"
        spec.write_text(
            "<domainbackup><disks><disk name='vda' type='file'>"
            f"<target file='{tmp_path}/t.qcow2'/><driver type='qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        lines = (await Cli(machine, tmp_path / "state")
                 .ok("plan", str(spec), "--quiesce", "--explain")).out.splitlines()  # fmt: skip
        marked = [i for i, line in enumerate(lines) if line.strip().startswith("quiesced:")]
        assert len(marked) == 1 and " transaction -- " in lines[marked[0] - 1], lines
    finally:
        await machine.stop()
