"""A throwaway x509 CA with server and client certificates, made with openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str = "Test CA") -> Path:
    """A self-signed CA: ``ca-cert.pem`` and ``ca-key.pem`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/O=Example/CN={name}", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return directory


def issue(ca: Path, out: Path, prefix: str, subject: str, server: bool) -> None:
    """Sign ``<prefix>-cert.pem``/``<prefix>-key.pem`` in ``out`` with the CA in ``ca``."""
    out.mkdir(parents=True, exist_ok=True)
    ext = out / f"{prefix}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = [f"extendedKeyUsage={usage}", "keyUsage=digitalSignature,keyEncipherment"]
    if server:
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
        "-keyout", f"{prefix}-key.pem", "-out", f"{prefix}.csr", cwd=out,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{prefix}.csr", "-CA", str(ca / "ca-cert.pem"),
        "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", f"{prefix}-cert.pem", cwd=out,
    )  # fmt: skip
    (out / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())


def server_dir(ca: Path, out: Path) -> Path:
    """A folder as QEMU's tls-creds-x509 reads it: ca-cert, server-cert, server-key."""
    issue(ca, out, "server", "/O=Example/CN=localhost", server=True)
    return out


def client_dir(ca: Path, out: Path, subject: str) -> Path:
    """A folder as libnbd reads it: ca-cert, client-cert, client-key."""
    issue(ca, out, "client", subject, server=False)
    return out
