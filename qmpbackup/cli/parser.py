"""The argument parser of ``qmpbackup``: global options, and each command with its handler."""

from __future__ import annotations

import argparse
import importlib
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .. import __version__

if TYPE_CHECKING:
    from ..api import VM

Handler = Callable[[argparse.Namespace, "VM"], Awaitable[int]]
OfflineHandler = Callable[[argparse.Namespace], int]
Adder = Callable[[str, Handler, str], argparse.ArgumentParser]
OfflineAdder = Callable[[str, OfflineHandler, str], argparse.ArgumentParser]


class _Handlers:
    """The handlers of one module of ``qmpbackup.cli``, imported when a command runs:
    a command pays only for the layers it uses (``restore`` never loads the planner)."""

    def __init__(self, module: str) -> None:
        self.module = f"{__package__}.{module}"

    def vm(self, name: str) -> Handler:
        async def run(args: argparse.Namespace, vm: VM) -> int:
            handler = getattr(importlib.import_module(self.module), name)
            return await cast(Handler, handler)(args, vm)

        return run

    def offline(self, name: str) -> OfflineHandler:
        def run(args: argparse.Namespace) -> int:
            handler = getattr(importlib.import_module(self.module), name)
            return cast(OfflineHandler, handler)(args)

        return run


backups, checkpoints, repository, pulls = (
    _Handlers("backups"), _Handlers("checkpoints"), _Handlers("repository"), _Handlers("pulls")
)  # fmt: skip
serving = _Handlers("serve")


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-dir", help="x509 folder for tls='yes': ca-cert.pem, server-cert.pem, server-key.pem"
    )
    parser.add_argument(
        "--tls-allow",
        action="append",
        metavar="DN",
        help="client certificate name allowed in, as QEMU renders it (repeatable)",
    )


def _secret_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret",
        action="append",
        metavar="NAME=FILE",
        help="the passphrase of an <encryption>'s <secret uuid=|usage=NAME>, which QEMU "
        "reads from FILE (repeatable)",
    )


def _encrypt_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encrypt-key",
        type=Path,
        metavar="FILE",
        help="the repository's images are LUKS-encrypted qcow2 with the passphrase in FILE, "
        "which QEMU reads (never on a command line)",
    )


def _quiesce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiesce",
        action="store_true",
        help="freeze the guest's filesystems through qemu-guest-agent around the instant",
    )
    parser.add_argument(
        "--guest-agent",
        metavar="SOCKET",
        help="the agent's socket (default: the one QEMU's org.qemu.guest_agent.0 port uses)",
    )


def _size(text: str) -> int:
    """A size in bytes, or with a K, M, G or T suffix (powers of 1024)."""
    found = re.fullmatch(r"([0-9]+)([KMGT]?)", text.strip().upper())
    if found is None or int(found[1]) == 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 256M or 1G)")
    return int(found[1]) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[found[2]]


def _backup_job_commands(add: Adder) -> None:
    p = add("backup-begin", backups.vm("cmd_backup_begin"), "start a push or pull backup")
    p.add_argument("spec", help="<domainbackup> XML, YAML or JSON file")
    p.add_argument("checkpoint", nargs="?", help="<domaincheckpoint> file or checkpoint name")
    _tls_arguments(p)
    _secret_arguments(p)
    _quiesce_arguments(p)
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")
    p.add_argument("--recover", action="store_true", help="clean an earlier run's leftovers first")
    p = add("backup-end", backups.vm("cmd_backup_end"), "end a backup job")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--abort", action="store_true", help="cancel a copy still running")
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")
    p = add("jobinfo", backups.vm("cmd_jobinfo"), "state of the backup job")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--json", action="store_true")


def _checkpoint_commands(add: Adder) -> None:
    p = add(
        "checkpoint-create",
        checkpoints.vm("cmd_checkpoint_create"),
        "create a checkpoint from a description",
    )
    p.add_argument("file")
    p.add_argument(
        "--redefine",
        action="store_true",
        help="take over a checkpoint dumped on another host (checkpoint-dumpxml), once "
        "this QEMU's bitmaps prove it; nothing is created",
    )
    p.add_argument("--show-steps", action="store_true")
    _quiesce_arguments(p)
    p = add(
        "checkpoint-create-as",
        checkpoints.vm("cmd_checkpoint_create_as"),
        "create a checkpoint by name",
    )
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--show-steps", action="store_true")
    _quiesce_arguments(p)
    p = add(
        "checkpoint-list", checkpoints.vm("cmd_checkpoint_list"), "list checkpoints, oldest first"
    )
    p.add_argument("--name", action="store_true", help="names only")
    p.add_argument("--tree", action="store_true", help="as a tree")
    p = add(
        "checkpoint-dumpxml", checkpoints.vm("cmd_checkpoint_dumpxml"), "<domaincheckpoint> XML"
    )
    p.add_argument("name")
    p.add_argument("--size", action="store_true", help="bytes dirtied since the checkpoint")
    p = add("checkpoint-delete", checkpoints.vm("cmd_checkpoint_delete"), "delete a checkpoint")
    p.add_argument("name")
    p.add_argument("--children", action="store_true")
    p.add_argument("--metadata-only", action="store_true")
    p.add_argument("--show-steps", action="store_true")


def _vm_commands(add: Adder) -> None:
    p = add(
        "plan",
        backups.vm("cmd_plan"),
        "print the QMP sequence backup-begin would send, send nothing",
    )
    p.add_argument("spec")
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--json", action="store_true", help="JSON list of QMP commands (default)")
    p.add_argument("--explain", action="store_true", help="each step with its reason and undo")
    _tls_arguments(p)
    _secret_arguments(p)
    _quiesce_arguments(p)
    p = add("backup", backups.vm("cmd_backup"), "one-shot backup into a repository")
    p.add_argument("--repo", type=Path, required=True, help="repository folder")
    _quiesce_arguments(p)
    _encrypt_argument(p)
    p.add_argument(
        "--level",
        choices=["full", "inc", "diff", "auto"],
        default="auto",
        help="auto: incremental where the disk's chain is valid, else full (default)",
    )
    p.add_argument("--mode", choices=["push", "pull"], default="push")
    p.add_argument(
        "--compress",
        action="store_true",
        help="qcow2 compressed clusters, zstd (zlib where QEMU has no zstd); "
        "a change of compression starts a new full",
    )
    p.add_argument("--disk", action="append", help="back up this disk (repeatable; default all)")
    p.add_argument("--no-progress", action="store_true", help="plain lines even on a terminal")
    p.add_argument(
        "--scratch-reserve",
        type=_size,
        default=None,
        metavar="SIZE",
        help="pull: room kept free beside each scratch, which otherwise grows with what the "
        "guest overwrites; a scratch that fills up ends the backup (default 256M)",
    )
    p.add_argument("--recover", action="store_true", help="clean an earlier run's leftovers first")
    p = add("recover", backups.vm("cmd_recover"), "clean what a crashed or killed run left")
    p.add_argument("--dry-run", action="store_true", help="say what would be cleaned, send nothing")
    p.add_argument(
        "--repo",
        type=Path,
        help="also remove the one-shot checkpoint bitmaps no backup of this repository made",
    )
    p.add_argument("--vm", help="VM folder in the repository (default: its only one)")
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")


def _repository_commands(add: OfflineAdder) -> None:
    vm_help = "VM folder in the repository (default: its only one)"
    p = add(
        "restore", repository.offline("cmd_restore"), "a standalone image of a disk at a backup"
    )
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help=vm_help)
    p.add_argument("--disk", required=True)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="new image file (never overwritten), or a block device to write over (--force)",
    )
    p.add_argument("--backup", help="backup id (default: the newest holding the disk)")
    p.add_argument(
        "--format", choices=["qcow2", "raw"], help="default: qcow2 for a file, raw for a device"
    )
    p.add_argument(
        "--force", action="store_true", help="write over the block device --out (never a file)"
    )
    p.add_argument(
        "--sparse",
        action="store_true",
        help="onto a block device: deallocate its zero ranges where it can (else zeroes)",
    )
    p.add_argument(
        "--instant",
        action="store_true",
        help="at once, whatever the size: a thin qcow2 backed by the backup's chain in the "
        "repository, to boot now and finish with blockpull",
    )
    _encrypt_argument(p)
    p = add(
        "verify", repository.offline("cmd_verify"), "check a repository's files, chains and digests"
    )
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help=vm_help)
    p.add_argument("--backup", help="only this backup and the chain it needs")
    _encrypt_argument(p)
    p = add(
        "prune",
        repository.offline("cmd_prune"),
        "keep the newest N backups, merging older ones away",
    )
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help=vm_help)
    p.add_argument(
        "--keep", type=int, help="backups to keep (at least 1); needed unless only clearing"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would happen, change nothing")
    p.add_argument(
        "--clear-stale-instant",
        action="store_true",
        help="remove the markers of instant restores whose overlay is gone or standalone "
        "(alone, without --keep: only that)",
    )
    _encrypt_argument(p)


def _pull_commands(add: Adder) -> None:
    p = add(
        "blockpull",
        pulls.vm("cmd_blockpull"),
        "copy what a disk reads from its backing chain into its top layer, then drop the link",
    )
    p.add_argument("disk")
    p.add_argument("--wait", action="store_true", help="follow the pull until it is complete")
    p.add_argument("--abort", action="store_true", help="stop the running pull")
    p.add_argument(
        "--bandwidth", type=_size, metavar="BYTES/S", help="copy at most this fast (say 50M)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, send nothing")
    p.add_argument("--no-progress", action="store_true", help="plain lines even on a terminal")
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r} (1-65535)")
    return int(text)


def _serve_command(add: OfflineAdder) -> None:
    p = add(
        "serve",
        serving.offline("cmd_serve"),
        "a disk at a backup, read-only over NBD (qemu-nbd), until SIGINT or SIGTERM",
    )
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help="VM folder in the repository (default: its only one)")
    p.add_argument("--disk", required=True, help="the disk, which is also the export's name")
    p.add_argument("--backup", help="backup id (default: the newest holding the disk)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", type=Path, help="unix socket to create (default: one in a private folder)"
    )
    where.add_argument("--port", type=_port, help="serve over TCP on this port")
    p.add_argument("--bind", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    _tls_arguments(p)
    _encrypt_argument(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qmpbackup``: each command's ``handler`` (run with a
    connected VM) or ``offline`` handler (run on a repository alone) is in its defaults."""
    parser = argparse.ArgumentParser(
        prog="qmpbackup", description="libvirt's backup API for bare QEMU, over QMP"
    )
    parser.add_argument("--version", action="version", version=f"qmpbackup {__version__}")
    parser.add_argument(
        "--qmp", default=os.environ.get("QMPBACKUP_QMP"), help="QMP socket or HOST:PORT"
    )
    parser.add_argument("--state-dir", type=Path, help="state directory (default: per VM)")
    parser.add_argument("--log-format", choices=["console", "json"], default="console")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler, offline=None)
        return p

    def add_offline(name: str, handler: OfflineHandler, help_text: str) -> argparse.ArgumentParser:
        """A command on a repository alone: no QEMU needed."""
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=None, offline=handler)
        return p

    _backup_job_commands(add)
    _checkpoint_commands(add)
    _vm_commands(add)
    _repository_commands(add_offline)
    _pull_commands(add)
    _serve_command(add_offline)
    p = add("info", backups.vm("cmd_info"), "QEMU version, capabilities, disks, chains and bitmaps")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="walk the slides' flows on a throwaway QEMU")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.set_defaults(handler=None, offline=None)
    return parser
