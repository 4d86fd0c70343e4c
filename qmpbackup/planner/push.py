"""Push mode: QEMU copies each disk into a target file, in a job the transaction starts."""

from __future__ import annotations

import posixpath
from typing import Any

from ..errors import InvalidInputError, TargetExistsError
from ..qapi.commands import (
    BackupPerf,
    BlockdevAddFile,
    BlockdevAddQcow2,
    BlockdevAddRaw,
    BlockdevBackup,
    BlockdevCacheOptions,
    BlockdevCreate,
    BlockdevDel,
    CreateFileOptions,
    CreateQcow2Options,
    JobCancel,
)
from ..state.active import DiskJob
from . import naming
from .devices import device_size, file_driver, secret_objects, secret_steps
from .disks import (
    DiskChoice,
    DiskContext,
    DiskPieces,
    SyncKind,
    add_incremental_bitmap,
    create_steps,
)
from .facts import BackupFacts
from .plan import Step

# Copy tasks a push job runs at once (QEMU's default is 64). Measured by scripts/bench
# on QEMU 7.2: 8 workers of 1 MiB copy a full about 20 % faster than 64 and use half
# the CPU of QEMU's main loop, which the guest shares; incrementals are as fast or faster.
PUSH_WORKERS = 8


def refuse_disk(choice: DiskChoice, facts: BackupFacts) -> None:
    """Raise TargetExistsError for an existing target not to be reused, InvalidInputError
    for a target to reuse that does not exist (a block device always exists: see
    :func:`~qmpbackup.planner.devices.refuse_device`)."""
    if choice.device:
        return
    exists = choice.target in facts.existing_files
    if not choice.reuse and exists:
        raise TargetExistsError(
            f"target {choice.target} exists; remove it or ask for reuse (reuse='yes')"
        )
    if choice.reuse and not exists:
        raise InvalidInputError(f"target {choice.target} to reuse does not exist")


def _direct(choice: DiskChoice, facts: BackupFacts) -> bool:
    """Whether a push target is written with O_DIRECT: a full or shallow copy (long
    runs, a big flush saved) into a folder that takes it; an incremental's scattered
    clusters go faster through the page cache."""
    folder = posixpath.dirname(choice.target)
    return choice.sync != "incremental" and not choice.device and folder in facts.direct_io_dirs


def _target_steps(
    context: DiskContext, choice: DiskChoice, direct: bool
) -> tuple[list[Step], tuple[str, ...]]:
    """Steps that create (unless reused) and open the target; its node names, top first.

    A raw target is a sparse file of the disk's size used through its protocol
    node; a qcow2 target gets a format node opened without its backing chain.  A
    block device is not created: raw, it is written as it is (through a raw node
    showing the disk's size of a bigger device); qcow2, it is formatted unless reused.
    An encrypted target is qcow2 created and opened with its passphrase's secret.
    """
    graph, backup_id, disk = context.graph, context.facts.backup_id, choice.disk
    top = graph.top_node(disk)
    raw = choice.format == "raw"
    file_node = naming.target_file_node(backup_id, disk)
    steps, encrypt, _ = secret_steps(context, choice)
    if not choice.reuse and not choice.device:
        options = CreateFileOptions(filename=choice.target, size=top.virtual_size if raw else 0)
        steps += create_steps(
            BlockdevCreate(job_id=naming.create_job_id(backup_id, disk, "file"), options=options),
            f"create the raw target file of {disk}, sparse, with the disk's size"
            if raw
            else f"create the target file of {disk}",
            (choice.target,),
        )
    # A target qmpbackup made is written sparse: data that reads as zeroes is stored
    # as a hole (raw) or a zero cluster (qcow2 v3, which never exposes a backing file).
    zeroes: dict[str, Any] = {} if choice.reuse else {"discard": "unmap", "detect_zeroes": "unmap"}
    # With O_DIRECT the data reaches the disk while the job copies, instead of in one
    # flush of the whole image at its end, and the guest's page cache is left alone.
    cache: dict[str, Any] = (
        {"cache": BlockdevCacheOptions(direct=True), "aio": "native"} if direct else {}
    )
    steps.append(
        Step(
            command=BlockdevAddFile(
                driver=file_driver(choice),
                node_name=file_node,
                filename=choice.target,
                **(zeroes if raw else {}),
                **cache,
            ),
            reason=f"open {choice.target}" + (f" as the raw target of {disk}" if raw else ""),
            undo=(BlockdevDel(node_name=file_node),),
        )
    )
    if raw and choice.device:
        return _raw_device(context, choice, steps, file_node)
    if raw:
        return steps, (file_node,)
    fmt_node = naming.target_node(backup_id, disk)
    if not choice.reuse:
        backing_file = backing_fmt = None
        if choice.sync == "top":
            backing = graph.node(graph.disk(disk).chain[1])
            backing_file, backing_fmt = graph.image_path(backing), backing.driver
        qcow2 = CreateQcow2Options(
            file=file_node,
            size=top.virtual_size,
            backing_file=backing_file,
            backing_fmt=backing_fmt,
            encrypt=encrypt,
            # zlib is qcow2's default: left out, so that a QEMU without the member works.
            compression_type="zstd" if context.options.compress == "zstd" else None,
        )
        steps += create_steps(
            BlockdevCreate(job_id=naming.create_job_id(backup_id, disk, "qcow2"), options=qcow2),
            f"format the target of {disk} as qcow2"
            + (f" backed by {backing_file}" if backing_file else ""),
        )
    steps.append(
        Step(
            command=BlockdevAddQcow2(
                node_name=fmt_node, file=file_node, backing=None, encrypt=encrypt, **zeroes
            ),
            reason=f"open the qcow2 target of {disk} without its backing chain",
            undo=(BlockdevDel(node_name=fmt_node),),
        )
    )
    return steps, (fmt_node, file_node)


def _raw_device(
    context: DiskContext, choice: DiskChoice, steps: list[Step], file_node: str
) -> tuple[list[Step], tuple[str, ...]]:
    """A raw block device as a target: as it is when its size is the disk's, else through
    a raw node showing the disk's size (a backup job copies between equal sizes only)."""
    size = context.graph.top_node(choice.disk).virtual_size
    if device_size(context, choice, size, "a raw copy") == size:
        return steps, (file_node,)
    fmt_node = naming.target_node(context.facts.backup_id, choice.disk)
    steps.append(
        Step(
            command=BlockdevAddRaw(node_name=fmt_node, file=file_node, size=size),
            reason=f"show the first {size} bytes of {choice.target}, the size of {choice.disk}",
            undo=(BlockdevDel(node_name=fmt_node),),
        )
    )
    return steps, (fmt_node, file_node)


def _job_sync(context: DiskContext, choice: DiskChoice) -> SyncKind:
    """The job's sync mode: a full of a qcow2 image without a backing file into a new
    target is ``top``, the same content (what the image does not hold reads as zeroes
    on both sides), because ``full`` writes zeroes over every unallocated cluster: a
    qcow2 target then holds an L2 entry for each (147 MiB of tables for a sparse 1 TiB
    disk). Only qcow2: other drivers may call a range unallocated that does not read
    as zeroes (an NBD hole, ``null-co``), and only into a new image: a raw block device
    holds old data, so it is written whole."""
    graph = context.graph
    alone = len(graph.disk(choice.disk).chain) == 1
    qcow2 = graph.top_node(choice.disk).driver == "qcow2"
    fresh = not choice.reuse and not (choice.device and choice.format == "raw")
    if choice.sync == "full" and fresh and alone and qcow2:
        return "top"
    return choice.sync


def plan_disk(context: DiskContext, choice: DiskChoice) -> DiskPieces:
    """Open the target (with O_DIRECT where it helps); in the transaction, a backup job
    copying into it."""
    facts, disk = context.facts, choice.disk
    source = context.graph.disk(disk).top
    job = naming.job_id(facts.backup_id, disk)
    target_steps, target_nodes = _target_steps(context, choice, _direct(choice, facts))
    bitmap = None
    temporaries: tuple[tuple[str, str], ...] = ()
    pieces = DiskPieces(
        job=DiskJob(disk=disk, source_node=source, job_id=job, sync=choice.sync),
        before=target_steps,
    )
    if choice.incremental is not None:
        bitmap = naming.temporary_bitmap(facts.backup_id, disk)
        add_incremental_bitmap(context, choice, source, bitmap, pieces)
        temporaries = ((source, bitmap),)
    perf = BackupPerf(max_workers=PUSH_WORKERS) if facts.capabilities.backup_perf else None
    compress = context.options.compress is not None
    if compress and choice.format != "qcow2":
        raise InvalidInputError(f"disk {disk}: only a qcow2 target can be compressed")
    pieces.actions.append(
        BlockdevBackup(
            job_id=job,
            device=source,
            target=target_nodes[0],
            sync=_job_sync(context, choice),
            bitmap=bitmap,
            auto_finalize=True,
            auto_dismiss=False,
            compress=compress or None,
            x_perf=perf,
        )
    )
    pieces.undo.insert(0, JobCancel(id=job))
    pieces.job = pieces.job.model_copy(
        update={
            "incremental": choice.incremental,
            "target": choice.target,
            "format": choice.format,
            "target_nodes": target_nodes,
            "temporary_bitmaps": temporaries,
            "created_files": () if choice.reuse or choice.device else (choice.target,),
            "objects": secret_objects(facts, choice),
        }
    )
    return pieces
