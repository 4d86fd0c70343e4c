"""Pull mode's fleecing scratch: a file or a block device, plain or encrypted, whose
room is reserved whole or bounded by a reserve file and a write threshold.

The scratch keeps what the guest overwrites after the instant; if it filled up,
QEMU's copy-before-write would fail the guest's writes, so its room is made sure of
before anything starts: a file is preallocated for the whole disk (or bounded, see
:class:`~qmpbackup.planner.facts.BeginOptions`), a block device must be big enough
for the disk's whole qcow2.
"""

from __future__ import annotations

import posixpath

from ..errors import PlanError
from ..qapi.commands import (
    BlockdevAddFile,
    BlockdevAddQcow2,
    BlockdevCreate,
    BlockdevDel,
    BlockSetWriteThreshold,
    CreateFileOptions,
    CreateQcow2Options,
    LuksEncryption,
)
from . import naming
from .devices import device_size, file_driver, qcow2_room, secret_steps
from .disks import DiskChoice, DiskContext, create_steps
from .plan import Step

# Room a bounded scratch needs at the least besides its reserve: its qcow2 header and
# tables, and a little of what the guest overwrites.
MIN_SCRATCH_ROOM = 1 << 20


def reserve_file(scratch: str) -> str:
    """The reserve file kept beside a bounded scratch."""
    return f"{scratch}.reserve"


def _write_threshold(context: DiskContext, choice: DiskChoice, reserve: int) -> int:
    """How far a bounded scratch may grow before ``BLOCK_WRITE_THRESHOLD``: its share of
    its folder's free space once every scratch there has its reserve.

    Raises PlanError when that share is too small to begin.
    """
    folder = posixpath.dirname(choice.target)
    made = [
        c
        for c in context.choices
        if posixpath.dirname(c.target) == folder and c.target not in context.facts.existing_files
    ]
    free = context.facts.free_space.get(folder, 0)
    share = (free - len(made) * reserve) // max(len(made), 1)
    if share < MIN_SCRATCH_ROOM:
        raise PlanError(
            f"{folder} has {free} bytes free: too little for the scratch of {choice.disk} and "
            f"a reserve of {reserve} bytes beside each of its {len(made)} scratch(es)"
        )
    return share


def _reserve_steps(context: DiskContext, choice: DiskChoice, reserve: int) -> list[Step]:
    """Create the reserve file of a bounded scratch: its room kept free on the disk until a
    full scratch needs it (whoever watches the threshold removes it then)."""
    return create_steps(
        BlockdevCreate(
            job_id=naming.create_job_id(context.facts.backup_id, choice.disk, "reserve"),
            options=CreateFileOptions(
                filename=reserve_file(choice.target), size=reserve, preallocation="falloc"
            ),
        ),
        f"keep {reserve} bytes free beside the scratch of {choice.disk}, for when it fills",
        (reserve_file(choice.target),),
    )


def scratch_steps(
    context: DiskContext, choice: DiskChoice, source: str
) -> tuple[list[Step], int | None]:
    """Create (unless it exists) and open the scratch, over the disk as its backing; and
    the write threshold set on a bounded scratch.

    A block device is never created; it is formatted as qcow2 unless ``reuse='yes'``.
    An encrypted scratch is created and opened with its passphrase's secret.
    """
    backup_id, disk = context.facts.backup_id, choice.disk
    file_node = naming.target_file_node(backup_id, disk)
    exists = choice.target in context.facts.existing_files and not choice.device
    reserve = None if exists or choice.device else context.options.scratch_reserve
    threshold = None if reserve is None else _write_threshold(context, choice, reserve)
    steps, encrypt, _ = secret_steps(context, choice)
    steps += [] if reserve is None else _reserve_steps(context, choice, reserve)
    if not exists and not choice.device:
        steps += create_steps(
            BlockdevCreate(
                job_id=naming.create_job_id(backup_id, disk, "file"),
                options=CreateFileOptions(filename=choice.target, size=0),
            ),
            f"create the fleecing scratch file of {disk}",
            (choice.target,),
        )
    steps.append(
        Step(
            command=BlockdevAddFile(
                driver=file_driver(choice), node_name=file_node, filename=choice.target
            ),
            reason=f"open the scratch {'device' if choice.device else 'file'} {choice.target}",
            undo=(BlockdevDel(node_name=file_node),),
        )
    )
    if threshold is not None:
        steps.append(
            Step(
                command=BlockSetWriteThreshold(node_name=file_node, write_threshold=threshold),
                reason=f"raise BLOCK_WRITE_THRESHOLD once the scratch of {disk} passes "
                f"{threshold} bytes, while its reserve is still free",
            )
        )
    if not (choice.reuse if choice.device else exists):
        steps += _format_steps(context, choice, file_node, reserve is not None, encrypt)
    fleece = naming.fleece_node(backup_id, disk)
    steps.append(
        Step(
            command=BlockdevAddQcow2(
                node_name=fleece, file=file_node, backing=source, encrypt=encrypt
            ),
            reason=f"open the scratch over {disk}: it will keep what the guest overwrites",
            undo=(BlockdevDel(node_name=fleece),),
        )
    )
    return steps, threshold


def _format_steps(
    context: DiskContext,
    choice: DiskChoice,
    file_node: str,
    bounded: bool,
    encrypt: LuksEncryption | None,
) -> list[Step]:
    """Format the scratch as qcow2 (encrypted if asked), with room for every cluster the
    guest could overwrite unless it is bounded: a full scratch would fail the guest's
    writes (copy-before-write's default on-cbw-error=break-guest-write, which
    blockdev-backup cannot change), so a lack of space must fail here instead."""
    disk, size = choice.disk, context.graph.top_node(choice.disk).virtual_size
    qcow2 = CreateQcow2Options(file=file_node, size=size, encrypt=encrypt)
    what = f"format the scratch of {disk} as{' encrypted' if encrypt else ''} qcow2"
    if choice.device:
        # A device cannot be preallocated: its size is its room.
        device_size(context, choice, qcow2_room(size), "a scratch that may fill up")
        what += f" onto {choice.target}, which holds all of {disk}"
    elif bounded:
        what += ", growing with what the guest overwrites"
    else:
        qcow2 = qcow2.model_copy(update={"preallocation": "falloc"})
        what += ", its space reserved"
    job = naming.create_job_id(context.facts.backup_id, disk, "qcow2")
    return create_steps(BlockdevCreate(job_id=job, options=qcow2), what)
