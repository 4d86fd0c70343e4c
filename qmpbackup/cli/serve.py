"""The ``serve`` command: a backup's disk over NBD until SIGINT, SIGTERM or SIGHUP."""

from __future__ import annotations

import argparse
import ipaddress
import signal
from pathlib import Path

from ..errors import QmpBackupError
from ..images.keyed import using_key
from ..images.nbd_server import STOP_SIGNALS, Listen
from ..repo.encryption import require_key
from ..repo.repository import Repository
from ..repo.serve import Served, serve
from .progress import human_size


def _listen(args: argparse.Namespace) -> Listen:
    return Listen(
        socket=None if args.socket is None else Path(args.socket).absolute(),
        port=args.port,
        bind=args.bind,
        tls_dir=None if args.tls_dir is None else Path(args.tls_dir).absolute(),
        tls_allow=tuple(args.tls_allow or ()),
    )


def _describe(served: Served) -> None:
    uri = served.server.uri
    _say(
        f"Serving disk {served.disk} of backup {served.record.id} "
        f"({human_size(served.virtual_size)}, read-only) at {uri}"
    )
    _say("Layers (qemu:allocation-depth; 0: no backup holds it, reads as zeroes):")
    for layer in served.layers:
        _say(f"  {layer.depth}  backup {layer.backup_id} ({layer.level})  {layer.image}")
    _say(f"Map:   nbdinfo --map=qemu:allocation-depth '{uri}'")
    _say(f"Mount: nbdfuse -r DIR '{uri}'  or  guestfish --ro --format=raw -a '{uri}'")
    if served.server.uri.startswith("nbds"):
        # libnbd's tools take the client's x509 folder in the URI.
        joint = "&" if "?" in uri else "?"
        _say(
            f"TLS:   libnbd clients add {joint}tls-certificates=DIR (ca-cert.pem, client-cert.pem, "
            "client-key.pem) to the URI"
        )
    if served.server.uri.startswith("nbd://") and not _loopback(uri):
        _say("Warning: no TLS: anyone who reaches this address reads the disk (see --tls-dir)")
    _say("Stop with Ctrl-C or SIGTERM.")


def _loopback(uri: str) -> bool:
    host = uri.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _say(text: str) -> None:
    # Not out(): once whoever read the URI is gone (``| head -1``), the service goes on
    # silent, its lines dropped by the sturdy stdout (qmpbackup.cli.streams), not logged.
    print(text, flush=True)


def _wait(served: Served) -> None:
    """Until a stop signal arrives (blocked, so taken here) or the server exits."""
    process = served.server.process
    while process.poll() is None:
        if signal.sigtimedwait(STOP_SIGNALS, 0.5) is not None:
            return
    status = process.returncode
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    said = " ".join(served.server.said().split())
    raise QmpBackupError(f"qemu-nbd {how}" + (f": {said}" if said else ""))


def cmd_serve(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo, args.vm)
    require_key(repo, args.encrypt_key)
    # Blocked from before qemu-nbd starts: a signal during start-up is taken by _wait,
    # after which the server is stopped as on any other way out.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with using_key(args.encrypt_key), serve(repo, args.disk, args.backup, _listen(args)) as s:
            _describe(s)
            _wait(s)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _say("Stopped.")
    return 0
