"""A pure-Python NBD client, and a pipelined copy from an export to a sink.

Fixed newstyle, TLS, structured replies, block status, several requests in flight per
connection and several connections per export. The names below load their module on
first use: a command that only catches :class:`NBDError` does not load the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .client import NBDClient
    from .errors import NBDError
    from .protocol import Extent
    from .tls import TLSConfig
    from .uri import NBDAddress, parse_uri

_HOMES = {
    "NBDClient": "client",
    "NBDError": "errors",
    "Extent": "protocol",
    "TLSConfig": "tls",
    "NBDAddress": "uri",
    "parse_uri": "uri",
}

__all__ = ["Extent", "NBDAddress", "NBDClient", "NBDError", "TLSConfig", "parse_uri"]

__getattr__ = exports(__name__, _HOMES)
