"""The CLI's commands on a running VM's backups.

``backup-begin``, ``backup-end``, ``jobinfo``, ``plan``, the one-shot ``backup``,
``recover`` and ``info``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from ..api import VM
from ..blockpull import pulls
from ..errors import InvalidInputError, QmpBackupError, SpecError
from ..planner import BeginOptions
from ..repo.backup import DEFAULT_SCRATCH_RESERVE, backup_to_repository
from ..repo.events import EventSink
from ..request import load_backup_spec, load_checkpoint_spec
from ..request.models import CheckpointSpec, check_checkpoint_name
from .progress import JsonLines, PlainLines, ProgressBar
from .pulls import pull_lines, recover_lines
from .text import info_text, jobinfo_text, out, print_frozen, step_printer


def _checkpoint_arg(value: str | None) -> CheckpointSpec | None:
    """A checkpoint description file, or a bare checkpoint name."""
    if value is None:
        return None
    if os.path.exists(value) or "/" in value or value.endswith((".xml", ".yaml", ".yml", ".json")):
        return load_checkpoint_spec(value)
    try:
        return CheckpointSpec(name=check_checkpoint_name(value))
    except ValueError as exc:
        raise SpecError(str(exc)) from exc


async def cmd_backup_begin(args: argparse.Namespace, vm: VM) -> int:
    spec = load_backup_spec(args.spec)
    checkpoint = _checkpoint_arg(args.checkpoint)
    begun = await vm.backup_begin(
        spec, checkpoint, step_printer(args), _begin_options(args), recover=args.recover
    )
    print_frozen(begun.frozen_seconds)
    out(f"Backup id {begun.record.id} created")
    out(f"backup used description from '{args.spec}'")
    if checkpoint is not None:
        out(f"checkpoint created from '{args.checkpoint}'")
    for disk in begun.record.disks:
        if disk.uri:
            out(f"{disk.disk} {disk.uri}")
    return 0


def _begin_options(args: argparse.Namespace) -> BeginOptions:
    tls_dir = getattr(args, "tls_dir", None)
    if tls_dir is not None and not os.path.isdir(tls_dir):
        raise InvalidInputError(f"--tls-dir {tls_dir}: no such directory")
    return BeginOptions(
        tls_dir=os.path.abspath(tls_dir) if tls_dir else None,
        tls_allow=tuple(getattr(args, "tls_allow", None) or ()),
        quiesce=getattr(args, "quiesce", False),
        guest_agent=agent_socket(args),
        secrets=_secrets(getattr(args, "secret", None) or ()),
    )


def _secrets(given: Sequence[str]) -> dict[str, str]:
    """``--secret NAME=FILE`` options: NAME to FILE, absolute; the file is not read here
    (QEMU reads it), only checked to be there."""
    found: dict[str, str] = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidInputError(f"--secret {item!r}: expected NAME=FILE")
        if name in found:
            raise InvalidInputError(f"--secret {name}: given twice")
        if not os.path.isfile(path):
            raise InvalidInputError(f"--secret {name}: no such file {path}")
        found[name] = os.path.abspath(path)
    return found


def agent_socket(args: argparse.Namespace) -> str | None:
    """``--guest-agent SOCKET``, absolute; refused without ``--quiesce``."""
    path: str | None = getattr(args, "guest_agent", None)
    if path is not None and not args.quiesce:
        raise InvalidInputError("--guest-agent is only used with --quiesce")
    return os.path.abspath(path) if path else None


async def cmd_backup_end(args: argparse.Namespace, vm: VM) -> int:
    ended = await vm.backup_end(args.id, args.abort, step_printer(args))
    if ended.migration:
        out(ended.migration)
    if ended.outcome == "failed":
        detail = "; ".join(f"{d}: {e}" for d, e in ended.errors.items())
        extra = (
            f"; checkpoint {ended.dropped_checkpoint} removed" if ended.dropped_checkpoint else ""
        )
        if ended.removed_partial:
            extra += f"; partial target {', '.join(ended.removed_partial)} deleted"
        raise QmpBackupError(f"Backup id {ended.id} failed: {detail}{extra}")
    out(f"Backup id {ended.id} {ended.outcome}")
    if ended.dropped_checkpoint:
        out(f"Domain checkpoint {ended.dropped_checkpoint} deleted: its backup did not complete")
    for path in ended.removed_partial:
        out(f"Partial target {path} deleted")
    return 0


async def cmd_jobinfo(args: argparse.Namespace, vm: VM) -> int:
    if not vm.active_backups() and args.id is None:
        running = await pulls(vm)
        if running and args.json:
            pulled = [dict(asdict(p), type="blockpull") for p in running]
            out(json.dumps(pulled[0] if len(pulled) == 1 else pulled, indent=2))
        elif running:
            out("\n".join(pull_lines(running)))
        else:
            out(json.dumps({"type": "none"}) if args.json else f"{'Job type:':<18}None")
        return 0
    info = await vm.job_info(args.id)
    if args.json:
        data = info.model_dump()
        data["rate"] = info.rate
        data["type"] = "backup"
        out(json.dumps(data, indent=2))
    else:
        out(jobinfo_text(info))
    return 0


async def cmd_plan(args: argparse.Namespace, vm: VM) -> int:
    spec = load_backup_spec(args.spec)
    planned = await vm.plan_backup(spec, _checkpoint_arg(args.checkpoint), _begin_options(args))
    if args.explain:
        out(planned.plan.explain())
    else:
        out(planned.plan.to_json())
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
        scratch_reserve=args.scratch_reserve or DEFAULT_SCRATCH_RESERVE,
        quiesce=args.quiesce,
        guest_agent=agent_socket(args),
        encrypt_key=args.encrypt_key,
        compress=args.compress,
    )
    return 0


async def cmd_recover(args: argparse.Namespace, vm: VM) -> int:
    planned = await (vm.plan_recover() if args.dry_run else vm.recover(step_printer(args)))
    for line in planned.summary():
        out(line)
    for backup_id in planned.live_records:
        out(f"backup id {backup_id} is running: left alone (end it with backup-end)")
    for line in recover_lines(await pulls(vm)):
        out(line)
    orphans = await _orphans(args, vm)
    if not planned.needed and not orphans:
        out("Nothing to recover")
    elif not args.dry_run:
        out("Recovered")
    return 0


async def _orphans(args: argparse.Namespace, vm: VM) -> bool:
    """Orphan bitmaps: listed, and removed unless ``--dry-run`` when ``--repo`` proves
    them; without ``--repo``, the candidates listed. True when there were any."""
    from ..repo.orphans import find_orphans, remove_orphans
    from ..repo.repository import Repository

    repo = Repository.open(args.repo, args.vm) if args.repo else None
    found = await find_orphans(vm, repo)
    for orphan in found:
        where = ", ".join(orphan.disks)
        if repo is None:
            out(
                f"bitmap {orphan.name} on {where}: a one-shot checkpoint no state here knows "
                "(pass --repo to check it against its repository; a backup into it adopts it)"
            )
        elif args.dry_run:
            out(f"orphan bitmap {orphan.name} on {where}: no backup of {repo.base} made it")
    if repo is not None and not args.dry_run:
        for name in await remove_orphans(vm, found):
            out(f"orphan bitmap {name} removed: no backup of {repo.base} made it")
    return bool(found)


async def cmd_info(args: argparse.Namespace, vm: VM) -> int:
    info = await vm.info()
    if args.json:
        data = info.model_dump(mode="json")
        out(json.dumps(data, indent=2))
    else:
        out(info_text(info))
    return 0
