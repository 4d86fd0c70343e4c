"""Byte streams under an NBD connection: a plain socket, or TLS over a socket.

A connection reads from its one reader thread while other threads send, so the TLS stream
keeps OpenSSL behind memory BIOs and a lock: OpenSSL objects must not be used from two
threads at once, and ``ssl.SSLSocket`` offers no such guarantee.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Protocol, TypeAlias, cast

BytesLike: TypeAlias = bytes | bytearray | memoryview

# Large enough to take a whole unix-socket buffer in one system call.
_RAW_CHUNK = 1 << 20
# TLS records are at most 16 KiB; feeding OpenSSL in pieces keeps the outgoing BIO small.
_TLS_WRITE_CHUNK = 256 << 10


class Stream(Protocol):
    """What a connection needs from its transport."""

    def recv_into(self, buf: memoryview) -> int:
        """Read at most ``len(buf)`` bytes into ``buf``; 0 at end of stream."""
        ...

    def sendall(self, data: BytesLike) -> None:
        """Send all of ``data``."""
        ...

    def shutdown(self) -> None:
        """Wake a blocked reader and stop further I/O; idempotent."""
        ...

    def close(self) -> None:
        """Release the socket; idempotent."""
        ...


def recv_exact(stream: Stream, buf: memoryview) -> None:
    """Fill ``buf`` completely, or raise ``ConnectionError`` at end of stream."""
    got, want = 0, len(buf)
    while got < want:
        n = stream.recv_into(buf[got:] if got else buf)
        if n == 0:
            raise ConnectionError("server closed the connection")
        got += n


class PlainStream:
    """A connected socket, used directly."""

    recv_into: Callable[[memoryview], int]
    sendall: Callable[[BytesLike], None]

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Bound methods: no Python frame between the caller and the system call.
        self.recv_into = sock.recv_into
        self.sendall = sock.sendall

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class TLSStream:
    """TLS client over a connected socket, safe for one reader and many senders."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None):
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        # Guards the SSL object and both BIOs; never held across a blocking call.
        self._lock = threading.Lock()
        # Keeps encrypted bytes on the wire in the order OpenSSL produced them.
        self._send_lock = threading.Lock()
        self._raw = memoryview(bytearray(_RAW_CHUNK))

    def handshake(self) -> None:
        """Run the TLS handshake (single-threaded, before any command is sent)."""
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                if not self._fill():
                    raise ConnectionError("server closed the connection during TLS") from None
        self._send_pending()

    def recv_into(self, buf: memoryview) -> int:
        while True:
            with self._lock:
                try:
                    # Given a buffer, read() returns a count (typeshed says bytes).
                    n = cast(int, self._ssl.read(len(buf), buf))
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
                produced = self._outgoing.pending
            if produced and self._send_lock.acquire(blocking=False):
                # Post-handshake messages (e.g. key updates) need an answer; a sender that
                # holds the lock will flush it with its own data otherwise.
                try:
                    self._send_pending()
                finally:
                    self._send_lock.release()
            if n >= 0:
                return n
            if not self._fill():
                with self._lock:
                    self._incoming.write_eof()

    def sendall(self, data: BytesLike) -> None:
        view = memoryview(data).cast("B")
        with self._send_lock:
            for pos in range(0, len(view), _TLS_WRITE_CHUNK):
                with self._lock:
                    self._ssl.write(view[pos : pos + _TLS_WRITE_CHUNK])
                    out = self._outgoing.read()
                self.sock.sendall(out)
            self._send_pending()

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()

    def unwrap(self) -> None:
        """Send the TLS close_notify alert (best effort, does not wait for the peer's)."""
        with self._send_lock:
            with self._lock, contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            with contextlib.suppress(OSError):
                self._send_pending()

    def _send_pending(self) -> None:
        with self._lock:
            out = self._outgoing.read()
        if out:
            self.sock.sendall(out)

    def _fill(self) -> bool:
        n = self.sock.recv_into(self._raw)
        if n == 0:
            return False
        with self._lock:
            self._incoming.write(self._raw[:n])
        return True
