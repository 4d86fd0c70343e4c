"""Fixed-newstyle negotiation: STARTTLS, structured replies, meta contexts, then GO."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import protocol as p
from .errors import NBDError
from .stream import PlainStream, Stream, TLSStream, recv_exact

# Option replies are small (names, descriptions); anything larger is a broken server.
_MAX_OPTION_REPLY = 1 << 24

_OPTION_NAMES = {
    p.OPT_STARTTLS: "STARTTLS",
    p.OPT_GO: "GO",
    p.OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    p.OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
    p.OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    p.OPT_EXPORT_NAME: "EXPORT_NAME",
}


@dataclass(frozen=True)
class ExportInfo:
    """What one connection negotiated for its export."""

    name: str
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    structured: bool
    # 64-bit request and reply headers (NBD_OPT_EXTENDED_HEADERS); implies structured.
    extended: bool
    # Context name to the id this server chose on this connection.
    contexts: Mapping[str, int]

    @property
    def read_only(self) -> bool:
        """The server refuses writes."""
        return bool(self.flags & p.FLAG_READ_ONLY)


class _Options:
    """Option requests and replies on one stream."""

    def __init__(self, stream: Stream, server: str, export: str) -> None:
        self.stream = stream
        self.server = server
        self.export = export

    def send(self, option: int, payload: bytes = b"") -> None:
        self.stream.sendall(p.OPTION.pack(p.IHAVEOPT, option, len(payload)) + payload)

    def reply(self, option: int) -> tuple[int, bytes]:
        head = _recv(self.stream, p.OPTION_REPLY.size)
        magic, echoed, rtype, length = p.OPTION_REPLY.unpack(head)
        if magic != p.OPTION_REPLY_MAGIC or echoed != option:
            raise self.protocol_error(f"bad reply to option {_OPTION_NAMES.get(option, option)}")
        if length > _MAX_OPTION_REPLY:
            raise self.protocol_error(f"option reply of {length} bytes")
        return rtype, _recv(self.stream, length)

    def refused(self, option: int, rtype: int, payload: bytes) -> NBDError:
        """Send NBD_OPT_ABORT (so the server logs no error) and return the error for an
        option the server answered with an error reply."""
        with contextlib.suppress(OSError):
            self.send(p.OPT_ABORT)
        reason = p.OPTION_ERRORS.get(rtype, f"error {rtype & ~p.REP_FLAG_ERROR}")
        message = payload.decode("utf-8", "replace").strip()
        if rtype == p.REP_ERR_TLS_REQD:
            return NBDError(
                f"nbd: server {self.server} requires TLS: use nbds:// with a TLS configuration"
            )
        if option in (p.OPT_GO, p.OPT_SET_META_CONTEXT, p.OPT_EXPORT_NAME):
            what = f"export {self.export!r}"
            if rtype == p.REP_ERR_UNKNOWN:
                message = ""  # QEMU's text only repeats "not present"
        else:
            what = f"option {_OPTION_NAMES.get(option, option)}"
        detail = f" ({message})" if message else ""
        return NBDError(f"nbd: server refused {what}: {reason}{detail}")

    def protocol_error(self, what: str) -> NBDError:
        return NBDError(f"nbd: protocol error from {self.server}: {what}")


def _recv(stream: Stream, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact(stream, memoryview(buf))
    return bytes(buf)


def _name(value: str) -> bytes:
    raw = value.encode("utf-8")
    return p.U32.pack(len(raw)) + raw


def negotiate(
    sock: socket.socket,
    *,
    server: str,
    export: str,
    meta_contexts: Sequence[str],
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
) -> tuple[Stream, ExportInfo]:
    """Negotiate ``export`` on a connected socket; return the stream to use and the export."""
    stream: Stream = PlainStream(sock)
    opts = _Options(stream, server, export)
    magic, opt_magic, server_flags = p.GREETING.unpack(_recv(stream, p.GREETING.size))
    if magic != p.NBDMAGIC:
        raise NBDError(f"nbd: {server} is not an NBD server")
    if opt_magic == p.OLDSTYLE_MAGIC:
        raise NBDError(f"nbd: {server} speaks the oldstyle protocol, which is not supported")
    if opt_magic != p.IHAVEOPT or not server_flags & p.FLAG_FIXED_NEWSTYLE:
        raise NBDError(f"nbd: {server} does not support fixed newstyle negotiation")
    no_zeroes = bool(server_flags & p.FLAG_NO_ZEROES)
    client_flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
    stream.sendall(p.CLIENT_FLAGS.pack(client_flags))

    if tls is not None:
        opts.send(p.OPT_STARTTLS)
        rtype, payload = opts.reply(p.OPT_STARTTLS)
        if rtype != p.REP_ACK:
            if rtype & p.REP_FLAG_ERROR:
                raise opts.refused(p.OPT_STARTTLS, rtype, payload)
            raise opts.protocol_error("unexpected reply to STARTTLS")
        tls_stream = TLSStream(sock, tls, server_hostname)
        tls_stream.handshake()
        stream = opts.stream = tls_stream

    # Extended headers where the server has them (QEMU 8.2 and later): block status over
    # a whole huge disk in one request. Else structured replies, else simple ones.
    extended = _ask(opts, p.OPT_EXTENDED_HEADERS, tls is not None)
    structured = extended or _ask(opts, p.OPT_STRUCTURED_REPLY, tls is not None)

    contexts: dict[str, int] = {}
    if meta_contexts and structured:
        contexts = _set_meta_contexts(opts, meta_contexts)

    info = _go(opts, structured, extended, contexts, no_zeroes)
    return stream, info


def _ask(opts: _Options, option: int, tls: bool) -> bool:
    """Ask for a transmission-phase feature without payload; whether the server took it."""
    opts.send(option)
    try:
        rtype, payload = opts.reply(option)
    except ConnectionError:
        if not tls:
            raise
        # With TLS 1.3 the server checks our certificate after our side of the handshake.
        raise NBDError(
            f"nbd: TLS with {opts.server} failed: the server hung up after the handshake "
            "(client certificate missing or not accepted?)"
        ) from None
    if rtype == p.REP_ERR_TLS_REQD:
        raise opts.refused(option, rtype, payload)
    return rtype == p.REP_ACK


def _set_meta_contexts(opts: _Options, queries: Sequence[str]) -> dict[str, int]:
    payload = _name(opts.export) + p.U32.pack(len(queries))
    payload += b"".join(_name(q) for q in queries)
    opts.send(p.OPT_SET_META_CONTEXT, payload)
    contexts: dict[str, int] = {}
    while True:
        rtype, body = opts.reply(p.OPT_SET_META_CONTEXT)
        if rtype == p.REP_ACK:
            return contexts
        if rtype & p.REP_FLAG_ERROR:
            raise opts.refused(p.OPT_SET_META_CONTEXT, rtype, body)
        if rtype != p.REP_META_CONTEXT or len(body) < 4:
            raise opts.protocol_error("bad reply to SET_META_CONTEXT")
        (context_id,) = p.U32.unpack_from(body)
        contexts[body[4:].decode("utf-8", "replace")] = context_id


def _go(
    opts: _Options,
    structured: bool,
    extended: bool,
    contexts: Mapping[str, int],
    no_zeroes: bool,
) -> ExportInfo:
    opts.send(p.OPT_GO, _name(opts.export) + p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE))
    size: int | None = None
    flags = 0
    blocks = (p.DEFAULT_MIN_BLOCK, p.DEFAULT_PREFERRED_BLOCK, p.DEFAULT_MAX_BLOCK)
    while True:
        rtype, body = opts.reply(p.OPT_GO)
        if rtype == p.REP_ACK:
            break
        if rtype == p.REP_ERR_UNSUP:
            size, flags = _export_name(opts, no_zeroes)
            break
        if rtype & p.REP_FLAG_ERROR:
            raise opts.refused(p.OPT_GO, rtype, body)
        if rtype != p.REP_INFO or len(body) < 2:
            raise opts.protocol_error("bad reply to GO")
        (info_type,) = p.U16.unpack_from(body)
        if info_type == p.INFO_EXPORT and len(body) == p.INFO_EXPORT_BODY.size:
            _, size, flags = p.INFO_EXPORT_BODY.unpack(body)
        elif info_type == p.INFO_BLOCK_SIZE and len(body) == p.INFO_BLOCK_SIZE_BODY.size:
            _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE_BODY.unpack(body)
            blocks = (max(minimum, 1), max(preferred, 1), max(maximum, minimum, 1))
    if size is None:
        raise opts.protocol_error("GO succeeded without export information")
    return ExportInfo(
        name=opts.export,
        size=size,
        flags=flags,
        min_block=blocks[0],
        preferred_block=blocks[1],
        max_block=blocks[2],
        structured=structured,
        extended=extended,
        contexts=dict(contexts),
    )


def _export_name(opts: _Options, no_zeroes: bool) -> tuple[int, int]:
    """The pre-GO way in, for servers without GO: the server hangs up on an unknown name."""
    opts.send(p.OPT_EXPORT_NAME, opts.export.encode("utf-8"))
    try:
        size, flags = p.EXPORT_NAME_REPLY.unpack(_recv(opts.stream, p.EXPORT_NAME_REPLY.size))
        if not no_zeroes:
            _recv(opts.stream, 124)
    except ConnectionError:
        raise NBDError(f"nbd: server refused export {opts.export!r}") from None
    return size, flags
