"""Pydantic models of the QOM objects a backup adds to QEMU and deletes after: TLS
credentials, client allow-lists and secrets (``object-add``, ``object-del``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from .commands import QAPIModel, QMPCommand


class TlsCredsX509Add(QMPCommand):
    """``object-add`` of server-side ``tls-creds-x509`` credentials."""

    execute: ClassVar[str] = "object-add"
    qom_type: Literal["tls-creds-x509"] = "tls-creds-x509"
    id: str
    dir: str
    endpoint: Literal["server", "client"] = "server"
    verify_peer: bool = True


class AuthzRule(QAPIModel):
    """``QAuthZListRule``: one allowed client certificate DN."""

    match: str
    policy: Literal["allow", "deny"] = "allow"
    format: Literal["exact", "glob"] = "exact"


class AuthzListAdd(QMPCommand):
    """``object-add`` of an ``authz-list``: the client DNs allowed in."""

    execute: ClassVar[str] = "object-add"
    qom_type: Literal["authz-list"] = "authz-list"
    id: str
    policy: Literal["allow", "deny"] = "deny"
    rules: tuple[AuthzRule, ...]


class SecretAdd(QMPCommand):
    """``object-add`` of a ``secret`` that QEMU reads from ``file`` (never given inline)."""

    execute: ClassVar[str] = "object-add"
    qom_type: Literal["secret"] = "secret"
    id: str
    file: str
    format: Literal["raw"] = "raw"


class ObjectDel(QMPCommand):
    """``object-del``."""

    execute: ClassVar[str] = "object-del"
    id: str
