"""Opening one NBD connection: the socket (unix or TCP), then negotiation."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

from .connection import Connection
from .errors import NBDError
from .handshake import negotiate
from .uri import NBDAddress


def open_connection(
    address: NBDAddress,
    index: int,
    meta_contexts: Sequence[str],
    tls: ssl.SSLContext | None,
    hostname: str | None,
    timeout: float,
) -> Connection:
    """Open connection number *index* to *address*: connect, then negotiate the export.

    Every failure is raised as NBDError, naming the server.
    """
    server = str(address)
    try:
        if address.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            assert address.host is not None
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            # Requests are small and latency-bound; never hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        raise NBDError(f"nbd: cannot connect to {server}: {exc.strerror or exc}") from None
    try:
        stream, info = negotiate(
            sock,
            server=server,
            export=address.export,
            meta_contexts=meta_contexts,
            tls=tls,
            server_hostname=hostname,
        )
    except NBDError:
        sock.close()
        raise
    except ssl.SSLError as exc:
        sock.close()
        reason = exc.reason or str(exc)
        if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
            reason = f"server certificate rejected: {exc.verify_message}"
        raise NBDError(f"nbd: TLS with {server} failed: {reason}") from None
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise NBDError(f"nbd: negotiation with {server} failed: {reason}") from None
    # The data path blocks without a timeout: a timed socket polls before every recv.
    sock.settimeout(None)
    return Connection(stream, info, server, index)
