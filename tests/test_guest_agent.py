"""The guest agent client and its discovery over QMP, on real QEMU only.

With the real guest of ``scripts/build-guest`` (one VM for the module): discovery,
freeze and thaw of its two ext4 filesystems, one client at a time, stale replies.
Without a guest OS: a port nobody answers on, a VM without the port, bad paths.
Without QEMU: discovery over the replies recorded by ``scripts/record-agent-fixtures``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.errors import GuestAgentError
from qmpbackup.qga.agent import GuestAgent
from qmpbackup.qga.discover import (
    AGENT_PORT,
    agent_socket,
    find_agent_socket,
    socket_from_filename,
)

from .guest import GuestVM, ext4_guest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODULE = pytest.mark.asyncio(loop_scope="module")


# -- the real guest ---------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GuestVM]:
    """The real guest on two ext4 disks (vda qcow2, vdb raw), booted and ready."""
    machine = ext4_guest(tmp_path_factory.mktemp("qga"))
    await machine.start()
    try:
        print(f"guest ready after {await machine.wait_ready(180):.1f} s ({machine.accel})")
        yield machine
    finally:
        await machine.stop()


@pytest.mark.qemu
@pytest.mark.guest
@MODULE
async def test_discovery_finds_the_guest_agent(guest: GuestVM) -> None:
    found = await find_agent_socket(guest.session)
    assert found is not None
    assert found.path == guest.agent_path and found.problem is None
    assert found.socket_path() == guest.agent_path
    assert not found.client_connected
    async with await GuestAgent.connect(found.socket_path()):
        connected = await find_agent_socket(guest.session)
        assert connected is not None and connected.client_connected and connected.guest_open


@pytest.mark.qemu
@pytest.mark.guest
@MODULE
async def test_freeze_status_thaw(guest: GuestVM) -> None:
    started = time.monotonic()
    async with await GuestAgent.connect(guest.agent_path) as agent:
        synced = time.monotonic()
        assert await agent.status() == "thawed"
        frozen = await agent.freeze()
        froze = time.monotonic()
        assert frozen >= 2  # /data/a and /data/b
        assert await agent.status() == "frozen"
        with pytest.raises(GuestAgentError, match="frozen state") as refused:
            await agent.freeze()  # the agent refuses a second freeze, and stays frozen
        assert refused.value.error_class is not None
        assert await agent.status() == "frozen"
        thaw_started = time.monotonic()
        assert await agent.thaw() == frozen
        thawed = time.monotonic()
        assert await agent.status() == "thawed"
        assert await agent.thaw() == 0
    print(
        f"sync {synced - started:.3f} s, freeze {froze - synced:.3f} s, "
        f"thaw {thawed - thaw_started:.3f} s"
    )


@pytest.mark.qemu
@pytest.mark.guest
@MODULE
async def test_one_client_at_a_time_and_stale_replies(
    guest: GuestVM, debug_logs: list[MutableMapping[str, Any]]
) -> None:
    first = await GuestAgent.connect(guest.agent_path)
    try:
        # QEMU accepts nothing more while the first client is connected: the second
        # one's connect succeeds at the socket level and hears nothing.
        started = time.monotonic()
        with pytest.raises(GuestAgentError, match="one client at a time"):
            await GuestAgent.connect(guest.agent_path, timeout=2)
        assert time.monotonic() - started < 3
        await first.ping()
    finally:
        await first.close()
    # The second client's syncs may reach the agent once the first left; their replies
    # then wait in the channel for the next client, which skips them (as stale replies,
    # or as bytes before its own sync's delimiter: which one depends on timing).
    async with await GuestAgent.connect(guest.agent_path) as third:
        await third.ping()
    events = [e["event"] for e in debug_logs]
    last = len(events) - 1 - events[::-1].index("qga.connected")
    assert "qga.synced" in events[last:] and "qga.error" not in events[last:], events


@pytest.mark.qemu
@pytest.mark.guest
@MODULE
async def test_refusal_and_timeout_leave_the_client_usable(guest: GuestVM) -> None:
    async with await GuestAgent.connect(guest.agent_path) as agent:
        with pytest.raises(GuestAgentError, match="CommandNotFound") as refused:
            await agent.execute("guest-no-such-command")
        assert refused.value.command == "guest-no-such-command"
        # A paused guest cannot answer: deterministic, where a short timeout is not.
        await guest.session.execute("stop")
        try:
            with pytest.raises(
                GuestAgentError, match=re.escape("did not answer guest-ping within 0.5 s")
            ):
                await agent.ping(timeout=0.5)
        finally:
            await guest.session.execute("cont")
        # The late reply of that ping is skipped by the resync before the next command.
        assert await agent.status() == "thawed"


@pytest.mark.qemu
@pytest.mark.guest
@MODULE
async def test_a_freeze_without_answer_is_thawed(guest: GuestVM) -> None:
    async with await GuestAgent.connect(guest.agent_path) as agent:
        await guest.session.execute("stop")
        try:
            freeze = asyncio.create_task(agent.freeze(timeout=0.5))
            await asyncio.sleep(1.5)
            # The freeze has timed out; the thaw sent after it waits for the paused guest.
            assert not freeze.done()
        finally:
            await guest.session.execute("cont")
        # Resumed, the guest freezes late, then thaws.
        with pytest.raises(GuestAgentError, match=r"a thaw sent after it thawed [1-9]") as late:
            await freeze
        assert "did not answer guest-fsfreeze-freeze within 0.5 s" in str(late.value)
        assert await agent.status() == "thawed"


# -- QEMU without a guest OS ----------------------------------------------------------


class SilentAgentVM(ThrowawayVM):
    """QEMU without a guest OS, its agent port on a unix socket: nothing answers there."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, [], name="silent-agent")
        self.agent_path = workdir / "agent.sock"

    def command_line(self) -> list[str]:
        return [
            *super().command_line(), "-device", "virtio-serial",
            "-chardev", f"socket,path={self.agent_path},server=on,wait=off,id=qga0",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}",
        ]  # fmt: skip

    def _remove_sockets(self) -> None:
        super()._remove_sockets()
        self.agent_path.unlink(missing_ok=True)


@pytest.mark.qemu
async def test_an_absent_agent_times_out(tmp_path: Path) -> None:
    work = tmp_path / "vm"
    work.mkdir()
    vm = SilentAgentVM(work)
    await vm.start()
    try:
        found = await find_agent_socket(vm.session)
        assert found is not None and found.path == vm.agent_path
        assert not found.guest_open and not found.client_connected
        started = time.monotonic()
        with pytest.raises(GuestAgentError, match="is qemu-guest-agent running") as absent:
            await GuestAgent.connect(found.socket_path(), timeout=2)
        assert time.monotonic() - started < 2 + 1
        assert str(vm.agent_path) in str(absent.value)
    finally:
        await vm.stop()


@pytest.mark.qemu
async def test_a_vm_without_agent_port(vm: ThrowawayVM) -> None:
    assert await find_agent_socket(vm.session) is None


async def test_missing_refused_and_non_socket_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    with pytest.raises(GuestAgentError, match=re.escape(f"socket {missing} does not exist")):
        await GuestAgent.connect(missing)
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(GuestAgentError, match=re.escape(f"{plain} is not a socket")):
        await GuestAgent.connect(plain)
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))  # bound, never listening: as a socket its QEMU left behind
    try:
        with pytest.raises(
            GuestAgentError, match=re.escape(f"connection to guest agent socket {stale} refused")
        ):
            await GuestAgent.connect(stale)
    finally:
        listener.close()
        stale.unlink()


# -- recorded replies, no QEMU ----------------------------------------------------------

VERSIONS = ("qemu-7.2", "qemu-10.0")


def recorded(version: str) -> dict[str, Any]:
    """The scenarios of ``fixtures/<version>/agent-discovery.json``."""
    replies: dict[str, Any] = json.loads((FIXTURES / version / "agent-discovery.json").read_text())
    return replies


@pytest.mark.parametrize("version", VERSIONS)
def test_discovery_of_recorded_replies(version: str) -> None:
    scenarios = recorded(version)
    unix = agent_socket(scenarios["unix"])
    assert unix is not None
    assert unix.device == "/machine/peripheral-anon/device[1]" and unix.chardev == "qga0"
    assert unix.path == Path("/srv/vm/agent.sock") and unix.problem is None
    assert not unix.client_connected and not unix.guest_open
    connected = agent_socket(scenarios["unix-connected"])
    assert connected is not None and connected.device == "/machine/peripheral/qga-port"
    assert connected.path == Path("/srv/vm/agent.sock") and connected.client_connected
    tcp = agent_socket(scenarios["tcp"])
    assert tcp is not None and tcp.path is None and tcp.problem is not None
    assert "not a unix socket" in tcp.problem and "--guest-agent SOCKET" in tcp.problem
    with pytest.raises(GuestAgentError, match=re.escape("tcp:127.0.0.1:4444,server=on")):
        tcp.socket_path()
    assert agent_socket(scenarios["other-port"]) is None


@pytest.mark.parametrize(
    ("filename", "path", "problem"),
    [
        ("unix:/run/a b/qga.sock,server=on", "/run/a b/qga.sock", None),
        ("disconnected:unix:/run/qga.sock,server=on", "/run/qga.sock", None),
        ("unix:/run/qga.sock", None, "connects out"),
        ("unix:,server=on", None, "no socket file"),
        ("pty:/dev/pts/3", None, "not a unix socket"),
        ("tcp:127.0.0.1:4444,server=on <-> 127.0.0.1:50000", None, "not a unix socket"),
        ("null", None, "not a unix socket"),
    ],
)
def test_socket_from_filename(filename: str, path: str | None, problem: str | None) -> None:
    found, why = socket_from_filename(filename, "qga0")
    assert found == (Path(path) if path else None)
    assert (why is None) == (problem is None)
    if problem is not None:
        assert why is not None and problem in why and "qga0" in why


def test_a_port_without_its_chardev() -> None:
    replies = recorded("qemu-7.2")["unix"]
    broken = {
        **replies,
        "query-chardev": [c for c in replies["query-chardev"] if c["label"] != "qga0"],
    }
    found = agent_socket(broken)
    assert found is not None and found.path is None
    with pytest.raises(GuestAgentError, match="has no chardev"):
        found.socket_path()
