"""A backup image served writable over NBD by qemu-storage-daemon.

Pull copies write through QEMU's own qcow2 driver this way, so the files are
exactly what QEMU would write, and the copy can use several connections.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .child_process import stop_process, wait_listening
from .errors import QmpBackupError

STORAGE_DAEMON = os.environ.get("QMPBACKUP_STORAGE_DAEMON", "qemu-storage-daemon")


def create_image(path: Path, size: int, fmt: str = "qcow2", backing: Path | None = None) -> None:
    """Create a new image; refuse to touch an existing file."""
    if os.path.lexists(path):
        raise QmpBackupError(f"{path} exists: refusing to overwrite it")
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        # A relative backing path keeps a chain of backups movable as a folder.
        rel = os.path.relpath(backing, path.parent)
        args += ["-F", "qcow2", "-b", rel]
    args += [str(path), str(size)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise QmpBackupError(f"cannot create {path}: {proc.stderr.strip()}")


class TargetServer:
    """qemu-storage-daemon exporting one image, writable, on a private unix socket."""

    def __init__(self, image: Path, fmt: str = "qcow2") -> None:
        self.image = image
        self.fmt = fmt
        self._dir = Path(tempfile.mkdtemp(prefix="qmpbackup-target-"))
        self.socket = self._dir / "nbd.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """Where the image is served."""
        return f"nbd+unix:///target?socket={self.socket}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the daemon and wait for its socket."""
        argv = [
            STORAGE_DAEMON,
            "--blockdev", f"driver=file,filename={self.image},node-name=file",
            "--blockdev", f"driver={self.fmt},file=file,node-name=target",
            "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
            "--export", "type=nbd,id=target,node-name=target,name=target,writable=on",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        process = self._process

        def failure() -> str:
            return process.stderr.read().decode().strip() if process.stderr else "exited"

        try:
            wait_listening(process, self.socket, failure, timeout)
        except RuntimeError as exc:
            with contextlib.suppress(QmpBackupError):
                self.stop()
            raise QmpBackupError(f"qemu-storage-daemon failed: {exc}") from None

    def stop(self) -> None:
        """Stop the daemon (it flushes the image on exit) and remove the socket folder."""
        if self._process is not None:
            code = stop_process(self._process)
            err = self._process.stderr.read().decode() if self._process.stderr else ""
            if self._process.stderr is not None:
                self._process.stderr.close()
            self._process = None
            if code not in (0, -15):
                raise QmpBackupError(
                    f"qemu-storage-daemon exited with status {code}: {err.strip()}"
                )
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)

    def __enter__(self) -> TargetServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
