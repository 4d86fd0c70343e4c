"""Finding the guest agent's socket from QEMU itself, over QMP.

The agent listens on the ``virtserialport`` named ``org.qemu.guest_agent.0``.  The
port's devices are children of ``/machine/peripheral`` (with an id) or
``/machine/peripheral-anon`` (without); their ``name`` and ``chardev`` properties
give the chardev, and ``query-chardev`` gives its socket.  :func:`agent_socket` is
pure over the replies :func:`query_agent_replies` gathers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GuestAgentError
from ..qmp.session import CommandRunner

AGENT_PORT = "org.qemu.guest_agent.0"
CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon")
PORT_TYPES = frozenset({"child<virtserialport>", "child<virtconsole>"})
# QEMU prefixes a socket chardev's filename with this while no client is connected.
_IDLE = "disconnected:"
_SERVER = ",server=on"


@dataclass(frozen=True)
class AgentSocket:
    """The agent's port as QEMU reports it.

    ``path`` is its unix socket, or None with ``problem`` saying why it cannot be used.
    ``client_connected``: a client holds the socket now (QEMU serves one at a time).
    ``guest_open``: the guest has opened the port, as a running agent does.
    """

    device: str
    chardev: str
    filename: str
    path: Path | None
    problem: str | None
    client_connected: bool
    guest_open: bool

    def socket_path(self) -> Path:
        """The socket to connect to; GuestAgentError with :attr:`problem` if there is none."""
        if self.path is None:
            raise GuestAgentError(self.problem or f"the guest agent port {self.device} has no path")
        return self.path


async def query_agent_replies(qmp: CommandRunner) -> dict[str, Any]:
    """The replies :func:`agent_socket` reads: ``qom-list`` of both containers, ``qom-get``
    of each serial port's ``name`` and ``chardev``, and ``query-chardev``.  QMPCommandError
    or DisconnectedError from the session."""
    listings = {c: await qmp.execute("qom-list", {"path": c}) for c in CONTAINERS}
    properties: dict[str, dict[str, Any]] = {}
    for port in serial_ports(listings):
        properties[port] = {
            prop: await qmp.execute("qom-get", {"path": port, "property": prop})
            for prop in ("name", "chardev")
        }
    chardevs = await qmp.execute("query-chardev")
    return {"qom-list": listings, "qom-get": properties, "query-chardev": chardevs}


def serial_ports(listings: Mapping[str, Any]) -> list[str]:
    """QOM paths of the virtio serial ports in ``qom-list`` replies keyed by container."""
    return [
        f"{container}/{child['name']}"
        for container in CONTAINERS
        for child in listings.get(container) or []
        if child.get("type") in PORT_TYPES
    ]


def agent_socket(replies: Mapping[str, Any]) -> AgentSocket | None:
    """The agent's port in replies as :func:`query_agent_replies` returns, or None when
    no port is named ``org.qemu.guest_agent.0``."""
    properties: Mapping[str, Mapping[str, Any]] = replies["qom-get"]
    found = [
        p for p in serial_ports(replies["qom-list"]) if properties[p].get("name") == AGENT_PORT
    ]
    if not found:
        return None
    device = found[0]
    label = str(properties[device].get("chardev") or "")
    chardev = next((c for c in replies["query-chardev"] if c["label"] == label), None)
    if chardev is None:
        return AgentSocket(
            device, label, "", None, f"the guest agent port {device} has no chardev", False, False
        )
    filename = str(chardev["filename"])
    path, problem = socket_from_filename(filename, label)
    connected = path is not None and not filename.startswith(_IDLE)
    return AgentSocket(
        device, label, filename, path, problem, connected, bool(chardev.get("frontend-open"))
    )


def socket_from_filename(filename: str, label: str) -> tuple[Path | None, str | None]:
    """The unix socket of a chardev's ``query-chardev`` filename (``unix:PATH,server=on``,
    ``disconnected:`` while no client is connected), or None and why it is not usable."""
    where = filename.removeprefix(_IDLE)
    kind = where.partition(":")[0] if ":" in where else where
    advice = "start QEMU with a unix socket chardev in server mode, or pass --guest-agent SOCKET"
    if kind != "unix":
        return None, (
            f"the guest agent's chardev {label} is {where!r}, not a unix socket: {advice}"
        )
    if not where.endswith(_SERVER):
        return None, (
            f"the guest agent's chardev {label} ({where}) connects out to its socket "
            f"instead of listening on it: {advice}"
        )
    path = where.removeprefix("unix:").removesuffix(_SERVER)
    if not path.startswith("/"):
        # An abstract socket has no file name; QEMU reports an empty path for it.
        return None, f"the guest agent's chardev {label} ({where}) has no socket file: {advice}"
    return Path(path), None


async def find_agent_socket(qmp: CommandRunner) -> AgentSocket | None:
    """The guest agent's port of the QEMU behind ``qmp``, or None when it has none
    (see :func:`agent_socket`).  QMPCommandError or DisconnectedError from the session."""
    return agent_socket(await query_agent_replies(qmp))
