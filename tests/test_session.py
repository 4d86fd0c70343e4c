"""QMPSession over real sockets: connection failures, QEMU's errors, events, redaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.errors import ConnectionFailedError, DisconnectedError, QMPCommandError
from qmpbackup.logconfig import configure_logging
from qmpbackup.qmp.session import QMPSession, parse_address

SECRET = "s3cr3t-Pa55w0rd-never-logged"


@contextlib.asynccontextmanager
async def fake_server(path: Path, payload: bytes, close: bool) -> AsyncIterator[None]:
    """A unix server at ``path`` that writes ``payload`` to each client, then closes or idles."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(payload)
        await writer.drain()
        if close:
            writer.close()
            return
        with contextlib.suppress(ConnectionError):
            await reader.read()  # idle until the client goes away

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)


async def connect_error(address: str | tuple[str, int], timeout: float = 3.0) -> str:
    """Connect to ``address``, expect ConnectionFailedError quickly, return its message."""
    session = QMPSession(address)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionFailedError) as info:
        await asyncio.wait_for(session.connect(timeout=timeout), timeout + 2)
    assert loop.time() - started < timeout + 1
    assert not session.connected
    return str(info.value)


@pytest.fixture
async def qmp(vm: ThrowawayVM) -> AsyncIterator[QMPSession]:
    """A session on the VM's main QMP socket."""
    session = QMPSession(str(vm.qmp_path))
    await session.connect()
    try:
        yield session
    finally:
        await session.disconnect()


# -- addresses ------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("/run/vm/qmp.sock") == "/run/vm/qmp.sock"
    assert parse_address("localhost:4444") == ("localhost", 4444)
    assert parse_address("[::1]:4444") == ("::1", 4444)
    assert parse_address(":4444") == ("localhost", 4444)
    assert parse_address("qmp.sock") == "qmp.sock"


# -- connection failures ------------------------------------------------------------


async def test_missing_socket_path(tmp_path: Path) -> None:
    message = await connect_error(str(tmp_path / "nothing-here.sock"))
    assert "does not exist" in message
    assert str(tmp_path / "nothing-here.sock") in message


async def test_stale_socket_file_is_refused(tmp_path: Path) -> None:
    """A socket file left by a dead QEMU: it exists, but nobody listens."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert path.exists()
    message = await connect_error(str(path))
    path.unlink()
    assert "refused" in message
    assert "\n" not in message


async def test_tcp_port_with_no_listener_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free now, and nobody listens once closed
    message = await connect_error(("127.0.0.1", port))
    assert "refused" in message
    assert f"127.0.0.1:{port}" in message


@pytest.mark.parametrize(
    ("payload", "close"),
    [
        (b"HELLO\n", True),
        (b"HELLO\n", False),
        (b"{not json at all\n", False),
        (b'{"hello": "world"}\n', False),
        (b'{"QMP": {"version": 7}}\n', False),
    ],
    ids=["text-then-close", "text", "garbage-json", "json-not-greeting", "bad-greeting"],
)
async def test_peer_that_is_not_qmp(tmp_path: Path, payload: bytes, close: bool) -> None:
    path = tmp_path / "other.sock"
    async with fake_server(path, payload, close):
        message = await connect_error(str(path))
    assert "not a QMP server" in message


async def test_peer_that_closes_at_once(tmp_path: Path) -> None:
    path = tmp_path / "closes.sock"
    async with fake_server(path, b"", close=True):
        message = await connect_error(str(path))
    assert "not a QMP server" in message


async def test_silent_peer_times_out(tmp_path: Path) -> None:
    """A peer that accepts and says nothing: refused after the timeout, not hung."""
    path = tmp_path / "silent.sock"
    async with fake_server(path, b"", close=False):
        message = await connect_error(str(path), timeout=0.5)
    assert "did not answer as a QMP server" in message


async def test_busy_monitor_says_so(vm: ThrowawayVM) -> None:
    """QEMU's monitor with a client already: the second gets no greeting, and is told why."""
    first = QMPSession(str(vm.qmp_path))
    await first.connect()
    try:
        message = await connect_error(str(vm.qmp_path), timeout=0.5)
    finally:
        await first.disconnect()
    assert message == (
        f"{vm.qmp_path} did not answer as a QMP server within 0.5 s "
        "(is another client connected? QEMU's monitor serves one at a time)"
    )


async def test_not_qmp_message_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.sock"
    async with fake_server(path, b"HELLO\n", close=True):
        message = await connect_error(str(path))
    assert "\n" not in message


async def test_disconnect_after_failed_connect_is_safe(tmp_path: Path) -> None:
    session = QMPSession(str(tmp_path / "missing.sock"))
    with pytest.raises(ConnectionFailedError):
        await session.connect()
    await session.disconnect()


# -- against QEMU -------------------------------------------------------------------


async def test_disconnect_twice_is_safe(vm: ThrowawayVM) -> None:
    session = QMPSession(str(vm.qmp_path))
    await session.connect()
    await session.disconnect()
    await session.disconnect()


async def test_command_and_reply(qmp: QMPSession) -> None:
    assert qmp.connected
    status = await qmp.execute("query-status")
    assert status["running"] is True
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    assert "vda-fmt" in {n["node-name"] for n in nodes}


async def test_command_error_is_qmp_command_error(qmp: QMPSession) -> None:
    with pytest.raises(QMPCommandError) as info:
        await qmp.execute("block-dirty-bitmap-add", {"node": "no-such-node", "name": "check1"})
    error = info.value
    assert error.command == "block-dirty-bitmap-add"
    assert error.error_class == "GenericError"
    assert "no-such-node" in error.desc
    assert error.desc.startswith("Cannot find device=")
    assert str(error) == f"block-dirty-bitmap-add failed: GenericError: {error.desc}"
    assert qmp.connected  # an error reply does not end the session
    await qmp.execute("query-status")


async def test_unknown_command_is_command_not_found(qmp: QMPSession) -> None:
    with pytest.raises(QMPCommandError) as info:
        await qmp.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"


async def test_qemu_killed_then_command(vm: ThrowawayVM, qmp: QMPSession) -> None:
    assert vm.process is not None
    vm.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(vm.process.wait)
    with pytest.raises(DisconnectedError, match="QEMU went away during query-status"):
        await asyncio.wait_for(qmp.execute("query-status"), 5)
    assert not qmp.connected
    with pytest.raises(DisconnectedError):
        await asyncio.wait_for(qmp.execute("query-version"), 5)


async def test_job_events_through_watch(qmp: QMPSession, tmp_path: Path) -> None:
    """A blockdev-create job's JOB_STATUS_CHANGE events reach a watcher, in order."""
    target = tmp_path / "created.img"
    job = "qmpbackup-test-create"
    statuses: list[str] = []

    async def until(events: asyncio.Queue[Mapping[str, Any]], status: str) -> None:
        while not statuses or statuses[-1] != status:
            event = await asyncio.wait_for(events.get(), 10)
            assert event["event"] == "JOB_STATUS_CHANGE"
            assert "timestamp" in event
            if event["data"]["id"] == job:
                statuses.append(event["data"]["status"])

    async with qmp.watch({"JOB_STATUS_CHANGE"}) as events:
        await qmp.execute(
            "blockdev-create",
            {"job-id": job, "options": {"driver": "file", "filename": str(target), "size": 0}},
        )
        await until(events, "concluded")  # blockdev-create jobs wait to be dismissed
        await qmp.execute("job-dismiss", {"id": job})
        await until(events, "null")
    assert statuses[0] == "created"
    assert statuses[-2:] == ["concluded", "null"]
    assert "running" in statuses
    assert target.exists()
    assert await qmp.execute("query-jobs") == []


async def test_watch_only_queues_inside_its_block(qmp: QMPSession, tmp_path: Path) -> None:
    """Events after a watch block ended, or with other names, are not queued."""
    async with qmp.watch({"JOB_STATUS_CHANGE"}) as events:
        pass
    async with (
        qmp.watch({"BLOCK_JOB_COMPLETED"}) as other,
        qmp.watch({"JOB_STATUS_CHANGE"}) as later,
    ):
        options = {"driver": "file", "filename": str(tmp_path / "x.img"), "size": 0}
        await qmp.execute("blockdev-create", {"job-id": "qmpbackup-late", "options": options})
        while (await asyncio.wait_for(later.get(), 10))["data"]["status"] != "concluded":
            pass
        await qmp.execute("job-dismiss", {"id": "qmpbackup-late"})
    assert events.empty()
    assert other.empty()


# -- secrets ------------------------------------------------------------------


async def test_secret_object_is_redacted_in_debug_log(
    qmp: QMPSession, debug_logs: list[MutableMapping[str, Any]]
) -> None:
    await qmp.execute("object-add", {"qom-type": "secret", "id": "sec0", "data": SECRET})
    await qmp.execute("object-del", {"id": "sec0"})
    commands = [e for e in debug_logs if e["event"] == "qmp.command"]
    add = next(e for e in commands if e["execute"] == "object-add")
    assert add["arguments"] == {"qom-type": "secret", "id": "sec0", "data": "<redacted>"}
    assert add["log_level"] == "debug"
    assert SECRET not in repr(list(debug_logs))


async def test_secret_is_redacted_in_rendered_output(
    qmp: QMPSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the CLI's own logging (-v, both formats), the secret never reaches stderr."""
    saved = structlog.get_config()
    qemu_level = logging.getLogger("qemu.qmp").level
    try:
        for fmt in ("json", "console"):
            configure_logging(fmt, verbose=True)
            await qmp.execute("object-add", {"qom-type": "secret", "id": "sec1", "data": SECRET})
            await qmp.execute("object-del", {"id": "sec1"})
    finally:
        structlog.configure(**saved)
        logging.getLogger("qemu.qmp").setLevel(qemu_level)
    err = capsys.readouterr().err
    assert "object-add" in err
    assert SECRET not in err


async def test_secret_not_in_stdlib_debug_log(
    qmp: QMPSession, caplog: pytest.LogCaptureFixture
) -> None:
    # As an API user who never called configure_logging and turned on debug logging.
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.NOTSET, logger="qemu.qmp")
    await qmp.execute("object-add", {"qom-type": "secret", "id": "sec2", "data": SECRET})
    await qmp.execute("object-del", {"id": "sec2"})
    assert SECRET not in caplog.text
