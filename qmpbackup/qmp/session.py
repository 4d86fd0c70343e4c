"""A QMP session with QEMU, over :mod:`qemu.qmp`.

:class:`QMPSession` connects to a unix socket or a TCP address, runs commands
and follows events.  Every command, reply and event is logged at debug level,
and every failure becomes a :mod:`qmpbackup.errors` exception with one clear
line: missing socket, refused connection, a peer that does not speak QMP,
QEMU going away mid-command, or QEMU's own error (class and description).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import structlog
from qemu.qmp import ConnectError, EventListener, ExecuteError, Message, QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from ..errors import ConnectionFailedError, DisconnectedError, QMPCommandError
from ..logconfig import redact

log = structlog.get_logger("qmpbackup.qmp")

Address = str | tuple[str, int]


class CommandRunner(Protocol):
    """Anything that can run a QMP command (a :class:`QMPSession`, or a test's stand-in)."""

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run ``command`` and return its result."""


class _QuietClient(QMPClient):
    """qemu.qmp's client without its own per-message log lines.

    Its message hooks format every message for a debug line even when debug is
    off (costly for big replies), and those lines carry secrets unredacted;
    the session logs every command, reply and event itself, redacted.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        return msg


def parse_address(text: str) -> Address:
    """Turn ``/path/to.sock`` or ``HOST:PORT`` into a qemu.qmp address."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and "/" not in text:
        return (host.strip("[]") or "localhost", int(port))
    return text


def describe_address(address: Address) -> str:
    """``address`` as the user wrote it."""
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


_NEGOTIATION_TRIES = 3


class QMPSession:
    """One QMP connection: commands, replies and events, all logged."""

    def __init__(self, address: Address, *, name: str = "qmpbackup") -> None:
        self.address = address
        self._client = _QuietClient(name)
        self._events = EventListener()
        self._listening = False
        self._event_task: asyncio.Task[None] | None = None
        self._watchers: list[Callable[[Mapping[str, Any]], None]] = []

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities; raise ConnectionFailedError."""
        where = describe_address(self.address)
        if isinstance(self.address, str) and not os.path.exists(self.address):
            raise ConnectionFailedError(f"QMP socket {where} does not exist")
        if isinstance(self.address, str) and not stat.S_ISSOCK(os.stat(self.address).st_mode):
            raise ConnectionFailedError(f"{where} is not a socket")
        try:
            for attempt in range(1, _NEGOTIATION_TRIES + 1):
                try:
                    await asyncio.wait_for(self._client.connect(self.address), timeout)
                    break
                except ConnectError as exc:
                    stray = isinstance(exc.exc, NegotiationError | GreetingError)
                    if attempt == _NEGOTIATION_TRIES or not stray:
                        raise
                    # A client that died mid-command (recover's usual case) can leave a
                    # reply QEMU's monitor sends to whoever connects next, in place of
                    # the answer to qmp_capabilities (seen once on QEMU 7.2) or of the
                    # greeting (once on 10.0): try again.
                    log.debug("qmp.negotiation-retry", address=where, error=str(exc.exc))
                    await asyncio.sleep(0.2)
        except ConnectError as exc:
            raise ConnectionFailedError(self._connect_reason(where, exc)) from exc
        except TimeoutError as exc:
            await self._client.disconnect()
            # QEMU's monitor serves one client at a time: the next one is accepted
            # but gets no greeting until the first has gone.
            raise ConnectionFailedError(
                f"{where} did not answer as a QMP server within {timeout:g} s "
                "(is another client connected? QEMU's monitor serves one at a time)"
            ) from exc
        self._client.register_listener(self._events)
        self._listening = True
        self._event_task = asyncio.create_task(self._pump_events())
        greeting = self._client.greeting
        log.debug("qmp.connected", address=where, greeting=greeting._raw if greeting else None)

    @staticmethod
    def _connect_reason(where: str, exc: ConnectError) -> str:
        cause = exc.exc
        if isinstance(cause, ConnectionRefusedError):
            return f"connection to {where} refused: is QEMU running with -qmp?"
        if isinstance(cause, FileNotFoundError):
            return f"QMP socket {where} does not exist"
        if isinstance(cause, PermissionError):
            return f"no permission to open QMP socket {where}"
        if isinstance(cause, OSError) and cause.errno == errno.ENOTSOCK:
            return f"{where} is not a socket"
        if isinstance(cause, OSError):
            return f"cannot connect to {where}: {cause.strerror or cause}"
        if isinstance(cause, EOFError):
            return f"{where} is not a QMP server (it closed the connection without a greeting)"
        detail = " ".join(str(cause or exc.error_message).split())  # one line
        return f"{where} is not a QMP server ({detail})"

    async def disconnect(self) -> None:
        """Close the connection; safe to call more than once."""
        if self._event_task is not None:
            self._event_task.cancel()
            self._event_task = None
        if self._listening:
            self._client.remove_listener(self._events)
            self._listening = False
        try:
            await self._client.disconnect()
        except (QMPError, EOFError, OSError) as exc:
            log.debug("qmp.disconnect_error", error=str(exc))

    async def __aenter__(self) -> QMPSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value."""
        args = dict(arguments) if arguments else None
        debug = log.is_enabled_for(logging.DEBUG)  # redacting a big reply is not free
        if debug:
            log.debug("qmp.command", execute=command, arguments=redact(args) if args else None)
        try:
            reply = await self._client.execute(command, args)
        except ExecuteError as exc:
            err = exc.error.error
            log.debug("qmp.error", execute=command, error_class=err.class_, desc=err.desc)
            raise QMPCommandError(command, err.class_, err.desc) from exc
        except (QMPError, EOFError, ConnectionError, OSError) as exc:
            log.debug("qmp.disconnected", execute=command, error=str(exc))
            raise DisconnectedError(
                f"QEMU went away during {command} ({type(exc).__name__})"
            ) from exc
        if debug:
            log.debug("qmp.reply", execute=command, reply=redact(reply))
        return reply

    async def _pump_events(self) -> None:
        async for event in self._events:
            try:
                if log.is_enabled_for(logging.DEBUG):
                    log.debug("qmp.event", name=event["event"], data=redact(event.get("data", {})))
                for watcher in list(self._watchers):
                    watcher(event)
            except Exception:
                # A broken watcher must not stop every later event from arriving.
                log.exception("qmp.event_dispatch_failed", name=event.get("event"))

    @asynccontextmanager
    async def watch(self, names: set[str]) -> AsyncIterator[asyncio.Queue[Mapping[str, Any]]]:
        """Queue of the events named in ``names`` received while the block runs."""
        queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()

        def deliver(event: Mapping[str, Any]) -> None:
            if event["event"] in names:
                queue.put_nowait(event)

        self._watchers.append(deliver)
        try:
            yield queue
        finally:
            self._watchers.remove(deliver)

    async def next_event(
        self, queue: asyncio.Queue[Mapping[str, Any]], what: str
    ) -> Mapping[str, Any]:
        """The next event of ``queue`` (from :meth:`watch`); DisconnectedError if the
        connection goes first (no event would ever come)."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), 0.5)
            except TimeoutError:
                if not self.connected:
                    raise DisconnectedError(f"QEMU went away while waiting for {what}") from None

    @property
    def connected(self) -> bool:
        """True while the QMP connection is up."""
        return self._client.runstate.name == "RUNNING"
