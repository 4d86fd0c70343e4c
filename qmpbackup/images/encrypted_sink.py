"""Where a pull copy writes in an encrypted repository: a new LUKS qcow2 that QEMU writes.

The built-in writer (:mod:`.qcow2_writer`) cannot encrypt, and no encryption here is
ours. :func:`~.qemu_img.create_encrypted` makes the image beforehand (``encrypt.format=
luks``, the backing file named relative to the image as push images are; the one-shot
makes every disk's at once); ``qemu-nbd`` opens it writable without
its backing chain (the copy writes whole clusters: nothing is read from below) on a unix
socket, 0600 in a 0700 folder of its own; the copy writes through the built-in NBD
client: data as WRITE, zeroes over a backing as WRITE_ZEROES (qcow2 zero clusters),
zeroes of a full left unallocated. Both tools get the key as a ``secret`` object that
reads the key file (:mod:`.keyed`). Each block is hashed on its way in with the
repository's keyed BLAKE3, as the plain writer does; the finished file is read once
(from the page cache, mostly) for its file digest.

qemu-nbd never outlives the copy: :meth:`EncryptedSink.finish` and
:meth:`EncryptedSink.abandon` stop it, and it gets SIGKILL from the kernel if the thread
that started it dies (``PR_SET_PDEATHSIG``), the process killed included.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from ..errors import QmpBackupError
from ..nbd import NBDClient, NBDError
from ..nbd.copy import Done, NBDSink
from . import keyed
from .qcow2_reader import file_digest
from .qcow2_writer import CLUSTER
from .qemu_img import ImageError
from .qemu_nbd import remove_stale_folders, stop_process, wait_listening

# Measured on 2 CPUs, QEMU 7.2, a copy of 1.4 GiB of data (1 GiB written) from qemu-nbd
# into the sink, 3 runs each, CPU seconds of qemu-nbd / of this process (medians): 2
# connections, 2 senders 2.5/1.9; 1 connection 2.4/1.7; 1 sender 2.3/1.6; --cache unsafe
# 2.3/1.7; glibc's mmap threshold raised 2.3/1.8: all within the noise, 6.9-7.3 s wall.
# --cache none (O_DIRECT) leaves the image out of the page cache: its file digest then
# reads it back from the disk (+4 s).
CONNECTIONS = 2
SENDERS = 2  # threads hashing and sending the copy's writes
CACHE = "writeback"
AIO = "threads"

# The private folder of a sink: this prefix, the pid of the process that made it, a
# random part (tempfile.mkdtemp).
_FOLDER = "qmpbackup-sink-"
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it dies (SIGTERM
    would first flush what it holds of an image nobody will keep)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _said(log: Path, proc: subprocess.Popen[bytes] | None) -> str:
    """What a qemu-nbd that exited said, or its exit status if it said nothing."""
    said = log.read_text().strip()
    status = None if proc is None else proc.returncode
    return said or f"qemu-nbd exited with status {status}"


class _Both:
    """``done`` once both the hash and the NBD write of one store are done: the first
    error, or None."""

    __slots__ = ("done", "error", "left", "lock")

    def __init__(self, done: Done) -> None:
        self.done = done
        self.error: NBDError | None = None
        self.left = 2
        self.lock = threading.Lock()

    def __call__(self, error: NBDError | None) -> None:
        with self.lock:
            self.error = self.error or error
            self.left -= 1
            if self.left:
                return
        self.done(self.error)


class EncryptedSink:
    """The copy's sink (:class:`qmpbackup.nbd.copy.Sink`) for the new encrypted image
    ``out`` of ``size`` bytes over ``backing`` (None: a full), made by
    :func:`~.qemu_img.create_encrypted` and keyed by the key file set with
    :func:`keyed.using_key` in the calling thread.

    Raises QmpBackupError if ``out`` is not a file, ImageError if qemu-nbd fails.
    """

    block = CLUSTER

    def __init__(self, out: Path, size: int, backing: Path | None) -> None:
        key = keyed.key_file()
        if key is None:
            raise ValueError("an encrypted image needs a key file (keyed.using_key)")
        if not out.is_file():
            raise QmpBackupError(f"{out}: no such image to write (create_encrypted makes it)")
        self.out, self.size, self.backing = out, size, backing
        self.blocks: dict[int, bytes] = {}
        self._digest_key = keyed.digest_key()
        self._zeroes: dict[int, bytes] = {}
        self._file_digest: str | None = None
        remove_stale_folders(_FOLDER)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{_FOLDER}{os.getpid()}-"))
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="qmpbackup-send")
        self._proc: subprocess.Popen[bytes] | None = None
        self._dest: NBDClient | None = None
        try:
            self._dest = self._serve(key)
        except BaseException:
            self.abandon()
            raise
        self._nbd = NBDSink(self._dest, skip_zeroes=backing is None)
        self.max_request = self._nbd.max_request

    def _serve(self, key: Path) -> NBDClient:
        """Start qemu-nbd on the new image; a client with :data:`CONNECTIONS` to it."""
        sock = self._dir / "sink.sock"
        log = self._dir / "qemu-nbd.log"
        image = {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(self.out.absolute())},
            "backing": None,
            "encrypt": {"key-secret": keyed.SECRET_ID},
        }
        argv = ["qemu-nbd", *keyed.object_args(), "--persistent", "--shared", str(CONNECTIONS + 1),
                "--cache", CACHE, "--aio", AIO, "--socket", str(sock), "--export-name", "disk",
                "--format", "qcow2", "json:" + json.dumps(image)]  # fmt: skip
        with log.open("w") as err:
            # umask: the socket is bound 0600.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                umask=0o177,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_listening(self._proc, sock, lambda: _said(log, self._proc))
            return NBDClient.connect(f"nbd+unix:///disk?socket={sock}", connections=CONNECTIONS)
        except (RuntimeError, NBDError) as exc:
            raise ImageError(f"qemu-nbd cannot serve {self.out}: {exc}") from None

    def write(self, offset: int, data: memoryview, done: Done) -> None:
        both = _Both(done)
        self._pool.submit(self._send, offset, data, both)

    def _send(self, offset: int, data: memoryview, done: _Both) -> None:
        """Send ``data`` to qemu-nbd, and hash it while it is on its way (on a sender)."""
        try:
            self._nbd.write(offset, data, done)
        except NBDError as exc:
            done(exc)
        except BaseException as exc:  # on this thread: the copy must hear of it
            done(NBDError(f"write of {len(data)} bytes at offset {offset} failed: {exc}"))
        key, first, blocks = self._digest_key, offset // CLUSTER, self.blocks
        for i, start in enumerate(range(0, len(data), CLUSTER)):
            piece = data[start : start + CLUSTER]
            hasher = blake3.blake3(piece) if key is None else blake3.blake3(piece, key=key)
            blocks[first + i] = hasher.digest()
        done(None)

    def zero(self, offset: int, length: int, done: Done) -> None:
        first, end = offset // CLUSTER, -(-(offset + length) // CLUSTER)
        for index in range(first, end):
            self.blocks[index] = self._zero_digest(min(CLUSTER, self.size - index * CLUSTER))
        self._nbd.zero(offset, length, done)

    def _zero_digest(self, length: int) -> bytes:
        found = self._zeroes.get(length)
        if found is None:
            key, zeroes = self._digest_key, bytes(length)
            hasher = blake3.blake3(zeroes) if key is None else blake3.blake3(zeroes, key=key)
            found = self._zeroes[length] = hasher.digest()
        return found

    def hashed(self) -> tuple[dict[int, bytes], str | None]:
        """The blocks' digests (zeroed blocks included) and, once finished, the file
        digest (format 2)."""
        return self.blocks, self._file_digest

    def finish(self) -> None:
        """Flush, stop qemu-nbd, make the image durable and take its file digest.
        ImageError if qemu-nbd fails to close the image."""
        self._pool.shutdown()
        assert self._dest is not None and self._proc is not None
        self._dest.flush()
        self._dest.close()
        self._dest = None
        status = stop_process(self._proc)
        proc, self._proc = self._proc, None
        if status != 0:
            said = (self._dir / "qemu-nbd.log").read_text().strip()
            raise ImageError(f"qemu-nbd could not close {self.out} (status {proc.returncode}): "
                             f"{said}")  # fmt: skip
        shutil.rmtree(self._dir, ignore_errors=True)
        fd = os.open(self.out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._file_digest = file_digest(self.out)

    def abandon(self) -> None:
        """Stop everything and remove the unfinished image."""
        self._pool.shutdown(cancel_futures=True)
        if self._dest is not None:
            self._dest.close()
            self._dest = None
        if self._proc is not None:
            # Killed, not stopped: a stop would first flush an image about to be removed.
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)
        self.out.unlink(missing_ok=True)
