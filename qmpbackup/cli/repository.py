"""The CLI's commands on a repository alone, no QEMU needed.

``restore``, ``verify`` and ``prune`` (which, given ``--qmp``, also deletes the
checkpoints no backup needs any more).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..block_devices import is_block_device
from ..errors import InvalidInputError, QmpBackupError
from ..images.keyed import using_key
from ..repo.encryption import require_key
from ..repo.instant import instant_restore
from ..repo.prune import prune
from ..repo.repository import Repository
from ..repo.restore import restore
from ..repo.restore_device import restore_device
from ..repo.verify import verify
from .instant import instant_text
from .progress import human_size
from .text import out


def _repository(args: argparse.Namespace, reads_images: bool = True) -> Repository:
    repo = Repository.open(args.repo, args.vm)
    if reads_images:
        require_key(repo, args.encrypt_key)
    return repo


def cmd_restore(args: argparse.Namespace) -> int:
    repo = _repository(args)
    if args.instant:
        if args.force or args.sparse or args.format not in (None, "qcow2"):
            raise InvalidInputError(
                "--instant makes a new qcow2 overlay: "
                "--force, --sparse and --format raw cannot be used"
            )
        made = instant_restore(repo, args.disk, args.out, args.backup)
        for line in instant_text(made, args.encrypt_key):
            out(line)
        return 0
    device = is_block_device(args.out)
    if args.force and not device:
        raise InvalidInputError(f"--force writes only over a block device: {args.out} is not one")
    with using_key(args.encrypt_key):
        if device:
            result = restore_device(
                repo, args.disk, args.out, args.backup,
                fmt=args.format or "raw", force=args.force, sparse=args.sparse,
            )  # fmt: skip
        else:
            result = restore(repo, args.disk, args.out, args.backup, args.format or "qcow2")
    checked = "read back from the device" if device else "match the recorded digests"
    out(
        f"Disk {result.disk} of backup {result.backup_id} restored to {result.out} "
        f"({result.fmt}, {human_size(result.virtual_size)}, {result.blocks_checked} blocks "
        f"{checked})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    repo = _repository(args)
    with using_key(args.encrypt_key):
        report = verify(repo, args.backup)
    for problem in report.problems:
        out(str(problem))
    errors = sum(p.severity == "error" for p in report.problems)
    if errors:
        raise QmpBackupError(f"verify found {errors} errors (listed above)")
    out(
        f"{report.backups} backups verified: {report.files} files checked, "
        f"{report.blocks_read} blocks read"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    # Clearing stale instant-restore markers alone reads no image: no key needed.
    repo = _repository(args, reads_images=args.keep is not None)
    with using_key(args.encrypt_key):
        result = prune(repo, args.keep, args.dry_run, args.clear_stale_instant)
    would = "would be " if args.dry_run else ""
    for line in result.instant:
        out(line)
    for backup_id in result.removed:
        out(f"Backup {backup_id} {would}removed")
    for backup_id in result.rebased:
        out(f"Backup {backup_id} {would}made a standalone base")
    if args.dry_run or not result.released:
        return 0
    if not args.qmp:
        names = ", ".join(result.released)
        out(f"Checkpoints no backup needs any more: {names} (pass --qmp to delete them)")
        return 0
    # Here: the repository's commands load asyncio and the API only to talk to QEMU.
    import asyncio

    for name in asyncio.run(_release(args, result.released)):
        out(f"Domain checkpoint {name} deleted")
    return 0


async def _release(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    from ..api import VM
    from ..repo.backup import release_checkpoints

    vm = await VM.connect(args.qmp, args.state_dir)
    try:
        return await release_checkpoints(vm, names)
    finally:
        await vm.close()
