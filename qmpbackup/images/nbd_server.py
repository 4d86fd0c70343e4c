"""A backing chain served read-only over NBD by ``qemu-nbd``, for any NBD client.

``qemu-nbd`` opens the top image (and through it the whole chain) read-only, serves
several clients at once and exports ``qemu:allocation-depth``; on a unix socket (0600:
it binds under umask 177) or TCP, with x509 TLS that verifies the client's certificate
and, given names, an allow-list of them. An encrypted chain is opened with the key of
:mod:`.keyed` (a ``secret`` object reading the file). The server never outlives the
process that started it: it gets SIGKILL from the kernel if that thread dies
(``PR_SET_PDEATHSIG``), and :func:`serving` stops it on leaving; the next server
removes the private folder a killed one left.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..errors import InvalidInputError
from .keyed import image_args, object_args
from .qemu_img import ImageError
from .qemu_nbd import remove_stale_folders, stop_process

log = structlog.get_logger("qmpbackup.nbd_server")

# Opening an encrypted chain whose key is a passphrase costs QEMU's default PBKDF2 time,
# 2 s, per layer.
READY_TIMEOUT = 120.0
# Clients served at once: nbdcopy opens 4 connections, nbdfuse and qemu-img 1 each.
CLIENTS = 16
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
# The private folder of a server: this prefix, the pid of its process, a random part.
_FOLDER = "qmpbackup-serve-"
_TLS_ID, _AUTHZ_ID = "qmpbackup-serve-tls", "qmpbackup-serve-authz"
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl
# The signals a serving process waits for: the child must not inherit them blocked.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Listen:
    """Where the server listens: a unix socket (``socket``; None: a new one in a private
    folder) or, with ``port``, TCP on ``bind``; ``tls_dir`` and ``tls_allow`` as for pull
    backups."""

    socket: Path | None = None
    port: int | None = None
    bind: str = "127.0.0.1"
    tls_dir: Path | None = None
    tls_allow: tuple[str, ...] = ()


def check_listen(where: Listen) -> None:
    """Refuse what cannot be served before anything starts: an existing socket path, a
    bad port, a port in use, a TLS folder without its files, names without TLS.
    Raises InvalidInputError with one line."""
    if where.socket is not None and where.port is not None:
        raise InvalidInputError("give --socket or --port, not both")
    if where.socket is not None:
        if os.path.lexists(where.socket):
            raise InvalidInputError(f"--socket {where.socket} exists: refusing to replace it")
        if not where.socket.parent.is_dir():
            raise InvalidInputError(f"--socket {where.socket}: no folder {where.socket.parent}")
    if where.port is not None:
        _check_port(where.bind, where.port)
    if where.tls_allow and where.tls_dir is None:
        raise InvalidInputError("--tls-allow needs --tls-dir")
    if where.tls_dir is not None:
        missing = [f for f in TLS_FILES if not os.access(where.tls_dir / f, os.R_OK)]
        if missing:
            raise InvalidInputError(f"--tls-dir {where.tls_dir} lacks {', '.join(missing)}")


def _check_port(bind: str, port: int) -> None:
    if not 0 < port < 65536:
        raise InvalidInputError(f"--port {port}: not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidInputError(f"--bind {bind}: {exc.strerror}") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidInputError(f"--port {port} on {bind}: {exc.strerror}") from None


def _tls_args(where: Listen) -> list[str]:
    if where.tls_dir is None:
        return []
    creds = f"tls-creds-x509,id={_TLS_ID},endpoint=server,verify-peer=on"
    argv = ["--object", f"{creds},dir={str(where.tls_dir.absolute()).replace(',', ',,')}"]
    argv += ["--tls-creds", _TLS_ID]
    if where.tls_allow:
        # JSON: a name holds commas, which the key=value syntax would split.
        rules = [{"match": dn, "format": "exact", "policy": "allow"} for dn in where.tls_allow]
        authz = {"qom-type": "authz-list", "id": _AUTHZ_ID, "policy": "deny", "rules": rules}
        argv += ["--object", json.dumps(authz), "--tls-authz", _AUTHZ_ID]
    return argv


def _host(bind: str) -> str:
    if bind in ("0.0.0.0", "::", ""):
        bind = socket.gethostname()
    return f"[{bind}]" if ":" in bind else bind


def uri(where: Listen, export: str, sock: Path | None) -> str:
    """The NBD URI of ``export`` served at ``where`` (``sock``: the unix socket)."""
    scheme = "nbds" if where.tls_dir is not None else "nbd"
    if where.port is not None:
        return f"{scheme}://{_host(where.bind)}:{where.port}/{export}"
    return f"{scheme}+unix:///{export}?socket={sock}"


def _child_setup() -> None:
    """In the child before exec: SIGKILL when the thread that started it dies, and the
    stop signals unblocked (the parent waits for them blocked)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _wait_ready(proc: subprocess.Popen[bytes], pid_file: Path, said: Path) -> None:
    """Wait for qemu-nbd's pid file, which it writes once the chain is open and the
    export made: it listens before it opens the images, so a connection that succeeds
    says nothing (a wrong key fails after it). RuntimeError with its words if it exits."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not pid_file.exists() or not pid_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(said.read_text().strip() or f"exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {READY_TIMEOUT:.0f} s")
        time.sleep(0.01)


@dataclass(frozen=True)
class Serving:
    """A running server: its URI and process (whose exit ends the service)."""

    uri: str
    process: subprocess.Popen[bytes]
    log: Path

    def said(self) -> str:
        """What the server wrote to its standard error."""
        return self.log.read_text().strip()


@contextlib.contextmanager
def serving(top: Path, export: str, where: Listen) -> Iterator[Serving]:
    """Serve the chain whose top image is ``top`` read-only as ``export`` at ``where``
    (checked with :func:`check_listen` first) until leaving; then the server is stopped
    and its socket and private folder removed. Raises ImageError with qemu-nbd's own
    words if it does not start."""
    check_listen(where)
    remove_stale_folders(_FOLDER)
    with tempfile.TemporaryDirectory(prefix=f"{_FOLDER}{os.getpid()}-") as private:
        sock = where.socket or Path(private) / f"{export}.sock"
        if where.port is not None:
            place = ["-p", str(where.port), "-b", where.bind]
        else:
            place = ["-k", str(sock)]
        pid_file = Path(private) / "qemu-nbd.pid"
        argv = ["qemu-nbd", "-r", "-t", "-A", "-e", str(CLIENTS), "-x", export, *place]
        argv += ["--pid-file", str(pid_file)]
        argv += [*object_args(), *_tls_args(where), *image_args(top.absolute())]
        said = Path(private) / "qemu-nbd.log"
        log.info("serve.start", image=str(top), export=export, port=where.port)
        with said.open("wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=_child_setup, umask=0o177,
            )  # fmt: skip
        try:
            try:
                _wait_ready(proc, pid_file, said)
            except RuntimeError as exc:
                raise ImageError(f"qemu-nbd: {' '.join(str(exc).split())}") from None
            yield Serving(uri(where, export, sock), proc, said)
        finally:
            stop_process(proc)
            if where.socket is not None:
                where.socket.unlink(missing_ok=True)
            log.info("serve.stop", export=export, status=proc.returncode)
