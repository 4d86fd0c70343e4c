"""A proxy in front of QEMU's QMP socket that drops the connection at a chosen command.

The client connects to the proxy's socket; the proxy relays each connection to
QEMU's.  When the client sends the command ``cut`` matches, the proxy closes
both sides: ``before`` QEMU sees the command, or ``after`` QEMU ran it but
before its reply reaches the client (the client cannot know it happened).
With ``hold``, the command never reaches QEMU and the connection stays open: the
client waits for a reply forever, a fixed place to kill it at.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Match = Callable[[dict[str, Any]], bool]


def _messages(buffer: bytearray) -> list[dict[str, Any]]:
    """Pop the complete JSON objects at the start of ``buffer``."""
    decoder = json.JSONDecoder()
    found = []
    while True:
        text = bytes(buffer).decode(errors="replace")
        stripped = text.lstrip()
        if not stripped:
            buffer.clear()
            return found
        try:
            message, end = decoder.raw_decode(stripped)
        except ValueError:
            return found
        consumed = len((text[: len(text) - len(stripped)] + stripped[:end]).encode())
        del buffer[:consumed]
        found.append(message)


class QmpCutter:
    """Relays ``listen`` to ``upstream``; cuts the first connection that sends a command
    ``cut`` accepts.  ``cut_seen`` is set once that happened."""

    def __init__(
        self, listen: Path, upstream: Path, cut: Match, when: Literal["before", "after", "hold"]
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.cut = cut
        self.when = when
        self.cut_seen = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> QmpCutter:
        self._server = await asyncio.start_unix_server(self._relay, str(self.listen))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.listen.unlink(missing_ok=True)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        qemu_r, qemu_w = await asyncio.open_unix_connection(str(self.upstream))
        cut_id: list[Any] = []
        done = asyncio.Event()

        async def from_client() -> None:
            buffer = bytearray()
            while data := await client_r.read(65536):
                buffer += data
                for message in _messages(buffer):
                    if not self.cut_seen.is_set() and self.cut(message):
                        self.cut_seen.set()
                        if self.when == "hold":
                            while await client_r.read(65536):
                                pass
                            done.set()
                            return
                        if self.when == "before":
                            done.set()
                            return
                        cut_id.append(message.get("id"))
                    qemu_w.write(json.dumps(message).encode() + b"\r\n")
                    await qemu_w.drain()
            done.set()

        async def from_qemu() -> None:
            buffer = bytearray()
            while data := await qemu_r.read(65536):
                buffer += data
                for message in _messages(buffer):
                    if cut_id and "event" not in message and message.get("id") == cut_id[0]:
                        done.set()  # QEMU ran the command; its reply is lost
                        return
                    client_w.write(json.dumps(message).encode() + b"\r\n")
                    await client_w.drain()
            done.set()

        tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_qemu())]
        await done.wait()
        for task in tasks:
            task.cancel()
        for writer in (client_w, qemu_w):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
