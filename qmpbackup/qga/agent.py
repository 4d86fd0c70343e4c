"""An asyncio client of qemu-guest-agent over the host side of its virtio-serial port.

QEMU serves the guest's ``org.qemu.guest_agent.0`` port as a chardev; when that is a
unix socket in server mode, the agent is reached at its path.  The agent reads JSON
commands and writes one JSON reply per line, with no greeting.  A client first
synchronises with ``guest-sync-delimited``: the channel may still hold replies meant
for an earlier client, and the agent may be absent (QEMU accepts the connection and
nothing ever answers), so every wait here has a deadline.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import secrets
import stat
from types import TracebackType
from typing import Any, Literal, cast

import structlog

from ..errors import GuestAgentError
from ..logconfig import redact

log = structlog.get_logger("qmpbackup.qga")

SYNC_TIMEOUT = 3.0
COMMAND_TIMEOUT = 10.0
# The guest flushes every filesystem before it freezes it: that can take a while.
FREEZE_TIMEOUT = 60.0
THAW_TIMEOUT = 10.0

FreezeStatus = Literal["thawed", "frozen"]

# The agent writes this byte before its reply to guest-sync-delimited, and a client
# sends it before the command: the agent's parser drops any partial input on it.
_DELIMITER = b"\xff"
# A sync unanswered this long is sent again with a new id, in case the first was lost
# (an agent restarting); only the newest id counts.
_SYNC_RESEND = 1.0
_READ_SIZE = 65536
_MAX_REPLY = 64 * 1024 * 1024
_ONE_CLIENT = (
    "QEMU's chardev serves one client at a time: a second one is accepted and hears "
    "nothing until the first disconnects"
)


class _Closed(Exception):
    """The socket reached its end."""


class GuestAgent:
    """One connection to a guest agent; commands run one at a time (see :meth:`connect`)."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.path = path
        self._reader = reader
        self._writer = writer
        self._buffer = b""
        self._lock = asyncio.Lock()
        self._in_sync = False
        self._closed = False
        self._ids = itertools.count(1)

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str], timeout: float = SYNC_TIMEOUT
    ) -> GuestAgent:
        """Connect to the agent's socket at ``path`` and synchronise with it, all within
        ``timeout`` seconds.  GuestAgentError if the socket is missing, not a socket or
        refused, or if the agent does not answer in time (no agent in the guest, or
        another client on the socket)."""
        where = os.fspath(path)
        _check_socket(where)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_unix_connection(where, limit=_READ_SIZE)
        except TimeoutError:
            raise GuestAgentError(
                f"connecting to the guest agent socket {where} took over {timeout:g} s"
            ) from None
        except OSError as exc:
            raise GuestAgentError(_connect_reason(where, exc)) from exc
        log.debug("qga.connected", path=where)
        agent = cls(where, reader, writer)
        try:
            async with agent._lock:
                await agent._sync(deadline, timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Synchronise again: drop whatever the channel still holds.  GuestAgentError if
        the agent does not answer within ``timeout`` seconds."""
        async with self._lock:
            await self._sync(asyncio.get_running_loop().time() + timeout, timeout)

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Any:
        """Run ``command`` and return its ``return`` value, within ``timeout`` seconds
        (a resync first included, when an earlier command failed to get its reply).
        GuestAgentError if the agent refuses it, does not answer in time, or its socket
        closes."""
        async with self._lock:
            if self._closed:
                raise GuestAgentError(f"the guest agent connection to {self.path} is closed")
            deadline = asyncio.get_running_loop().time() + timeout
            if not self._in_sync:
                await self._sync(deadline, timeout)
            request: dict[str, Any] = {"execute": command, "id": f"qmpbackup-{next(self._ids)}"}
            if arguments:
                request["arguments"] = arguments
            if log.is_enabled_for(logging.DEBUG):
                log.debug("qga.command", execute=command, arguments=redact(arguments))
            # Until its reply is read, a late reply would be taken for the next command's.
            self._in_sync = False
            try:
                async with asyncio.timeout_at(deadline):
                    await self._send(request)
                    reply = await self._reply(request["id"])
            except TimeoutError:
                log.debug("qga.timeout", execute=command, timeout=timeout)
                raise GuestAgentError(
                    f"the guest agent at {self.path} did not answer {command} within {timeout:g} s"
                ) from None
            except (_Closed, OSError) as exc:
                raise self._lost(command, exc) from None
            self._in_sync = True
        return _result(command, reply)

    async def ping(self, timeout: float = COMMAND_TIMEOUT) -> None:
        """``guest-ping``: the agent answers.  GuestAgentError as :meth:`execute`."""
        await self.execute("guest-ping", timeout=timeout)

    async def freeze(self, timeout: float = FREEZE_TIMEOUT) -> int:
        """``guest-fsfreeze-freeze``: the number of filesystems frozen.  GuestAgentError
        if the agent refuses (it has thawed what it froze) or as :meth:`execute`; when
        there was no answer, a thaw is sent at once so that a freeze finishing late does
        not leave the guest frozen, and the error says how that went."""
        try:
            return int(await self.execute("guest-fsfreeze-freeze", timeout=timeout))
        except GuestAgentError as exc:
            if exc.error_class is not None or self._closed:
                raise
            try:
                thawed = await self.thaw()
            except GuestAgentError as thaw_exc:
                after = f"the thaw sent after it failed too: {thaw_exc}"
            else:
                after = f"a thaw sent after it thawed {thawed} filesystem(s)"
            raise GuestAgentError(f"{exc}; {after}", command=exc.command) from exc

    async def thaw(self, timeout: float = THAW_TIMEOUT) -> int:
        """``guest-fsfreeze-thaw``: the number of filesystems thawed (0 when none was
        frozen).  GuestAgentError as :meth:`execute`."""
        return int(await self.execute("guest-fsfreeze-thaw", timeout=timeout))

    async def status(self, timeout: float = COMMAND_TIMEOUT) -> FreezeStatus:
        """``guest-fsfreeze-status``: ``"thawed"`` or ``"frozen"``.  GuestAgentError as
        :meth:`execute`, or if the agent answers anything else."""
        found = await self.execute("guest-fsfreeze-status", timeout=timeout)
        if found not in ("thawed", "frozen"):
            raise GuestAgentError(f"guest-fsfreeze-status answered {found!r}")
        return cast(FreezeStatus, found)

    async def close(self) -> None:
        """Close the connection; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError as exc:
            log.debug("qga.close_error", path=self.path, error=str(exc))
        log.debug("qga.closed", path=self.path)

    async def __aenter__(self) -> GuestAgent:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _sync(self, deadline: float, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._in_sync = False
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    sync_id = secrets.randbelow(2**31)
                    request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
                    log.debug("qga.command", execute="guest-sync-delimited", id=sync_id)
                    await self._send(request, prefix=_DELIMITER)
                    try:
                        async with asyncio.timeout(_SYNC_RESEND):
                            await self._sync_reply(sync_id)
                        break
                    except TimeoutError:
                        if loop.time() >= deadline:
                            raise
        except TimeoutError:
            log.debug("qga.timeout", execute="guest-sync-delimited", timeout=timeout)
            raise GuestAgentError(
                f"the guest agent at {self.path} did not answer guest-sync-delimited within "
                f"{timeout:g} s: is qemu-guest-agent running in the guest, and no other "
                f"client connected? ({_ONE_CLIENT})"
            ) from None
        except (_Closed, OSError) as exc:
            raise self._lost("guest-sync-delimited", exc) from None
        self._in_sync = True
        log.debug("qga.synced", path=self.path, seconds=round(loop.time() - started, 3))

    async def _sync_reply(self, sync_id: int) -> None:
        """Read until the delimited reply carrying ``sync_id``; skip everything before."""
        while True:
            mark = self._buffer.find(_DELIMITER)
            if mark < 0:
                self._discard(len(self._buffer))
                await self._fill()
                continue
            self._discard(mark)
            self._buffer = self._buffer[len(_DELIMITER) :]
            line = await self._line()
            # A reply cut short by a restarting agent runs into the next delimiter.
            cut = line.rfind(_DELIMITER)
            if cut >= 0:
                self._buffer = line[cut:] + b"\n" + self._buffer
                line = line[:cut]
            reply = _parse(line)
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                log.debug("qga.reply", execute="guest-sync-delimited", reply=reply)
                return
            log.debug(
                "qga.stale",
                reply=reply if reply is not None else line[:200].decode("utf-8", "replace"),
            )

    async def _reply(self, request_id: str) -> dict[str, Any]:
        """The next reply for ``request_id``; replies naming another id are stale."""
        while True:
            line = (await self._line()).replace(_DELIMITER, b"")
            reply = _parse(line)
            if not isinstance(reply, dict):
                log.debug("qga.stale", reply=line[:200].decode("utf-8", "replace"))
                continue
            # Agents echo a command's id; a reply without one is taken as the answer.
            if reply.get("id", request_id) != request_id:
                log.debug("qga.stale", reply=reply)
                continue
            return reply

    async def _send(self, message: dict[str, Any], prefix: bytes = b"") -> None:
        self._writer.write(prefix + json.dumps(message).encode() + b"\n")
        await self._writer.drain()

    async def _fill(self) -> None:
        chunk = await self._reader.read(_READ_SIZE)
        if not chunk:
            raise _Closed("end of stream")
        self._buffer += chunk
        if len(self._buffer) > _MAX_REPLY:
            raise GuestAgentError(
                f"the guest agent at {self.path} sent over {_MAX_REPLY} bytes without a newline"
            )

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            await self._fill()
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        return line.strip()

    def _discard(self, count: int) -> None:
        if count:
            text = self._buffer[: min(count, 200)].decode("utf-8", "replace")
            log.debug("qga.discarded", data=text, size=count)
            self._buffer = self._buffer[count:]

    def _lost(self, command: str, exc: BaseException) -> GuestAgentError:
        self._closed = True
        self._writer.close()
        detail = "it closed" if isinstance(exc, _Closed) else (_os_text(exc) or "it failed")
        log.debug("qga.disconnected", execute=command, error=detail)
        return GuestAgentError(
            f"lost the guest agent connection to {self.path} during {command} ({detail}): "
            "did QEMU quit?"
        )


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _result(command: str, reply: dict[str, Any]) -> Any:
    if "error" in reply:
        error = reply["error"] if isinstance(reply["error"], dict) else {}
        error_class = str(error.get("class", "GenericError"))
        desc = " ".join(str(error.get("desc", "")).split())
        log.debug("qga.error", execute=command, error_class=error_class, desc=desc)
        raise GuestAgentError(
            f"guest agent {command} failed: {error_class}: {desc}",
            command=command,
            error_class=error_class,
            desc=desc,
        )
    if log.is_enabled_for(logging.DEBUG):
        log.debug("qga.reply", execute=command, reply=redact(reply.get("return")))
    return reply.get("return")


def _check_socket(where: str) -> None:
    try:
        mode = os.stat(where).st_mode
    except FileNotFoundError:
        raise GuestAgentError(f"guest agent socket {where} does not exist") from None
    except OSError as exc:
        raise GuestAgentError(f"cannot reach guest agent socket {where}: {_os_text(exc)}") from exc
    if not stat.S_ISSOCK(mode):
        raise GuestAgentError(f"{where} is not a socket (expected the guest agent's chardev)")


def _connect_reason(where: str, exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection to guest agent socket {where} refused: "
            "is the QEMU that made it still running?"
        )
    if isinstance(exc, FileNotFoundError):
        return f"guest agent socket {where} does not exist"
    if isinstance(exc, PermissionError):
        return f"no permission to open guest agent socket {where}"
    if exc.errno == errno.ENOTSOCK:
        return f"{where} is not a socket (expected the guest agent's chardev)"
    return f"cannot connect to guest agent socket {where}: {_os_text(exc)}"


def _os_text(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
