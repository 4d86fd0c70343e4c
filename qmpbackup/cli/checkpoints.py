"""The CLI's checkpoint commands.

``checkpoint-create``, ``checkpoint-create-as``, ``checkpoint-list``,
``checkpoint-dumpxml`` and ``checkpoint-delete``.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..api import VM
from ..errors import InvalidInputError
from ..planner.adopt import redefined
from ..request import load_checkpoint_spec
from ..request.models import CheckpointSpec, check_checkpoint_name
from .backups import agent_socket
from .text import checkpoint_tree, out, print_frozen, step_printer


async def cmd_checkpoint_create(args: argparse.Namespace, vm: VM) -> int:
    spec = load_checkpoint_spec(args.file)
    if args.redefine:
        # The state directory is a cache: a checkpoint made on another host is taken
        # over once this QEMU's bitmaps prove it; nothing is sent to QEMU.
        checkpoint = redefined(spec, await vm.graph(), vm.checkpoints())
        vm.adopt_checkpoints([checkpoint])
        root = spec.parent and not checkpoint.parent
        note = (
            f" (its parent {spec.parent} is not defined here: recorded as a root)" if root else ""
        )
        out(f"Domain checkpoint {checkpoint.name} redefined from '{args.file}'{note}")
        return 0
    checkpoint, frozen = await vm.checkpoint_create(
        spec, step_printer(args), args.quiesce, agent_socket(args)
    )
    print_frozen(frozen)
    out(f"Domain checkpoint {checkpoint.name} created from '{args.file}'")
    return 0


async def cmd_checkpoint_create_as(args: argparse.Namespace, vm: VM) -> int:
    try:
        spec = CheckpointSpec(name=check_checkpoint_name(args.name), description=args.description)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    checkpoint, frozen = await vm.checkpoint_create(
        spec, step_printer(args), args.quiesce, agent_socket(args)
    )
    print_frozen(frozen)
    out(f"Domain checkpoint {checkpoint.name} created")
    return 0


async def cmd_checkpoint_list(args: argparse.Namespace, vm: VM) -> int:
    checkpoints = vm.checkpoints()
    if args.name:
        for checkpoint in checkpoints:
            out(checkpoint.name)
    elif args.tree:
        for line in checkpoint_tree(checkpoints):
            out(line)
    else:
        out(f" {'Name':<20} {'Creation Time':<26} Parent")
        out("-" * 60)
        for c in checkpoints:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(c.creation_time))
            out(f" {c.name:<20} {stamp:<26} {c.parent or ''}")
        # A host that never saw the VM: what its disks' bitmaps show of the one-shot's
        # checkpoints, which the next backup into their repository adopts.
        from ..repo.orphans import find_orphans

        for found in await find_orphans(vm, None):
            out(
                f" ({found.name}: a one-shot checkpoint's bitmap on {', '.join(found.disks)}, "
                "not defined here; the next backup into its repository adopts it)"
            )
    return 0


async def cmd_checkpoint_dumpxml(args: argparse.Namespace, vm: VM) -> int:
    sys.stdout.write(await vm.checkpoint_xml(args.name, args.size))
    return 0


async def cmd_checkpoint_delete(args: argparse.Namespace, vm: VM) -> int:
    names = await vm.checkpoint_delete(
        args.name, args.children, args.metadata_only, step_printer(args)
    )
    for name in names:
        out(f"Domain checkpoint {name} deleted")
    return 0
