"""Pull mode: fleecing scratches, point-in-time views over NBD, and the NBD server.

Each disk gets a fleecing scratch and its point-in-time view, exported over
QEMU's one NBD server; the server's start and its stop (used by ``backup-end``
and ``recover``) are here too.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InvalidInputError, PlanError
from ..qapi.commands import (
    BitmapRef,
    BlockdevAddBlkdebug,
    BlockdevAddSnapshotAccess,
    BlockdevBackup,
    BlockdevDel,
    BlockExportAddNbd,
    BlockExportDel,
    InetAddress,
    InetHostPort,
    JobCancel,
    NbdServerStart,
    NbdServerStop,
    UnixAddress,
    UnixSocketPath,
)
from ..qapi.objects import AuthzListAdd, AuthzRule, ObjectDel, TlsCredsX509Add
from ..request.models import BackupSpec
from ..state.active import DiskJob, NbdServer
from . import naming
from .devices import secret_objects
from .disks import DiskChoice, DiskContext, DiskPieces, add_incremental_bitmap
from .facts import BackupFacts, BeginOptions
from .plan import Step
from .scratch import reserve_file, scratch_steps

# The cluster of QEMU's copy-before-write: max(64 KiB, the scratch's cluster size).
CBW_CLUSTER = 64 * 1024


def refuse_disk(choice: DiskChoice, facts: BackupFacts) -> None:
    """Raise PlanError when QEMU already exports the name the disk would be served as."""
    if choice.export in facts.export_names:
        raise PlanError(f"QEMU already exports {choice.export!r}: choose another exportname")


def _view_steps(context: DiskContext, disk: str) -> tuple[list[Step], tuple[str, ...]]:
    """Steps opening the point-in-time view over the job's filter; its nodes, top first.

    Where snapshot-access may answer a read with data past what copy-before-write saved
    (:attr:`~qmpbackup.qapi.capabilities.Capabilities.snapshot_overread`), the view is
    a read-splitting node over it; elsewhere snapshot-access itself.
    """
    backup_id = context.facts.backup_id
    access = naming.access_node(backup_id, disk)
    open_access = Step(
        command=BlockdevAddSnapshotAccess(node_name=access, file=naming.cbw_node(backup_id, disk)),
        reason=f"open the point-in-time view of {disk}",
        undo=(BlockdevDel(node_name=access),),
    )
    if not context.facts.capabilities.snapshot_overread:
        return [open_access], (access,)
    if not context.facts.capabilities.read_splitting:
        raise PlanError(
            "this QEMU's blkdebug driver takes no align and max-transfer, so reads of the "
            "point-in-time view cannot be kept within copy-before-write clusters: "
            "pull mode is not offered"
        )
    view = naming.view_node(backup_id, disk)
    steps = [
        open_access,
        # QEMU 7.2's snapshot-access answers a read that starts in clusters already saved
        # by copy-before-write and runs past them with the guest's new data. Reads of at
        # most one copy cluster, aligned to it, never do; the block layer splits them here.
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
        ),
    ]
    return steps, (view, access)


def plan_disk(context: DiskContext, choice: DiskChoice) -> DiskPieces:
    """A fleecing scratch over the disk; in the transaction, the copy-before-write job that
    fills it; after it, the point-in-time view and its NBD export."""
    facts, disk = context.facts, choice.disk
    assert choice.export is not None and context.server is not None
    source = context.graph.disk(disk).top
    job = naming.job_id(facts.backup_id, disk)
    fleece = naming.fleece_node(facts.backup_id, disk)
    export_id = naming.export_id(facts.backup_id, disk)
    before, threshold = scratch_steps(context, choice, source)
    pieces = DiskPieces(
        job=DiskJob(disk=disk, source_node=source, job_id=job, sync="none"), before=before
    )
    bitmaps: tuple[BitmapRef, ...] | None = None
    temporaries: tuple[tuple[str, str], ...] = ()
    if choice.incremental is not None:
        assert choice.export_bitmap is not None
        # The bitmap lives on our scratch node, so it goes when the node goes; its
        # name is what readers see as the context qemu:dirty-bitmap:<name>.
        add_incremental_bitmap(context, choice, fleece, choice.export_bitmap, pieces)
        bitmaps = (BitmapRef(node=fleece, name=choice.export_bitmap),)
        temporaries = ((fleece, choice.export_bitmap),)
    pieces.actions.append(
        BlockdevBackup(
            job_id=job,
            device=source,
            target=fleece,
            sync="none",
            filter_node_name=naming.cbw_node(facts.backup_id, disk),
            auto_finalize=True,
            auto_dismiss=False,
        )
    )
    pieces.undo.insert(0, JobCancel(id=job))
    pieces.after, view_nodes = _view_steps(context, disk)
    pieces.exports.append(
        Step(
            command=BlockExportAddNbd(
                id=export_id,
                node_name=view_nodes[0],
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
    created: tuple[str, ...] = (choice.target,)
    if threshold is not None:
        created += (reserve_file(choice.target),)
    pieces.job = pieces.job.model_copy(
        update={
            "incremental": choice.incremental,
            "target": choice.target,
            "format": "qcow2",
            "view_nodes": view_nodes,
            "target_nodes": (fleece, naming.target_file_node(facts.backup_id, disk)),
            "temporary_bitmaps": temporaries,
            "created_files": ()
            if choice.device or choice.target in facts.existing_files
            else created,
            "objects": secret_objects(facts, choice),
            "reserve_file": None if threshold is None else reserve_file(choice.target),
            "write_threshold": threshold,
            "export": choice.export,
            "export_id": export_id,
            "export_bitmap": choice.export_bitmap,
            "uri": context.server.uri(choice.export),
        }
    )
    return pieces


def _server_address(
    spec: BackupSpec, facts: BackupFacts
) -> tuple[NbdServer, UnixAddress | InetAddress]:
    """The server to start, from the request or the defaults, and its QMP address."""
    wanted = spec.server
    if wanted is None or wanted.transport == "unix":
        socket = (wanted.socket if wanted else None) or facts.default_socket
        return NbdServer(transport="unix", socket=socket), UnixAddress(
            data=UnixSocketPath(path=socket)
        )
    port = wanted.port or facts.free_port
    if port is None:
        raise PlanError("no free TCP port was found for the NBD server")
    host = wanted.name or "localhost"
    server = NbdServer(transport="tcp", host=host, port=port, tls=wanted.tls)
    return server, InetAddress(data=InetHostPort(host=host, port=str(port)))


def _tls_steps(facts: BackupFacts, options: BeginOptions) -> tuple[list[Step], str, str | None]:
    """Steps loading the server's x509 credentials and allow-list; their object ids."""
    assert options.tls_dir is not None
    creds = naming.tls_creds(facts.backup_id)
    steps = [
        Step(
            command=TlsCredsX509Add(id=creds, dir=options.tls_dir),
            reason="load the server's x509 credentials; clients must show a certificate",
            undo=(ObjectDel(id=creds),),
        )
    ]
    authz = None
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
    return steps, creds, authz


def plan_server(
    spec: BackupSpec, facts: BackupFacts, options: BeginOptions
) -> tuple[NbdServer, list[Step]]:
    """The NBD server to export through, and the steps that start it (none if it runs).

    Raises InvalidInputError for TLS without its folder, PlanError when another backup's
    running server differs from the one asked for or no port was found.
    """
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
    server, addr = _server_address(spec, facts)
    steps: list[Step] = []
    creds = authz = None
    if server.tls:
        steps, creds, authz = _tls_steps(facts, options)
        server = server.model_copy(update={"objects": tuple(o for o in (creds, authz) if o)})
    steps.append(
        Step(
            command=NbdServerStart(addr=addr, tls_creds=creds, tls_authz=authz),
            reason=f"start the NBD server at {server.uri('')}",
            undo=(NbdServerStop(),),
        )
    )
    return server, steps


def stop_server(stop: bool, objects: Iterable[str], reason: str) -> list[Step]:
    """Stop the NBD server (when ``stop``, for ``reason``) and delete its TLS objects.

    Every step may fail: the server or an object may be gone already.
    """
    steps = [Step(command=NbdServerStop(), reason=reason, may_fail=True)] if stop else []
    steps += [
        Step(command=ObjectDel(id=o), reason=f"delete the object {o}", may_fail=True)
        for o in objects
    ]
    return steps
