"""Client-side x509 TLS settings for NBD, and the SSL context built from them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from .errors import NBDError


@dataclass(frozen=True)
class TLSConfig:
    """CA that signed the server's certificate, and the client's certificate and key.

    ``hostname`` is the name checked in the server certificate; when it is None, a TCP host
    given by name is checked, and IP addresses and unix sockets are not.
    """

    ca_cert: str
    client_cert: str | None = None
    client_key: str | None = None
    hostname: str | None = None

    @classmethod
    def from_dir(cls, directory: str, hostname: str | None = None) -> TLSConfig:
        """Files named as QEMU's client ``tls-creds-x509`` reads them (``ca-cert.pem``,
        ``client-cert.pem``, ``client-key.pem``); the client pair is optional."""
        base = Path(directory)
        cert, key = base / "client-cert.pem", base / "client-key.pem"
        have_pair = cert.exists() and key.exists()
        return cls(
            ca_cert=str(base / "ca-cert.pem"),
            client_cert=str(cert) if have_pair else None,
            client_key=str(key) if have_pair else None,
            hostname=hostname,
        )

    def context(self, check_hostname: bool) -> ssl.SSLContext:
        """An SSL context that verifies the server against ``ca_cert``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=self.ca_cert)
            if self.client_cert is not None:
                ctx.load_cert_chain(self.client_cert, self.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise NBDError(f"nbd: cannot load TLS credentials: {exc}") from None
        return ctx
