"""The CLI's ``blockpull``: start, follow (``--wait``) or stop (``--abort``) a disk's pull;
and the pulls ``jobinfo`` and ``recover`` mention.

A pull that ends with the image standalone releases the instant-restore marker that
names it (found in the repository its backing files were in).
"""

from __future__ import annotations

import argparse
import sys

from ..api import VM
from ..blockpull import (
    PullState,
    blockpull_abort,
    blockpull_start,
    blockpull_wait,
    forget_pull,
    plan_pull,
    pull_state,
    started_pull,
)
from ..errors import InvalidInputError
from ..repo.events import BackupEvent, EventSink
from ..repo.instant import release_markers
from .progress import JsonLines, PlainLines, ProgressBar, human_size
from .text import out, size_text, step_printer


def _sink(args: argparse.Namespace) -> EventSink:
    """JSON lines with ``--log-format json``, a bar on a terminal, else plain lines."""
    if args.log_format == "json":
        return JsonLines(sys.stdout)
    if sys.stderr.isatty() and not args.no_progress:
        return ProgressBar(sys.stderr)
    return PlainLines(sys.stdout)


async def cmd_blockpull(args: argparse.Namespace, vm: VM) -> int:
    if args.abort and (args.wait or args.bandwidth is not None):
        raise InvalidInputError("--abort stops a pull: it takes neither --wait nor --bandwidth")
    if args.dry_run:
        out((await plan_pull(vm, args.disk, args.bandwidth)).explain() or "Nothing to send")
        return 0
    if args.abort:
        state = await blockpull_abort(vm, args.disk, step_printer(args))
        if state.standalone:  # the pull ended before the cancel reached it
            _release(vm, state)
            out(f"Pull of {state.disk} had completed: {state.image} is standalone")
        else:
            out(f"Pull of {state.disk} aborted: {state.image} still reads {state.backing[0]}")
        return 0
    before = await pull_state(vm, args.disk)
    if before.standalone:
        _release(vm, before)
        out(f"Disk {before.disk} has no backing file: nothing to pull")
        return 0
    await blockpull_start(vm, args.disk, args.bandwidth, step_printer(args))
    sink = _sink(args)
    sink(BackupEvent("pull-begin", disk=before.disk, message=before.image))
    if not args.wait:
        out(f"Pull of {before.disk} started (job {before.job}): follow it with jobinfo")
        return 0

    def progress(done: int, total: int) -> None:
        sink(BackupEvent("progress", disk=before.disk, done=done, total=total))

    final = await blockpull_wait(vm, args.disk, progress)
    sink(BackupEvent("pull-done", disk=final.disk, message=final.image))
    _release(vm, before)
    out("Pull complete")
    return 0


def _release(vm: VM, state: PullState) -> None:
    """Remove the instant-restore markers of ``state``'s image, now standalone, found
    through the files it read (``state``'s, or those saved when its pull started)."""
    started = started_pull(vm, state.disk)
    backing = [*state.backing, *(started.backing if started else ())]
    for path in release_markers(state.image, backing):
        out(f"Instant-restore marker {path.name} removed: {state.image} no longer reads it")
    forget_pull(vm, state.disk)


def pull_lines(states: list[PullState]) -> list[str]:
    """``jobinfo``'s table for each running pull."""
    lines: list[str] = []
    for state in states:
        rows = [
            ("Job type", "Block pull"),
            ("Disk", state.disk),
            ("Job", state.job),
            ("Status", state.status or "none"),
            ("Data processed", size_text(state.processed)),
            ("Data remaining", size_text(max(state.total - state.processed, 0))),
            ("Data total", size_text(state.total)),
            ("Image", state.image),
            ("Backing", ", ".join(state.backing) or "none"),
        ]
        lines += [f"{label + ':':<18}{value}" for label, value in rows]
    return lines


def recover_lines(states: list[PullState]) -> list[str]:
    """What ``recover`` says of each running pull, which it leaves alone."""
    return [
        f"blockpull of disk {s.disk} is running (job {s.job}, {human_size(s.processed)} of "
        f"{human_size(s.total)}): left alone, its image is valid at every instant "
        f"(stop it with 'blockpull {s.disk} --abort')"
        for s in states
    ]
