"""Plans for ``backup-begin`` and ``backup-end`` (push mode)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import (
    BackupActiveError,
    InvalidInputError,
    PlanError,
    TargetExistsError,
)
from ..qapi.commands import (
    AuthzListAdd,
    AuthzRule,
    BackupPerf,
    BitmapRef,
    BlockdevAddBlkdebug,
    BlockdevAddFile,
    BlockdevAddQcow2,
    BlockdevAddSnapshotAccess,
    BlockdevBackup,
    BlockdevCacheOptions,
    BlockdevCreate,
    BlockdevDel,
    BlockDirtyBitmapAdd,
    BlockDirtyBitmapRemove,
    BlockExportAddNbd,
    BlockExportDel,
    CreateFileOptions,
    CreateQcow2Options,
    InetAddress,
    InetHostPort,
    JobCancel,
    JobDismiss,
    NbdServerStart,
    NbdServerStop,
    ObjectDel,
    QMPCommand,
    TlsCredsX509Add,
    Transaction,
    UnixAddress,
    UnixSocketPath,
)
from ..qmp.graph import BlockGraph
from ..qmp.jobs import JobState
from ..request.models import BackupSpec, CheckpointSpec, DiskBackupSpec
from ..state.active import BackupRecord, DiskJob, NbdServer
from ..state.checkpoints import (
    Checkpoint,
    CheckpointDisk,
    find_checkpoint,
    next_parent,
    next_seq,
)
from . import naming
from .chain import (
    merged_bitmap,
    require_persistent_bitmaps,
    usable_checkpoint_layers,
)
from .plan import Plan, Step

SyncKind = Literal["full", "top", "incremental"]

# The cluster of QEMU's copy-before-write: max(64 KiB, the scratch's cluster size).
CBW_CLUSTER = 64 * 1024


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DiskChoice(_Frozen):
    """What the request asks for one disk, resolved against the VM."""

    disk: str
    sync: SyncKind
    incremental: str | None
    target: str
    format: Literal["qcow2", "raw"]
    reuse: bool
    shallow: bool = False
    export: str | None = None
    export_bitmap: str | None = None


class BackupFacts(_Frozen):
    """What the caller observed besides the graph: nothing here is looked up by the planner."""

    backup_id: int
    now: int
    existing_files: frozenset[str] = frozenset()
    busy_disks: Mapping[str, int] = {}
    job_ids: frozenset[str] = frozenset()
    scratch_dir: str = ""
    default_socket: str = ""
    free_port: int | None = None
    running_server: NbdServer | None = None
    export_names: frozenset[str] = frozenset()
    # Folders of push targets where QEMU can write with O_DIRECT (probed by the caller).
    direct_io_dirs: frozenset[str] = frozenset()


class PullOptions(_Frozen):
    """What the user gives besides the spec for a pull backup: where TLS material lives."""

    tls_dir: str | None = None
    tls_allow: tuple[str, ...] = ()


class BackupPlan(_Frozen):
    """The plan of a ``backup-begin``, the record to keep if it succeeds, and the checkpoint."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    record: BackupRecord
    checkpoint: Checkpoint | None


def _spec_entry(spec: BackupSpec, graph: BlockGraph, disk: str) -> DiskBackupSpec | None:
    """The request's entry for ``disk``, named by qdev id or BlockBackend name."""
    return next((d for d in spec.disks if graph.aliases.get(d.name, d.name) == disk), None)


def _backed_up_disks(spec: BackupSpec, graph: BlockGraph) -> list[str]:
    named: dict[str, str] = {}
    for listed in spec.disks:
        resolved = graph.disk(listed.name).name  # unknown names are refused before anything else
        if resolved in named:
            raise InvalidInputError(
                f"disk {resolved!r} is listed twice (as {named[resolved]!r} and {listed.name!r})"
            )
        named[resolved] = listed.name
    chosen: list[str] = []
    for name, disk in graph.disks.items():
        entry = _spec_entry(spec, graph, name)
        if entry is not None and not entry.backup:
            continue
        if entry is None and (disk.read_only or not disk.chain):
            continue
        if not disk.chain:
            raise PlanError(f"disk {name!r} has no medium to back up")
        chosen.append(name)
    if not chosen:
        raise InvalidInputError("the request backs up no disk")
    return chosen


def _default_target(graph: BlockGraph, disk: str, suffix: str) -> str:
    return f"{graph.image_path(graph.top_node(disk))}.{suffix}"


def choose_disks(
    spec: BackupSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    new_checkpoint: CheckpointSpec | None,
    now: int,
    scratch_dir: str = "",
    backup_id: int = 0,
) -> list[DiskChoice]:
    """Resolve which disks to back up, how, and into which file (push target or pull scratch)."""
    suffix = new_checkpoint.name if new_checkpoint else str(now)
    choices: list[DiskChoice] = []
    for name in _backed_up_disks(spec, graph):
        entry = _spec_entry(spec, graph, name)
        incremental = (entry.incremental if entry else None) or spec.incremental
        if entry is not None and entry.backupmode == "full":
            incremental = None
        if entry is not None and entry.backupmode == "incremental" and incremental is None:
            raise InvalidInputError(f"disk {name!r}: backupmode='incremental' needs a checkpoint")
        if incremental is not None:
            checkpoint = find_checkpoint(checkpoints, incremental)
            covered = checkpoint.disk(name)
            if covered is None or covered.checkpoint != "bitmap":
                raise InvalidInputError(f"checkpoint {incremental!r} does not cover disk {name!r}")
        shallow = bool(entry and entry.shallow)
        has_backing = len(graph.disk(name).chain) > 1
        sync: SyncKind = (
            "incremental" if incremental else "top" if shallow and has_backing else "full"
        )
        fmt = (entry.format if entry else None) or "qcow2"
        if spec.mode == "pull":
            target = (entry.scratch if entry else None) or (
                f"{scratch_dir}/{naming.fleece_node(backup_id, name)}.qcow2"
            )
            fmt = "qcow2"
        else:
            target = (entry.target if entry else None) or _default_target(graph, name, suffix)
        choices.append(
            DiskChoice(
                disk=name,
                sync=sync,
                incremental=incremental,
                target=target,
                format=fmt,
                reuse=bool(entry and entry.reuse),
                shallow=shallow,
                export=((entry.exportname if entry else None) or name)
                if spec.mode == "pull"
                else None,
                export_bitmap=((entry.exportbitmap if entry else None) or name)
                if spec.mode == "pull" and incremental
                else None,
            )
        )
    for attr in ("target", "export"):
        values = [getattr(c, attr) for c in choices if getattr(c, attr)]
        for value in values:
            if values.count(value) > 1:
                raise InvalidInputError(f"two disks would use the same {attr} {value}")
    return choices


def _new_checkpoint(
    spec: CheckpointSpec | None,
    disks: Sequence[str],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    parent: str | None,
    now: int,
) -> Checkpoint | None:
    if spec is None:
        return None
    if any(c.name == spec.name for c in checkpoints):
        raise InvalidInputError(f"checkpoint {spec.name!r} already exists")
    for entry in spec.disks:
        graph.disk(entry.name)
        if entry.checkpoint == "bitmap" and entry.name not in disks:
            raise InvalidInputError(f"checkpoint disk {entry.name!r} is not part of this backup")
    entries: list[CheckpointDisk] = []
    for disk in disks:
        listed = next((d for d in spec.disks if graph.aliases.get(d.name, d.name) == disk), None)
        if listed is not None and listed.checkpoint == "no":
            entries.append(CheckpointDisk(name=disk, checkpoint="no"))
            continue
        bitmap = (listed.bitmap if listed else None) or spec.name
        top = require_persistent_bitmaps(graph, disk)
        if top.bitmap(bitmap) is not None:
            raise InvalidInputError(f"disk {disk!r} already has a bitmap named {bitmap!r}")
        entries.append(CheckpointDisk(name=disk, checkpoint="bitmap", bitmap=bitmap))
    return Checkpoint(
        name=spec.name,
        parent=parent,
        creation_time=now,
        seq=next_seq(checkpoints),
        description=spec.description,
        disks=tuple(entries),
    )


def _create_steps(
    command: BlockdevCreate, reason: str, created: tuple[str, ...] = ()
) -> list[Step]:
    """A ``blockdev-create`` job, waited for, then dismissed."""
    return [
        Step(command=command, reason=reason, await_job=command.job_id, created_files=created),
        Step(command=JobDismiss(id=command.job_id), reason="forget the finished create job"),
    ]


def _target_steps(
    graph: BlockGraph, choice: DiskChoice, backup_id: int, direct: bool = False
) -> tuple[list[Step], tuple[str, ...]]:
    """Steps that create (unless reused) and open the target; its node names, top first.

    A raw target is a sparse file of the disk's size used through its protocol
    node; a qcow2 target gets a format node opened without its backing chain.
    """
    disk = choice.disk
    top = graph.top_node(disk)
    raw = choice.format == "raw"
    file_node = naming.target_file_node(backup_id, disk)
    steps: list[Step] = []
    if not choice.reuse:
        options = CreateFileOptions(filename=choice.target, size=top.virtual_size if raw else 0)
        steps += _create_steps(
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
                node_name=file_node, filename=choice.target, **(zeroes if raw else {}), **cache
            ),
            reason=f"open {choice.target}" + (f" as the raw target of {disk}" if raw else ""),
            undo=(BlockdevDel(node_name=file_node),),
        )
    )
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
        )
        steps += _create_steps(
            BlockdevCreate(job_id=naming.create_job_id(backup_id, disk, "qcow2"), options=qcow2),
            f"format the target of {disk} as qcow2"
            + (f" backed by {backing_file}" if backing_file else ""),
        )
    steps.append(
        Step(
            command=BlockdevAddQcow2(node_name=fmt_node, file=file_node, backing=None, **zeroes),
            reason=f"open the qcow2 target of {disk} without its backing chain",
            undo=(BlockdevDel(node_name=fmt_node),),
        )
    )
    return steps, (fmt_node, file_node)


@dataclass
class _DiskPieces:
    """One disk's part of a begin plan: steps before the transaction, its actions, steps after."""

    job: DiskJob
    before: list[Step] = field(default_factory=list)
    actions: list[QMPCommand] = field(default_factory=list)
    undo: list[QMPCommand] = field(default_factory=list)
    after: list[Step] = field(default_factory=list)
    exports: list[Step] = field(default_factory=list)


def _incremental_bitmap(
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    choice: DiskChoice,
    node: str,
    name: str,
    pieces: _DiskPieces,
) -> None:
    """Add to the transaction a disabled bitmap on ``node``: the checkpoint's changes so far."""
    layers = usable_checkpoint_layers(graph, choice.disk, _bitmap_of(checkpoints, choice))
    pieces.actions += merged_bitmap(node, name, layers, layers[0].bitmap.granularity)
    pieces.undo.append(BlockDirtyBitmapRemove(node=node, name=name))


def _direct(choice: DiskChoice, facts: BackupFacts) -> bool:
    """Whether a push target is written with O_DIRECT: a full or shallow copy (long
    runs, a big flush saved) into a folder that takes it; an incremental's scattered
    clusters go faster through the page cache."""
    return choice.sync != "incremental" and posixpath.dirname(choice.target) in facts.direct_io_dirs


# Copy tasks a push job runs at once (QEMU's default is 64). Measured by scripts/bench
# on QEMU 7.2: 8 workers of 1 MiB copy a full about 20 % faster than 64 and use half
# the CPU of QEMU's main loop, which the guest shares; incrementals are as fast or faster.
PUSH_WORKERS = 8


def _push_disk(
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    choice: DiskChoice,
    backup_id: int,
    direct: bool = False,
) -> _DiskPieces:
    """Push: open the target (with O_DIRECT if ``direct``); in the transaction, a backup
    job copying into it."""
    disk = choice.disk
    source = graph.disk(disk).top
    job = naming.job_id(backup_id, disk)
    target_steps, target_nodes = _target_steps(graph, choice, backup_id, direct)
    bitmap = None
    temporaries: tuple[tuple[str, str], ...] = ()
    pieces = _DiskPieces(
        job=DiskJob(disk=disk, source_node=source, job_id=job, sync=choice.sync),
        before=target_steps,
    )
    if choice.incremental is not None:
        bitmap = naming.temporary_bitmap(backup_id, disk)
        _incremental_bitmap(graph, checkpoints, choice, source, bitmap, pieces)
        temporaries = ((source, bitmap),)
    pieces.actions.append(
        BlockdevBackup(
            job_id=job,
            device=source,
            target=target_nodes[0],
            sync=choice.sync,
            bitmap=bitmap,
            auto_finalize=True,
            auto_dismiss=False,
            x_perf=BackupPerf(max_workers=PUSH_WORKERS),
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
            "created_files": () if choice.reuse else (choice.target,),
        }
    )
    return pieces


def _pull_disk(
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    choice: DiskChoice,
    backup_id: int,
    scratch_exists: bool,
    server: NbdServer,
) -> _DiskPieces:
    """Pull: a fleecing scratch over the disk; in the transaction, the copy-before-write
    job that fills it; after it, the snapshot-access view and its NBD export."""
    disk = choice.disk
    source = graph.disk(disk).top
    job = naming.job_id(backup_id, disk)
    file_node = naming.target_file_node(backup_id, disk)
    fleece = naming.fleece_node(backup_id, disk)
    cbw = naming.cbw_node(backup_id, disk)
    access = naming.access_node(backup_id, disk)
    view = naming.view_node(backup_id, disk)
    export_id = naming.export_id(backup_id, disk)
    assert choice.export is not None
    pieces = _DiskPieces(job=DiskJob(disk=disk, source_node=source, job_id=job, sync="none"))
    if not scratch_exists:
        size = graph.top_node(disk).virtual_size
        pieces.before += _create_steps(
            BlockdevCreate(
                job_id=naming.create_job_id(backup_id, disk, "file"),
                options=CreateFileOptions(filename=choice.target, size=0),
            ),
            f"create the fleecing scratch file of {disk}",
            (choice.target,),
        )
    pieces.before.append(
        Step(
            command=BlockdevAddFile(node_name=file_node, filename=choice.target),
            reason=f"open the scratch file {choice.target}",
            undo=(BlockdevDel(node_name=file_node),),
        )
    )
    if not scratch_exists:
        pieces.before += _create_steps(
            BlockdevCreate(
                job_id=naming.create_job_id(backup_id, disk, "qcow2"),
                # Reserve room for every cluster the guest could overwrite: a
                # full scratch would fail the guest's writes (copy-before-write's
                # default on-cbw-error=break-guest-write, which blockdev-backup
                # cannot change), so a lack of space must fail here instead.
                options=CreateQcow2Options(file=file_node, size=size, preallocation="falloc"),
            ),
            f"format the scratch of {disk} as qcow2, its space reserved",
        )
    pieces.before.append(
        Step(
            command=BlockdevAddQcow2(node_name=fleece, file=file_node, backing=source),
            reason=f"open the scratch over {disk}: it will keep what the guest overwrites",
            undo=(BlockdevDel(node_name=fleece),),
        )
    )
    bitmaps: tuple[BitmapRef, ...] | None = None
    temporaries: tuple[tuple[str, str], ...] = ()
    if choice.incremental is not None:
        assert choice.export_bitmap is not None
        # The bitmap lives on our scratch node, so it goes when the node goes; its
        # name is what readers see as the context qemu:dirty-bitmap:<name>.
        _incremental_bitmap(graph, checkpoints, choice, fleece, choice.export_bitmap, pieces)
        bitmaps = (BitmapRef(node=fleece, name=choice.export_bitmap),)
        temporaries = ((fleece, choice.export_bitmap),)
    pieces.actions.append(
        BlockdevBackup(
            job_id=job,
            device=source,
            target=fleece,
            sync="none",
            filter_node_name=cbw,
            auto_finalize=True,
            auto_dismiss=False,
        )
    )
    pieces.undo.insert(0, JobCancel(id=job))
    pieces.after.append(
        Step(
            command=BlockdevAddSnapshotAccess(node_name=access, file=cbw),
            reason=f"open the point-in-time view of {disk}",
            undo=(BlockdevDel(node_name=access),),
        )
    )
    # QEMU 7.2's snapshot-access answers a read that starts in clusters already saved
    # by copy-before-write and runs past them with the guest's new data. Reads of at
    # most one copy cluster, aligned to it, never do; the block layer splits them here.
    pieces.after.append(
        Step(
            command=BlockdevAddBlkdebug(
                node_name=view,
                image=access,
                align=CBW_CLUSTER,
                max_transfer=CBW_CLUSTER,
                read_only=True,
            ),
            reason=f"split reads of the view of {disk} at copy-before-write clusters",
            undo=(BlockdevDel(node_name=view),),
        )
    )
    pieces.exports.append(
        Step(
            command=BlockExportAddNbd(
                id=export_id,
                node_name=view,
                name=choice.export,
                bitmaps=bitmaps,
                allocation_depth=True if choice.shallow else None,
            ),
            reason=f"export the view of {disk} as {choice.export!r}"
            + (f" with its dirty bitmap {choice.export_bitmap!r}" if bitmaps else "")
            + (" and allocation depth" if choice.shallow else ""),
            undo=(BlockExportDel(id=export_id, mode="hard"),),
        )
    )
    pieces.job = pieces.job.model_copy(
        update={
            "incremental": choice.incremental,
            "target": choice.target,
            "format": "qcow2",
            "view_nodes": (view, access),
            "target_nodes": (fleece, file_node),
            "temporary_bitmaps": temporaries,
            "created_files": () if scratch_exists else (choice.target,),
            "export": choice.export,
            "export_id": export_id,
            "export_bitmap": choice.export_bitmap,
            "uri": server.uri(choice.export),
        }
    )
    return pieces


def _server_for(
    spec: BackupSpec, facts: BackupFacts, options: PullOptions
) -> tuple[NbdServer, list[Step]]:
    """The NBD server to export through, and the steps that start it (none if it runs)."""
    wanted = spec.server
    if wanted is not None and wanted.tls and not options.tls_dir:
        raise InvalidInputError("tls='yes' needs the x509 directory: pass --tls-dir DIR")
    running = facts.running_server
    if running is not None:
        if wanted is not None and (
            wanted.transport != running.transport
            or (wanted.port is not None and wanted.port != running.port)
            or (wanted.socket is not None and wanted.socket != running.socket)
            or wanted.tls != running.tls
        ):
            raise PlanError(
                "QEMU runs one NBD server and another backup uses it at "
                f"{running.uri('')}: ask for the same server or none"
            )
        return running, []
    if wanted is None or wanted.transport == "unix":
        socket = (wanted.socket if wanted else None) or facts.default_socket
        server = NbdServer(transport="unix", socket=socket)
        addr: UnixAddress | InetAddress = UnixAddress(data=UnixSocketPath(path=socket))
    else:
        port = wanted.port or facts.free_port
        if port is None:
            raise PlanError("no free TCP port was found for the NBD server")
        host = wanted.name or "localhost"
        server = NbdServer(transport="tcp", host=host, port=port, tls=wanted.tls)
        addr = InetAddress(data=InetHostPort(host=host, port=str(port)))
    steps: list[Step] = []
    creds = authz = None
    if server.tls:
        assert options.tls_dir is not None
        creds = naming.tls_creds(facts.backup_id)
        steps.append(
            Step(
                command=TlsCredsX509Add(id=creds, dir=options.tls_dir),
                reason="load the server's x509 credentials; clients must show a certificate",
                undo=(ObjectDel(id=creds),),
            )
        )
        if options.tls_allow:
            authz = naming.tls_authz(facts.backup_id)
            steps.append(
                Step(
                    command=AuthzListAdd(
                        id=authz, rules=tuple(AuthzRule(match=dn) for dn in options.tls_allow)
                    ),
                    reason="admit only the listed client certificate names",
                    undo=(ObjectDel(id=authz),),
                )
            )
        server = server.model_copy(update={"objects": tuple(o for o in (creds, authz) if o)})
    steps.append(
        Step(
            command=NbdServerStart(addr=addr, tls_creds=creds, tls_authz=authz),
            reason=f"start the NBD server at {server.uri('')}",
            undo=(NbdServerStop(),),
        )
    )
    return server, steps


def plan_backup_begin(
    spec: BackupSpec,
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    facts: BackupFacts,
    new_checkpoint: CheckpointSpec | None = None,
    options: PullOptions | None = None,
) -> BackupPlan:
    """Plan a backup: prepare every disk, then one transaction sets the point in time.

    Push: targets are opened, and the transaction starts the copy jobs.  Pull:
    fleecing scratches are opened, the transaction starts copy-before-write
    jobs, then each disk's point-in-time view is exported over NBD.
    """
    backup_id = facts.backup_id
    choices = choose_disks(
        spec, graph, checkpoints, new_checkpoint, facts.now, facts.scratch_dir, backup_id
    )
    pull = spec.mode == "pull"
    for choice in choices:
        if choice.disk in facts.busy_disks:
            raise PlanError(
                f"disk {choice.disk!r} is already being backed up by backup id "
                f"{facts.busy_disks[choice.disk]}"
            )
        if not pull and not choice.reuse and choice.target in facts.existing_files:
            raise TargetExistsError(
                f"target {choice.target} exists; remove it or ask for reuse (reuse='yes')"
            )
        if not pull and choice.reuse and choice.target not in facts.existing_files:
            raise InvalidInputError(f"target {choice.target} to reuse does not exist")
        if choice.export in facts.export_names:
            raise PlanError(f"QEMU already exports {choice.export!r}: choose another exportname")
        job = naming.job_id(backup_id, choice.disk)
        if job in facts.job_ids:
            raise PlanError(f"QEMU already has a job {job}: run 'qmpbackup recover'")
    parent = next_parent(checkpoints)
    checkpoint = _new_checkpoint(
        new_checkpoint, [c.disk for c in choices], graph, checkpoints, parent, facts.now
    )
    server, server_steps = (
        _server_for(spec, facts, options or PullOptions()) if pull else (None, [])
    )
    pieces = [
        _pull_disk(graph, checkpoints, c, backup_id, c.target in facts.existing_files, server)
        if server is not None
        else _push_disk(graph, checkpoints, c, backup_id, _direct(c, facts))
        for c in choices
    ]

    actions: list[QMPCommand] = []
    undo: list[QMPCommand] = []
    if checkpoint is not None:
        # The new checkpoint's bitmaps come first, in disk order, then the jobs.
        for entry in checkpoint.bitmap_disks():
            assert entry.bitmap is not None
            actions.append(
                BlockDirtyBitmapAdd(
                    node=graph.disk(entry.name).top, name=entry.bitmap, persistent=True
                )
            )
    for piece in pieces:
        actions += piece.actions
        # Undo cancels every job first (newest first), then removes bitmaps.
        undo = piece.undo[:1] + undo + piece.undo[1:]
    if checkpoint is not None:
        undo += [
            BlockDirtyBitmapRemove(node=graph.disk(e.name).top, name=e.bitmap or "")
            for e in checkpoint.bitmap_disks()
        ]
    disks = ", ".join(c.disk for c in choices)
    reason = f"start the backup of {disks} at one instant"
    if checkpoint is not None:
        reason += f" and create checkpoint {checkpoint.name} at that instant"

    # Each disk's steps before and after the transaction touch only its own nodes:
    # laned, the runner sends the disks' steps side by side.
    def laned(attr: str) -> list[Step]:
        return [
            step.model_copy(update={"lane": piece.job.disk})
            for piece in pieces
            for step in getattr(piece, attr)
        ]

    steps = laned("before")
    steps.append(Step(command=Transaction(actions=tuple(actions)), reason=reason, undo=tuple(undo)))
    steps += laned("after")
    steps += server_steps
    steps += laned("exports")
    record = BackupRecord(
        id=backup_id,
        mode=spec.mode,
        started=float(facts.now),
        checkpoint=checkpoint.name if checkpoint else None,
        incremental=next((c.incremental for c in choices if c.incremental), None),
        disks=tuple(piece.job for piece in pieces),
        server=server,
    )
    return BackupPlan(plan=Plan(steps=tuple(steps)), record=record, checkpoint=checkpoint)


def _bitmap_of(checkpoints: Sequence[Checkpoint], choice: DiskChoice) -> str:
    assert choice.incremental is not None
    entry = find_checkpoint(checkpoints, choice.incremental).disk(choice.disk)
    assert entry is not None and entry.bitmap is not None
    return entry.bitmap


# -- backup-end -------------------------------------------------------------


class EndPlan(_Frozen):
    """The plan of a ``backup-end``, and how the backup ended."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    outcome: Literal["completed", "aborted", "failed"]
    errors: Mapping[str, str]
    drop_checkpoint: str | None
    # Files qmpbackup created that end with the backup: a pull's scratches, and the
    # partial targets of a push that did not complete (reused targets are the user's).
    remove_files: tuple[str, ...] = ()


def plan_backup_end(
    record: BackupRecord,
    jobs: Mapping[str, JobState],
    graph: BlockGraph,
    checkpoints: Sequence[Checkpoint],
    abort: bool,
    exports: frozenset[str] = frozenset(),
    server_shared: bool = False,
) -> EndPlan:
    """Plan the end of a backup: remove its exports, jobs, nodes and temporary bitmaps.

    Push refuses while a copy runs unless ``abort``.  Pull always ends: its
    exports go (clients are dropped), the NBD server stops unless
    ``server_shared`` (another pull backup uses it), the fleecing jobs are
    cancelled.  A checkpoint created with a backup that did not complete is
    removed too, so that no checkpoint promises data no backup holds.
    """
    pull = record.mode == "pull"
    active = [j for j in record.job_ids() if j in jobs and jobs[j].status != "concluded"]
    if active and not abort and not pull:
        raise BackupActiveError(f"Backup id {record.id} still active, need --abort to end now")
    steps: list[Step] = []
    errors: dict[str, str] = {}
    for disk in record.disks:
        if disk.export_id and disk.export_id in exports:
            steps.append(
                Step(
                    command=BlockExportDel(id=disk.export_id, mode="hard"),
                    reason=f"stop exporting {disk.disk} (connected readers are dropped)",
                    await_export_deleted=disk.export_id,
                )
            )
    if pull and record.server is not None and not server_shared:
        steps.append(
            Step(
                command=NbdServerStop(),
                reason="stop the NBD server: no other backup uses it",
                may_fail=True,
            )
        )
        steps += [
            Step(command=ObjectDel(id=o), reason="drop the TLS object", may_fail=True)
            for o in record.server.objects
        ]
    for disk in record.disks:
        # The view sits on the job's filter node: it goes before the job.
        steps += [
            Step(command=BlockdevDel(node_name=node), reason=f"close the view of {disk.disk}")
            for node in disk.view_nodes
            if node in graph.nodes
        ]
        job = jobs.get(disk.job_id)
        if job is None:
            # QEMU restarted or someone dismissed it: nothing says the copy finished.
            errors[disk.disk] = f"job {disk.job_id} is gone (QEMU restarted?)"
            continue
        if job.status != "concluded":
            steps.append(
                Step(
                    command=JobCancel(id=disk.job_id),
                    reason=f"stop the fleecing of {disk.disk}"
                    if pull
                    else f"abort the copy of {disk.disk}",
                    await_job=disk.job_id,
                    job_may_fail=True,
                )
            )
            if not pull:
                errors[disk.disk] = "aborted"
        elif job.error:
            errors[disk.disk] = job.error
        steps.append(
            Step(command=JobDismiss(id=disk.job_id), reason=f"forget the job of {disk.disk}")
        )
    for disk in record.disks:
        for node in disk.target_nodes:
            if node in graph.nodes:
                steps.append(
                    Step(
                        command=BlockdevDel(node_name=node),
                        reason=f"close the {'scratch' if pull else 'target'} of {disk.disk}",
                    )
                )
    removals: list[QMPCommand] = []
    for disk in record.disks:
        for node, bitmap in disk.temporary_bitmaps:
            # A pull's bitmap lives on the scratch node and goes with it.
            if pull:
                continue
            if node in graph.nodes and graph.node(node).bitmap(bitmap) is not None:
                removals.append(BlockDirtyBitmapRemove(node=node, name=bitmap))
    outcome: Literal["completed", "aborted", "failed"]
    if pull:
        # A pull backup is over when its reader is done; only a broken fleecing fails it.
        outcome = "failed" if errors else "aborted" if abort else "completed"
    else:
        outcome = "aborted" if active else "failed" if errors else "completed"
    drop = None
    if outcome != "completed" and record.checkpoint is not None:
        made = next((c for c in checkpoints if c.name == record.checkpoint), None)
        if made is not None:
            drop = made.name
            for entry in made.bitmap_disks():
                for layer in graph.bitmap_layers(entry.name, entry.bitmap or ""):
                    removals.append(BlockDirtyBitmapRemove(node=layer.node, name=layer.bitmap.name))
    if removals:
        steps.append(
            Step(
                command=Transaction(actions=tuple(removals)),
                reason="remove the temporary bitmaps"
                + (f" and checkpoint {drop}, whose backup did not complete" if drop else ""),
            )
        )
    remove_files: tuple[str, ...] = ()
    if pull or outcome != "completed":
        remove_files = tuple(path for disk in record.disks for path in disk.created_files)
    return EndPlan(
        plan=Plan(steps=tuple(steps)),
        outcome=outcome,
        errors=errors,
        drop_checkpoint=drop,
        remove_files=remove_files,
    )
