"""Quiescing a guest around a backup's instant, through qemu-guest-agent.

The agent is found from QEMU (its ``org.qemu.guest_agent.0`` port) or given, and
must answer before anything changes: ``--quiesce`` on a guest without a working
agent is refused.  The runner freezes and thaws around the one ``quiesce`` step
(:class:`~qmpbackup.runner.Freeze`); ``recover`` thaws a guest a killed run left
frozen (:func:`thaw_left_frozen`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence

import structlog

from .errors import GuestAgentError
from .qga.agent import GuestAgent
from .qga.discover import find_agent_socket
from .qmp.session import QMPSession
from .runner import Freeze

log = structlog.get_logger("qmpbackup.quiesce")


async def open_agent(session: QMPSession, given: str | None) -> GuestAgent:
    """The guest's agent at ``given``, or the one QEMU's agent port is connected to,
    connected and answering.  GuestAgentError when there is none or it does not answer.
    """
    path = given
    if path is None:
        found = await find_agent_socket(session)
        if found is None:
            raise GuestAgentError(
                "--quiesce needs qemu-guest-agent, and this VM has no org.qemu.guest_agent.0 "
                "port (add a virtserialport with that name, or pass --guest-agent SOCKET)"
            )
        path = str(found.socket_path())
        if found.client_connected:
            raise GuestAgentError(
                f"the guest agent socket {path} already has a client, and QEMU serves one at "
                "a time: close it (or pass --guest-agent with another agent's socket)"
            )
    return await GuestAgent.connect(path)


async def describe_agent(session: QMPSession) -> str | None:
    """For ``info``: the agent's socket, or why it cannot be used; None without one."""
    found = await find_agent_socket(session)
    if found is None:
        return None
    return str(found.path) if found.path is not None else f"unusable: {found.problem}"


@contextlib.asynccontextmanager
async def agent_freeze(
    session: QMPSession, wanted: bool, given: str | None
) -> AsyncIterator[Freeze | None]:
    """With ``wanted``, a :class:`Freeze` on the guest's agent (connected on entry, so
    that a missing agent is refused before anything changes; closed on exit); else None.
    Raises what :func:`open_agent` raises."""
    if not wanted:
        yield None
        return
    agent = await open_agent(session, given)
    try:
        yield Freeze(agent)
    finally:
        await agent.close()


async def thaw_left_frozen(agents: Sequence[str]) -> dict[str, str]:
    """Ask each agent whether its guest is frozen, and thaw it; the agents that could not
    be asked or thawed, with why.  An agent whose socket is gone is skipped: the QEMU
    that held the frozen guest is gone with it."""
    failed: dict[str, str] = {}
    for path in agents:
        if not os.path.exists(path):
            log.info("recover.agent_gone", agent=path)
            continue
        try:
            agent = await GuestAgent.connect(path)
            try:
                if await agent.status() == "frozen":
                    count = await agent.thaw()
                    log.info("recover.thawed", agent=path, filesystems=count)
            finally:
                await agent.close()
        except GuestAgentError as exc:
            failed[path] = str(exc)
    return failed
