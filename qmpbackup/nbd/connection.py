"""One NBD connection in transmission phase: requests from any thread, one reader thread.

Senders write a request under a lock and return; the reader thread takes replies in
whatever order the server sends them and completes the matching request, reading data
straight into the caller's buffer. A semaphore bounds the requests in flight, which keeps
QEMU (at most 16 per client) from stalling on us.
"""

from __future__ import annotations

import itertools
import ssl
import threading
from collections.abc import Callable

from . import protocol as p
from .errors import NBDError
from .handshake import ExportInfo
from .stream import BytesLike, Stream, TLSStream, recv_exact
from .zeroes import fill_zero

# QEMU's server reads at most 16 requests ahead per client.
MAX_IN_FLIGHT = 16
# Block-status replies for huge ranges are the largest non-data payloads; cap what we accept.
_MAX_PAYLOAD = 64 << 20


class _ProtocolError(Exception):
    """The server broke the protocol; the connection cannot be trusted any more."""


class Request:
    """One command in flight; completed by the reader thread."""

    __slots__ = (
        "buf",
        "callback",
        "cmd",
        "context_id",
        "data",
        "error",
        "event",
        "extents",
        "handle",
        "length",
        "offset",
    )

    def __init__(
        self,
        cmd: int,
        offset: int,
        length: int,
        buf: memoryview | None,
        context_id: int,
        callback: Callable[[Request], None] | None,
    ) -> None:
        self.handle = 0
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf = buf
        self.context_id = context_id
        self.callback = callback
        self.event = threading.Event() if callback is None else None
        self.error: NBDError | None = None
        self.extents: list[tuple[int, int]] | None = None
        # A read that saw no data chunk was all holes: its buffer is known to be zero.
        self.data = False

    def wait(self) -> None:
        """Block until the reply is complete; raise its error if it failed."""
        assert self.event is not None, "request has a callback"
        self.event.wait()
        if self.error is not None:
            raise NBDError(str(self.error))

    def fail(self, code: int, message: str = "") -> None:
        """Record the server's error (the first one wins)."""
        if self.error is None:
            detail = f": {message}" if message else ""
            name = p.COMMAND_NAMES.get(self.cmd, str(self.cmd))
            self.error = NBDError(
                f"nbd: {name} of {self.length} bytes at offset {self.offset} failed: "
                f"{p.errno_name(code)}{detail}"
            )


class Connection:
    """A negotiated connection; thread-safe, with its own reader thread."""

    def __init__(self, stream: Stream, info: ExportInfo, server: str, index: int) -> None:
        self.stream = stream
        self.info = info
        self.server = server
        self._send_lock = threading.Lock()
        # Guards _pending against the reader failing everything while a sender registers.
        self._state_lock = threading.Lock()
        self._pending: dict[int, Request] = {}
        self._handles = itertools.count(1)
        self._slots = threading.Semaphore(MAX_IN_FLIGHT)
        self._error: NBDError | None = None
        self._send_error: BaseException | None = None
        self._closing = False
        self._head = bytearray(p.REPLY_HEAD.size)
        self._tail = bytearray(p.EXTENDED_REPLY_TAIL.size)
        self._word = bytearray(8)
        self._payload = bytearray(4096)
        self._reader = threading.Thread(
            target=self._run, name=f"nbd-reader-{server}-{index}", daemon=True
        )
        self._reader.start()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def submit(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: BytesLike | None = None,
        buf: memoryview | None = None,
        context_id: int = 0,
        callback: Callable[[Request], None] | None = None,
    ) -> Request:
        """Send one command; blocks while the connection is at its in-flight limit.

        ``buf`` receives READ data; ``callback`` runs on the reader thread when the reply is
        complete (it must not block), otherwise :meth:`Request.wait` waits for it.
        """
        self._slots.acquire()
        req = Request(cmd, offset, length, buf, context_id, callback)
        req.handle = handle = next(self._handles)
        with self._state_lock:
            if self._error is not None or self._closing:
                self._slots.release()
                raise NBDError(str(self._error or f"nbd: connection to {self.server} is closed"))
            self._pending[handle] = req
        header = self._header(flags, cmd, handle, offset, length)
        try:
            with self._send_lock:
                self.stream.sendall(header)
                if payload is not None:
                    self.stream.sendall(payload)
        except (OSError, ValueError) as exc:
            # Only the reader fails requests, so none completes while it still fills a buffer;
            # shutting the stream down wakes it.
            self._send_error = exc
            self.stream.shutdown()
        return req

    def close(self, timeout: float) -> None:
        """Send NBD_CMD_DISC, wait up to ``timeout`` for the server to hang up, then close."""
        with self._state_lock:
            if self._closing:
                return
            self._closing = True
            healthy = self._error is None
        if healthy:
            try:
                with self._send_lock:
                    self.stream.sendall(self._header(0, p.CMD_DISC, 0, 0, 0))
                    if isinstance(self.stream, TLSStream):
                        self.stream.unwrap()
            except (OSError, ValueError):
                pass
            self._reader.join(timeout)
        self.stream.shutdown()
        self._reader.join()
        self.stream.close()

    def _header(self, flags: int, cmd: int, handle: int, offset: int, length: int) -> bytes:
        if self.info.extended:
            return p.EXTENDED_REQUEST.pack(
                p.EXTENDED_REQUEST_MAGIC, flags, cmd, handle, offset, length
            )
        return p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length)

    def _run(self) -> None:
        head = memoryview(self._head)
        tail = memoryview(self._tail)
        structured = self.info.structured
        extended = self.info.extended
        try:
            while True:
                recv_exact(self.stream, head)
                magic, word, handle = p.REPLY_HEAD.unpack_from(self._head)
                req = self._pending.get(handle)
                if req is None:
                    raise _ProtocolError(f"reply for unknown handle {handle}")
                if magic == p.SIMPLE_REPLY_MAGIC:
                    if word:
                        req.fail(word)
                    elif req.cmd == p.CMD_READ:
                        if structured or req.buf is None:
                            raise _ProtocolError("simple reply to a read")
                        recv_exact(self.stream, req.buf)
                        req.data = True
                    self._complete(req)
                elif magic == p.STRUCTURED_REPLY_MAGIC and structured and not extended:
                    (length,) = p.U32.unpack(self._read_word(4))
                    self._chunk(req, word & 0xFFFF, length)
                    if (word >> 16) & p.REPLY_FLAG_DONE:
                        self._complete(req)
                elif magic == p.EXTENDED_REPLY_MAGIC and extended:
                    recv_exact(self.stream, tail)
                    offset, length = p.EXTENDED_REPLY_TAIL.unpack_from(self._tail)
                    if offset != req.offset:
                        raise _ProtocolError(f"reply for offset {offset}, not {req.offset}")
                    self._chunk(req, word & 0xFFFF, length)
                    if (word >> 16) & p.REPLY_FLAG_DONE:
                        self._complete(req)
                else:
                    raise _ProtocolError(f"bad reply magic {magic:#x}")
        except BaseException as exc:
            self._die(exc)

    def _chunk(self, req: Request, rtype: int, length: int) -> None:
        if rtype == p.REPLY_TYPE_OFFSET_DATA:
            if req.cmd != p.CMD_READ or req.buf is None or length < 8:
                raise _ProtocolError("unexpected data chunk")
            start = p.U64.unpack(self._read_word(8))[0] - req.offset
            end = start + length - 8
            if start < 0 or end > req.length:
                raise _ProtocolError("data chunk outside the request")
            recv_exact(self.stream, req.buf[start:end])
            req.data = True
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != p.CMD_READ or req.buf is None or length != p.HOLE_BODY.size:
                raise _ProtocolError("unexpected hole chunk")
            offset, size = p.HOLE_BODY.unpack(self._read_payload(length))
            start = offset - req.offset
            if start < 0 or start + size > req.length:
                raise _ProtocolError("hole chunk outside the request")
            fill_zero(req.buf[start : start + size])
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != p.CMD_BLOCK_STATUS or length < 12 or (length - 4) % 8:
                raise _ProtocolError("unexpected block status chunk")
            body = self._read_payload(length)
            if p.U32.unpack_from(body)[0] == req.context_id:
                req.extents = list(p.DESCRIPTOR.iter_unpack(body[4:]))
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS_EXT:
            if req.cmd != p.CMD_BLOCK_STATUS or length < 24 or (length - 8) % 16:
                raise _ProtocolError("unexpected extended block status chunk")
            body = self._read_payload(length)
            context_id, count = p.U32.unpack_from(body)[0], p.U32.unpack_from(body, 4)[0]
            if count != (length - 8) // 16:
                raise _ProtocolError("extended block status chunk counts wrong")
            if context_id == req.context_id:
                req.extents = list(p.EXTENDED_DESCRIPTOR.iter_unpack(body[8:]))
        elif rtype == p.REPLY_TYPE_NONE:
            if length:
                raise _ProtocolError("NONE chunk with a payload")
        elif rtype & p.REPLY_TYPE_ERROR_BIT:
            if length < p.ERROR_BODY.size:
                raise _ProtocolError("short error chunk")
            body = self._read_payload(length)
            code, msg_len = p.ERROR_BODY.unpack_from(body)
            if p.ERROR_BODY.size + msg_len > length:
                raise _ProtocolError("error chunk message overflows")
            message = bytes(body[p.ERROR_BODY.size : p.ERROR_BODY.size + msg_len])
            req.fail(code, message.decode("utf-8", "replace"))
        else:
            # Unknown informational chunks may be ignored.
            self._read_payload(length)

    def _read_word(self, n: int) -> memoryview:
        view = memoryview(self._word)[:n]
        recv_exact(self.stream, view)
        return view

    def _read_payload(self, n: int) -> memoryview:
        if n > _MAX_PAYLOAD:
            raise _ProtocolError(f"reply payload of {n} bytes")
        if n > len(self._payload):
            self._payload = bytearray(n)
        view = memoryview(self._payload)[:n]
        recv_exact(self.stream, view)
        return view

    def _complete(self, req: Request) -> None:
        with self._state_lock:
            self._pending.pop(req.handle, None)
        self._slots.release()
        self._deliver(req)

    @staticmethod
    def _deliver(req: Request) -> None:
        """Hand a finished request to its callback, or wake its waiter."""
        if req.callback is not None:
            req.callback(req)
        else:
            assert req.event is not None
            req.event.set()

    def _die(self, exc: BaseException) -> None:
        """Fail every pending request and refuse new ones (reader thread only)."""
        with self._state_lock:
            if self._error is None:
                self._error = NBDError(self._describe(self._send_error or exc))
            failed = list(self._pending.values())
            self._pending.clear()
        self.stream.shutdown()
        for req in failed:
            if req.error is None:
                req.error = self._error
            self._slots.release()
            self._deliver(req)

    def _describe(self, exc: BaseException) -> str:
        if self._closing:
            return f"nbd: connection to {self.server} is closed"
        if isinstance(exc, NBDError):
            return str(exc)
        if isinstance(exc, _ProtocolError):
            return f"nbd: protocol error from {self.server}: {exc}"
        if isinstance(exc, ssl.SSLError):
            return f"nbd: TLS error on connection to {self.server}: {exc.reason or exc}"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"nbd: connection to {self.server} lost: {reason or type(exc).__name__}"
