"""Wire constants and structures of the NBD protocol (fixed newstyle, structured replies,
extended headers).

Names follow the protocol document (``NBD_OPT_GO`` is :data:`OPT_GO`, and so on).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DEFAULT_PORT = 10809

# Handshake.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

OPTION_ERRORS = {
    REP_ERR_UNSUP: "not supported",
    REP_ERR_POLICY: "refused by server policy",
    REP_ERR_INVALID: "invalid request",
    REP_ERR_PLATFORM: "not supported on this platform",
    REP_ERR_TLS_REQD: "TLS required",
    REP_ERR_UNKNOWN: "unknown export",
    REP_ERR_SHUTDOWN: "server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "block size constraints required",
    REP_ERR_TOO_BIG: "request too big",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Transmission.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
# Extended headers (NBD_OPT_EXTENDED_HEADERS): 64-bit lengths both ways.
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# Errno values on the wire are the protocol's, not the host's.
ERRNO_NAMES = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}

# Without advertised constraints the protocol lets a client assume these.
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 32 << 20

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_BODY = struct.Struct(">HQH")
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
# Simple and structured replies share their first 16 bytes: magic, a 32-bit word (error, or
# flags and type) and the handle; a structured reply then carries a 32-bit length.
REPLY_HEAD = struct.Struct(">IIQ")
# An extended reply goes on with the request's offset and a 64-bit payload length.
EXTENDED_REPLY_TAIL = struct.Struct(">QQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
ERROR_BODY = struct.Struct(">IH")
HOLE_BODY = struct.Struct(">QI")
DESCRIPTOR = struct.Struct(">II")
EXTENDED_DESCRIPTOR = struct.Struct(">QQ")


def errno_name(code: int) -> str:
    """The symbolic name of an NBD error code (``EIO``), or ``error N``."""
    return ERRNO_NAMES.get(code, f"error {code}")


@dataclass(frozen=True)
class Extent:
    """One block-status extent; ``flags`` mean what the context says.

    ``base:allocation``: 1 = hole, 2 = reads as zero. ``qemu:dirty-bitmap:NAME``: 1 = dirty.
    ``qemu:allocation-depth``: the depth in the backing chain (0 = unallocated).
    """

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        """Offset just past the extent."""
        return self.offset + self.length
