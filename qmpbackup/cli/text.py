"""What the CLI prints: its lines, the QMP steps it shows, and its tables and trees.

The texts of ``jobinfo``, ``info`` and ``checkpoint-list --tree``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .progress import frozen_line, human_size
from .streams import emit

if TYPE_CHECKING:
    from ..planner.plan import Step
    from ..results import JobInfo, VMInfo
    from ..state.checkpoints import Checkpoint


def out(text: str = "") -> None:
    """Print one line of the command's output, at once; once stdout's reader is gone,
    log it instead (stderr, the journal), so that the result is not lost."""
    emit(text, sys.stdout)


def step_printer(args: argparse.Namespace) -> Callable[[int, Step], None] | None:
    """With ``--show-steps``, a callback printing each QMP command as it is sent."""
    if not getattr(args, "show_steps", False):
        return None

    def show(number: int, step: Step) -> None:
        out(f"[qmp] {json.dumps(step.command.to_qmp())}")

    return show


def size_text(value: float) -> str:
    """A byte count as ``jobinfo`` shows it."""
    return human_size(value, digits=3)


def jobinfo_text(info: JobInfo) -> str:
    """``jobinfo``'s table, in the manner of ``virsh domjobinfo``."""
    rows = [
        ("Job type", "Backup"),
        ("Backup id", str(info.id)),
        ("Mode", info.mode),
        ("Status", info.status),
        ("Time elapsed", f"{int(info.elapsed * 1000)} ms"),
        ("Data processed", size_text(info.processed)),
        ("Data remaining", size_text(max(info.total - info.processed, 0))),
        ("Data total", size_text(info.total)),
        ("Rate", f"{size_text(info.rate)}/s"),
    ]
    for disk in info.disks:
        value = f"{disk.status}, {size_text(disk.processed)} of {size_text(disk.total)}"
        if disk.uri:
            value += f", {disk.uri}"
        if disk.error:
            value += f", error: {disk.error}"
        rows.append((f"Disk {disk.disk}", value))
    return "\n".join(f"{label + ':':<18}{value}" for label, value in rows)


def checkpoint_tree(checkpoints: list[Checkpoint]) -> list[str]:
    """``checkpoint-list --tree``: each checkpoint under its parent."""
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


def info_text(info: VMInfo) -> str:
    """``info``: QEMU, its capabilities, and each disk's chain and bitmaps."""
    lines = [
        f"QEMU:          {info.version}",
        f"VM name:       {info.name or '-'}",
        f"Guest agent:   {info.guest_agent or 'none (no org.qemu.guest_agent.0 port)'}",
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
                owner = info.owners.get(f"{disk.name}/{b.name}")
                lines.append(
                    f"    {'  ' * depth}  bitmap {b.name}: granularity={b.granularity} "
                    f"dirty={b.count} {' '.join(flags)}" + (f"; {owner}" if owner else "")
                )
    return "\n".join(lines)


def print_frozen(seconds: float | None) -> None:
    """``guest frozen for N ms`` after a quiesced instant (nothing without one)."""
    if seconds is not None:
        out(frozen_line(seconds))
