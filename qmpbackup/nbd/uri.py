"""NBD URIs as libnbd and QEMU write them: ``nbd[s]://host[:port]/export``, ``nbd[s]+unix``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import NBDError
from .protocol import DEFAULT_PORT

_SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}


@dataclass(frozen=True)
class NBDAddress:
    """Where an export is and how to reach it: a TCP host and port, or a unix socket."""

    export: str
    tls: bool
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None

    @property
    def is_ip(self) -> bool:
        """True when the host is an IP literal (no name to check in a TLS certificate)."""
        if self.host is None:
            return False
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_uri(uri: str) -> NBDAddress:
    """Parse an NBD URI; the export is the path without its leading ``/`` (may be empty)."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise NBDError(f"nbd: invalid URI {uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise NBDError(f"nbd: invalid URI {uri!r}: scheme must be nbd, nbds, nbd+unix or nbds+unix")
    tls, unix = _SCHEMES[scheme]
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    if unix:
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise NBDError(f"nbd: invalid URI {uri!r}: {scheme} needs one ?socket=PATH")
        if parts.netloc:
            raise NBDError(f"nbd: invalid URI {uri!r}: {scheme} takes no host")
        return NBDAddress(export=export, tls=tls, socket_path=sockets[0])
    if not parts.hostname:
        raise NBDError(f"nbd: invalid URI {uri!r}: no host")
    return NBDAddress(
        export=export,
        tls=tls,
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
    )
