"""The ``qmpbackup`` command line: argument parsing and printing over :mod:`qmpbackup.api`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from .. import __version__
from ..api import VM
from ..errors import InvalidInputError, QmpBackupError, SpecError
from ..logconfig import configure_logging
from ..planner import PullOptions
from ..planner.plan import Step
from ..repo.backup import backup_to_repository, release_checkpoints
from ..repo.events import EventSink
from ..repo.prune import prune
from ..repo.repository import Repository
from ..repo.restore import restore
from ..repo.verify import verify
from ..request import load_backup_spec, load_checkpoint_spec
from ..request.models import CheckpointSpec, check_name
from ..results import JobInfo, VMInfo
from ..state.checkpoints import Checkpoint
from .progress import JsonLines, PlainLines, ProgressBar, human_size

Handler = Callable[[argparse.Namespace, VM], Awaitable[int]]
OfflineHandler = Callable[[argparse.Namespace], Awaitable[int]]


def _out(text: str = "") -> None:
    print(text, flush=True)


def _checkpoint_arg(value: str | None) -> CheckpointSpec | None:
    """A checkpoint description file, or a bare checkpoint name."""
    if value is None:
        return None
    if os.path.exists(value) or "/" in value or value.endswith((".xml", ".yaml", ".yml", ".json")):
        return load_checkpoint_spec(value)
    try:
        return CheckpointSpec(name=check_name(value, "checkpoint"))
    except ValueError as exc:
        raise SpecError(str(exc)) from exc


def _print_step(args: argparse.Namespace) -> Callable[[int, Step], None] | None:
    if not getattr(args, "show_steps", False):
        return None

    def show(number: int, step: Step) -> None:
        _out(f"[qmp] {json.dumps(step.command.to_qmp())}")

    return show


async def cmd_backup_begin(args: argparse.Namespace, vm: VM) -> int:
    spec = load_backup_spec(args.spec)
    checkpoint = _checkpoint_arg(args.checkpoint)
    begun = await vm.backup_begin(
        spec, checkpoint, _print_step(args), _pull_options(args), recover=args.recover
    )
    _out(f"Backup id {begun.record.id} created")
    _out(f"backup used description from '{args.spec}'")
    if checkpoint is not None:
        _out(f"checkpoint created from '{args.checkpoint}'")
    for disk in begun.record.disks:
        if disk.uri:
            _out(f"{disk.disk} {disk.uri}")
    return 0


def _pull_options(args: argparse.Namespace) -> PullOptions:
    tls_dir = getattr(args, "tls_dir", None)
    if tls_dir is not None and not os.path.isdir(tls_dir):
        raise InvalidInputError(f"--tls-dir {tls_dir}: no such directory")
    return PullOptions(
        tls_dir=os.path.abspath(tls_dir) if tls_dir else None,
        tls_allow=tuple(getattr(args, "tls_allow", None) or ()),
    )


async def cmd_backup_end(args: argparse.Namespace, vm: VM) -> int:
    ended = await vm.backup_end(args.id, args.abort, _print_step(args))
    if ended.outcome == "failed":
        detail = "; ".join(f"{d}: {e}" for d, e in ended.errors.items())
        extra = (
            f"; checkpoint {ended.dropped_checkpoint} removed" if ended.dropped_checkpoint else ""
        )
        if ended.removed_partial:
            extra += f"; partial target {', '.join(ended.removed_partial)} deleted"
        raise QmpBackupError(f"Backup id {ended.id} failed: {detail}{extra}")
    _out(f"Backup id {ended.id} {ended.outcome}")
    if ended.dropped_checkpoint:
        _out(f"Domain checkpoint {ended.dropped_checkpoint} deleted: its backup did not complete")
    for path in ended.removed_partial:
        _out(f"Partial target {path} deleted")
    return 0


def _size(value: float) -> str:
    return human_size(value, digits=3)


def _jobinfo_text(info: JobInfo) -> str:
    rows = [
        ("Job type", "Backup"),
        ("Backup id", str(info.id)),
        ("Mode", info.mode),
        ("Status", info.status),
        ("Time elapsed", f"{int(info.elapsed * 1000)} ms"),
        ("Data processed", _size(info.processed)),
        ("Data remaining", _size(max(info.total - info.processed, 0))),
        ("Data total", _size(info.total)),
        ("Rate", f"{_size(info.rate)}/s"),
    ]
    for disk in info.disks:
        value = f"{disk.status}, {_size(disk.processed)} of {_size(disk.total)}"
        if disk.uri:
            value += f", {disk.uri}"
        if disk.error:
            value += f", error: {disk.error}"
        rows.append((f"Disk {disk.disk}", value))
    return "\n".join(f"{label + ':':<18}{value}" for label, value in rows)


async def cmd_jobinfo(args: argparse.Namespace, vm: VM) -> int:
    if not vm.active_backups() and args.id is None:
        _out(json.dumps({"type": "none"}) if args.json else f"{'Job type:':<18}None")
        return 0
    info = await vm.job_info(args.id)
    if args.json:
        data = info.model_dump()
        data["rate"] = info.rate
        data["type"] = "backup"
        _out(json.dumps(data, indent=2))
    else:
        _out(_jobinfo_text(info))
    return 0


async def cmd_checkpoint_create(args: argparse.Namespace, vm: VM) -> int:
    spec = load_checkpoint_spec(args.file)
    checkpoint = await vm.checkpoint_create(spec, _print_step(args))
    _out(f"Domain checkpoint {checkpoint.name} created from '{args.file}'")
    return 0


async def cmd_checkpoint_create_as(args: argparse.Namespace, vm: VM) -> int:
    try:
        spec = CheckpointSpec(
            name=check_name(args.name, "checkpoint"), description=args.description
        )
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    checkpoint = await vm.checkpoint_create(spec, _print_step(args))
    _out(f"Domain checkpoint {checkpoint.name} created")
    return 0


def _tree(checkpoints: list[Checkpoint]) -> list[str]:
    lines: list[str] = []

    def walk(parent: str | None, indent: str) -> None:
        kids = [c for c in checkpoints if c.parent == parent]
        for index, child in enumerate(kids):
            last = index == len(kids) - 1
            lines.append(
                f"{indent}{'' if parent is None else ('└── ' if last else '├── ')}{child.name}"
            )
            walk(child.name, indent + ("" if parent is None else ("    " if last else "│   ")))

    walk(None, "")
    return lines


async def cmd_checkpoint_list(args: argparse.Namespace, vm: VM) -> int:
    checkpoints = vm.checkpoints()
    if args.name:
        for checkpoint in checkpoints:
            _out(checkpoint.name)
    elif args.tree:
        for line in _tree(checkpoints):
            _out(line)
    else:
        _out(f" {'Name':<20} {'Creation Time':<26} Parent")
        _out("-" * 60)
        for c in checkpoints:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(c.creation_time))
            _out(f" {c.name:<20} {stamp:<26} {c.parent or ''}")
    return 0


async def cmd_checkpoint_dumpxml(args: argparse.Namespace, vm: VM) -> int:
    sys.stdout.write(await vm.checkpoint_xml(args.name, args.size))
    return 0


async def cmd_checkpoint_delete(args: argparse.Namespace, vm: VM) -> int:
    names = await vm.checkpoint_delete(
        args.name, args.children, args.metadata_only, _print_step(args)
    )
    for name in names:
        _out(f"Domain checkpoint {name} deleted")
    return 0


async def cmd_plan(args: argparse.Namespace, vm: VM) -> int:
    spec = load_backup_spec(args.spec)
    planned = await vm.plan_backup(spec, _checkpoint_arg(args.checkpoint), _pull_options(args))
    if args.explain:
        _out(planned.plan.explain())
    else:
        _out(planned.plan.to_json())
    return 0


def _event_sink(args: argparse.Namespace) -> EventSink:
    """JSON lines with ``--log-format json``, a bar on a terminal, else plain lines."""
    if args.log_format == "json":
        return JsonLines(sys.stdout)
    if sys.stderr.isatty() and not getattr(args, "no_progress", False):
        return ProgressBar(sys.stderr)
    return PlainLines(sys.stdout)


async def cmd_backup(args: argparse.Namespace, vm: VM) -> int:
    await backup_to_repository(
        vm,
        args.repo,
        level=args.level,
        mode=args.mode,
        disks=args.disk,
        on_event=_event_sink(args),
        recover=args.recover,
    )
    return 0


async def cmd_recover(args: argparse.Namespace, vm: VM) -> int:
    planned = await (vm.plan_recover() if args.dry_run else vm.recover(_print_step(args)))
    for line in planned.summary():
        _out(line)
    for backup_id in planned.live_records:
        _out(f"backup id {backup_id} is running: left alone (end it with backup-end)")
    if not planned.needed:
        _out("Nothing to recover")
    elif not args.dry_run:
        _out("Recovered")
    return 0


def _repository(args: argparse.Namespace) -> Repository:
    return Repository.open(args.repo, args.vm)


async def cmd_restore(args: argparse.Namespace) -> int:
    result = restore(_repository(args), args.disk, args.out, args.backup, args.format)
    _out(
        f"Disk {result.disk} of backup {result.backup_id} restored to {result.out} "
        f"({result.fmt}, {human_size(result.virtual_size)}, "
        f"{result.blocks_checked} blocks match the recorded digests)"
    )
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(_repository(args), args.backup)
    for problem in report.problems:
        _out(str(problem))
    errors = sum(p.severity == "error" for p in report.problems)
    if errors:
        raise QmpBackupError(f"verify found {errors} errors (listed above)")
    _out(
        f"{report.backups} backups verified: {report.files} files checked, "
        f"{report.blocks_read} blocks read"
    )
    return 0


async def cmd_prune(args: argparse.Namespace) -> int:
    repo = _repository(args)
    result = prune(repo, args.keep, dry_run=args.dry_run)
    would = "would be " if args.dry_run else ""
    for backup_id in result.removed:
        _out(f"Backup {backup_id} {would}removed")
    for backup_id in result.rebased:
        _out(f"Backup {backup_id} {would}made a standalone base")
    if args.dry_run or not result.released:
        return 0
    if not args.qmp:
        names = ", ".join(result.released)
        _out(f"Checkpoints no backup needs any more: {names} (pass --qmp to delete them)")
        return 0
    vm = await VM.connect(args.qmp, args.state_dir)
    try:
        for name in await release_checkpoints(vm, result.released):
            _out(f"Domain checkpoint {name} deleted")
    finally:
        await vm.close()
    return 0


def _info_text(info: VMInfo) -> str:
    lines = [
        f"QEMU:          {info.version}",
        f"VM name:       {info.name or '-'}",
        "Capabilities:",
    ]
    for label, present in info.capabilities.items():
        lines.append(f"  {'yes' if present else 'no ':<4} {label}")
    lines.append("Disks:")
    graph = info.graph
    for disk in graph.disks.values():
        alias = f" (drive {disk.backend})" if disk.backend and disk.backend != disk.name else ""
        lines.append(f"  {disk.name}{alias}: attached to node {disk.root_node}")
        for depth, node_name in enumerate(disk.chain):
            node = graph.node(node_name)
            lines.append(
                f"    {'  ' * depth}{node.driver} {graph.image_path(node)} [{node_name}]"
                f" size={node.virtual_size}"
            )
            for b in node.bitmaps:
                flags = [
                    "recording" if b.recording else "disabled",
                    "persistent" if b.persistent else "transient",
                ]
                if b.inconsistent:
                    flags.append("INCONSISTENT")
                if b.busy:
                    flags.append("busy")
                lines.append(
                    f"    {'  ' * depth}  bitmap {b.name}: granularity={b.granularity} "
                    f"dirty={b.count} {' '.join(flags)}"
                )
    return "\n".join(lines)


async def cmd_info(args: argparse.Namespace, vm: VM) -> int:
    info = await vm.info()
    if args.json:
        data = info.model_dump(mode="json")
        _out(json.dumps(data, indent=2))
    else:
        _out(_info_text(info))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qmpbackup``."""
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

    p = add("backup-begin", cmd_backup_begin, "start a push or pull backup")
    p.add_argument("spec", help="<domainbackup> XML, YAML or JSON file")
    p.add_argument("checkpoint", nargs="?", help="<domaincheckpoint> file or checkpoint name")
    _tls_arguments(p)
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")
    p.add_argument("--recover", action="store_true", help="clean an earlier run's leftovers first")
    p = add("backup-end", cmd_backup_end, "end a backup job")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--abort", action="store_true", help="cancel a copy still running")
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")
    p = add("jobinfo", cmd_jobinfo, "state of the backup job")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--json", action="store_true")
    p = add("checkpoint-create", cmd_checkpoint_create, "create a checkpoint from a description")
    p.add_argument("file")
    p.add_argument("--show-steps", action="store_true")
    p = add("checkpoint-create-as", cmd_checkpoint_create_as, "create a checkpoint by name")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--show-steps", action="store_true")
    p = add("checkpoint-list", cmd_checkpoint_list, "list checkpoints, oldest first")
    p.add_argument("--name", action="store_true", help="names only")
    p.add_argument("--tree", action="store_true", help="as a tree")
    p = add("checkpoint-dumpxml", cmd_checkpoint_dumpxml, "<domaincheckpoint> XML")
    p.add_argument("name")
    p.add_argument("--size", action="store_true", help="bytes dirtied since the checkpoint")
    p = add("checkpoint-delete", cmd_checkpoint_delete, "delete a checkpoint")
    p.add_argument("name")
    p.add_argument("--children", action="store_true")
    p.add_argument("--metadata-only", action="store_true")
    p.add_argument("--show-steps", action="store_true")
    p = add("plan", cmd_plan, "print the QMP sequence backup-begin would send, send nothing")
    p.add_argument("spec")
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--json", action="store_true", help="JSON list of QMP commands (default)")
    p.add_argument("--explain", action="store_true", help="each step with its reason and undo")
    _tls_arguments(p)
    p = add("backup", cmd_backup, "one-shot backup into a repository")
    p.add_argument("--repo", type=Path, required=True, help="repository folder")
    p.add_argument(
        "--level",
        choices=["full", "inc", "diff", "auto"],
        default="auto",
        help="auto: incremental where the disk's chain is valid, else full (default)",
    )
    p.add_argument("--mode", choices=["push", "pull"], default="push")
    p.add_argument("--disk", action="append", help="back up this disk (repeatable; default all)")
    p.add_argument("--no-progress", action="store_true", help="plain lines even on a terminal")
    p.add_argument("--recover", action="store_true", help="clean an earlier run's leftovers first")
    p = add("recover", cmd_recover, "clean what a crashed or killed run left")
    p.add_argument("--dry-run", action="store_true", help="say what would be cleaned, send nothing")
    p.add_argument("--show-steps", action="store_true", help="print each QMP command sent")
    p = add_offline("restore", cmd_restore, "a standalone image of a disk at a backup")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help="VM folder in the repository (default: its only one)")
    p.add_argument("--disk", required=True)
    p.add_argument("--out", type=Path, required=True, help="new image file (never overwritten)")
    p.add_argument("--backup", help="backup id (default: the newest holding the disk)")
    p.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    p = add_offline("verify", cmd_verify, "check a repository's files, chains and digests")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help="VM folder in the repository (default: its only one)")
    p.add_argument("--backup", help="only this backup and the chain it needs")
    p = add_offline("prune", cmd_prune, "keep the newest N backups, merging older ones away")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--vm", help="VM folder in the repository (default: its only one)")
    p.add_argument("--keep", type=int, required=True, help="backups to keep (at least 1)")
    p.add_argument("--dry-run", action="store_true", help="say what would happen, change nothing")
    p = add("info", cmd_info, "QEMU version, capabilities, disks, chains and bitmaps")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="walk the slides' flows on a throwaway QEMU")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.set_defaults(handler=None, offline=None)
    return parser


async def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from ..demo.walk import run_demo

        return await run_demo(args.workdir, keep=args.keep, verbose=args.verbose)
    if args.offline is not None:
        offline: OfflineHandler = args.offline
        return await offline(args)
    if not args.qmp:
        raise InvalidInputError("no QMP socket: pass --qmp SOCKET|HOST:PORT or set QMPBACKUP_QMP")
    handler: Handler = args.handler
    # SIGTERM (systemd stopping the service) cancels like SIGINT: the run cleans up.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    vm = await VM.connect(args.qmp, args.state_dir)
    try:
        return await handler(args, vm)
    finally:
        await vm.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmpbackup`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    configure_logging(args.log_format, args.verbose)
    try:
        return asyncio.run(_run(args))
    except QmpBackupError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("error: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
