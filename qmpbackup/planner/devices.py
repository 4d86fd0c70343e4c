"""Block devices and encrypted images as backup destinations, shared by push and pull.

A block device (``type='block'``) is used as it is: it must exist and be a block
device, and is never created, truncated or removed; a device that holds a mounted
filesystem, that the kernel built another device on, or that this QEMU has open is
refused, so that a backup never overwrites something in use.  As libvirt does, a
qcow2 target or scratch is formatted onto the device (``blockdev-create`` over a
``host_device`` node) unless ``reuse='yes'`` says to open its qcow2 as it is.

An encrypted target or scratch (``<encryption format='luks'>``) is qcow2 with LUKS
encryption, created and opened by QEMU with a ``secret`` object that QEMU reads from
the file given with ``--secret NAME=FILE``: the passphrase is never in a command.
"""

from __future__ import annotations

from typing import Literal

from ..errors import InvalidInputError
from ..qapi.commands import LuksEncryption
from ..qapi.objects import ObjectDel, SecretAdd
from . import naming
from .disks import DiskChoice, DiskContext
from .facts import BackupFacts
from .plan import Step

# qcow2 at its fullest, beyond the data: a table entry of 8 bytes per 64 KiB cluster
# (L2), a refcount of 2 bytes per cluster, the header, L1 and refcount tables.
_QCOW2_CLUSTER = 64 * 1024
_QCOW2_FIXED = 1 << 20


def qcow2_room(size: int) -> int:
    """Bytes a qcow2 image of ``size`` virtual bytes (64 KiB clusters) can take at most."""
    clusters = -(-size // _QCOW2_CLUSTER)
    return size + clusters * (8 + 2) + _QCOW2_FIXED


def file_driver(choice: DiskChoice) -> Literal["file", "host_device"]:
    """The protocol driver of a target or scratch: ``host_device`` for a block device."""
    return "host_device" if choice.device else "file"


def refuse_device(choice: DiskChoice, facts: BackupFacts) -> None:
    """Raise InvalidInputError for a ``type='block'`` destination that is not a block
    device, or that is in use: mounted, held by another kernel device, open in QEMU."""
    if not choice.device:
        return
    what = f"{'scratch' if choice.export else 'target'} {choice.target} of {choice.disk}"
    found = facts.devices.get(choice.target)
    if found is None or found.kind == "missing":
        raise InvalidInputError(f"block device {what} does not exist")
    if found.kind != "block":
        raise InvalidInputError(f"{what} is not a block device (type='block')")
    if found.mounts:
        raise InvalidInputError(
            f"block device {what} holds a filesystem mounted at {', '.join(found.mounts)}"
        )
    if found.holders:
        raise InvalidInputError(
            f"block device {what} is in use by {', '.join(found.holders)} (device-mapper, md…)"
        )
    if found.qemu_nodes:
        raise InvalidInputError(
            f"block device {what} is already open in QEMU (node {', '.join(found.qemu_nodes)})"
        )


def device_size(context: DiskContext, choice: DiskChoice, needed: int, what: str) -> int:
    """The size of ``choice``'s block device; InvalidInputError if under ``needed`` bytes."""
    found = context.facts.devices[choice.target]
    if found.size < needed:
        raise InvalidInputError(
            f"block device {choice.target} ({found.size} bytes) is too small for {what} "
            f"of {choice.disk} ({needed} bytes)"
        )
    return found.size


def secret_objects(facts: BackupFacts, choice: DiskChoice) -> tuple[str, ...]:
    """The objects a disk's backup holds in QEMU besides nodes: its secret, if encrypted."""
    return () if choice.secret is None else (naming.secret_object(facts.backup_id, choice.disk),)


def secret_steps(
    context: DiskContext, choice: DiskChoice
) -> tuple[list[Step], LuksEncryption | None, tuple[str, ...]]:
    """For an encrypted target or scratch: the step loading its passphrase into a
    ``secret`` object (QEMU reads the file), the ``encrypt`` options naming it, and the
    object's id; nothing for one not encrypted.

    Raises InvalidInputError when no ``--secret`` names the passphrase.
    """
    if choice.secret is None:
        return [], None, ()
    path = context.options.secrets.get(choice.secret)
    if path is None:
        raise InvalidInputError(
            f"disk {choice.disk!r} is encrypted with the secret {choice.secret!r}: "
            f"pass --secret {choice.secret}=FILE"
        )
    secret = naming.secret_object(context.facts.backup_id, choice.disk)
    what = "scratch" if choice.export else "target"
    step = Step(
        command=SecretAdd(id=secret, file=path),
        reason=f"load the passphrase of the encrypted {what} of {choice.disk} from {path}",
        undo=(ObjectDel(id=secret),),
    )
    return [step], LuksEncryption(key_secret=secret), (secret,)
