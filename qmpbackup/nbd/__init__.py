"""A pure-Python NBD client, and a pipelined copy from an export to a sink.

Fixed newstyle, TLS, structured replies, block status, several requests in flight per
connection and several connections per export.
"""

from .client import NBDClient
from .errors import NBDError
from .protocol import Extent
from .tls import TLSConfig
from .uri import NBDAddress, parse_uri

__all__ = ["Extent", "NBDAddress", "NBDClient", "NBDError", "TLSConfig", "parse_uri"]
