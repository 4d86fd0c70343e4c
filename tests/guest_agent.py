"""A minimal synchronous qemu-ga client for the tests: the guest of tests/guest.py
listens on a virtio-serial port that QEMU serves as a unix socket.  The product's
own agent client is separate; this one only drives the test guest."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from qmpbackup.errors import QmpBackupError


class GuestAgent:
    """A minimal synchronous qemu-ga client over the agent's unix socket (test support)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.next_id = int(time.time()) % 1_000_000
        self.sync()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any], delimit: bool = False) -> None:
        self.sock.sendall((b"\xff" if delimit else b"") + json.dumps(message).encode() + b"\n")

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpBackupError("the guest agent closed its socket")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def sync(self, attempt: float = 2.0) -> None:
        """``guest-sync-delimited`` until the agent answers with our id: drops whatever
        an earlier client or a restarted agent left in the channel."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.next_id += 1
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": self.next_id}}, True)
            try:
                until = min(deadline, time.monotonic() + attempt)
                while True:
                    line = self._line(until)
                    # The agent answers a delimited sync after a 0xFF byte.
                    line = line.rpartition(b"\xff")[2].strip()
                    if line and json.loads(line).get("return") == self.next_id:
                        return
            except (TimeoutError, ValueError):
                if time.monotonic() >= deadline:
                    raise QmpBackupError("the guest agent does not answer") from None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return``; QmpBackupError on an ``error``."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        reply = json.loads(self._line(time.monotonic() + self.timeout).rpartition(b"\xff")[2])
        if "error" in reply:
            raise QmpBackupError(f"guest agent {command}: {reply['error']}")
        return reply.get("return")

    def ping(self) -> None:
        """``guest-ping``."""
        self.execute("guest-ping")

    def fsfreeze_freeze(self) -> int:
        """Freeze the guest's filesystems; the number frozen."""
        return int(self.execute("guest-fsfreeze-freeze"))

    def fsfreeze_thaw(self) -> int:
        """Thaw them; the number thawed."""
        return int(self.execute("guest-fsfreeze-thaw"))

    def fsfreeze_status(self) -> str:
        """``frozen`` or ``thawed``."""
        return str(self.execute("guest-fsfreeze-status"))

    def shutdown(self, mode: str = "powerdown") -> None:
        """``guest-shutdown``: it never answers; the guest unmounts and powers off."""
        self._send({"execute": "guest-shutdown", "arguments": {"mode": mode}})
