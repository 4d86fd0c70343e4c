"""Gathering what the planner needs: QEMU's state, the state directory, and probes of this host.

The planner looks nothing up; these functions do, just before it plans.  Each
returns plain data (:class:`~qmpbackup.planner.facts.BackupFacts`, an
:class:`~qmpbackup.planner.facts.Inventory`) that the pure planner takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .block_devices import device_use
from .errors import QmpBackupError
from .nbd import NBDClient
from .planner.disks import DiskChoice
from .planner.facts import BackupFacts, BeginOptions, DeviceFacts, Inventory
from .planner.probe import READ, WRITE, ProbePlan, plan_snapshot_probe
from .qapi.capabilities import Capabilities
from .qapi.schema import QAPISchema
from .qmp.graph import BlockGraph, graph_from_replies, query_graph_replies
from .qmp.jobs import query_jobs
from .qmp.session import QMPSession
from .request.models import BackupSpec
from .runner import StepCallback, rollback, run_journaled
from .state.active import ActiveBackup, NbdServer, running_server
from .state.directory import scratch_folder
from .state.probes import ProbeResults


def direct_io_works(folder: str) -> bool:
    """True when a file in ``folder`` can be opened with O_DIRECT (not on tmpfs, say)."""
    try:
        fd, path = tempfile.mkstemp(prefix=".qmpbackup-direct-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_bytes(folder: str) -> int:
    """Bytes an unprivileged writer can still put in ``folder`` (or in its nearest existing
    parent, for a folder not made yet)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def find_free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now, for the NBD server."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def device_facts(path: str, graph: BlockGraph | None) -> DeviceFacts:
    """What ``path``, named as a block device, is now: a block device or not, its size,
    and whether it is in use: mounted (it or a partition), held by another kernel device
    (``/sys/dev/block/*/holders``, or an exclusive open refused), open in QEMU."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return DeviceFacts(kind="missing")
    if not stat.S_ISBLK(st.st_mode):
        return DeviceFacts(kind="other")
    use = device_use(path)
    return DeviceFacts(
        kind="block",
        size=use.size,
        mounts=use.mounts,
        holders=use.holders,
        qemu_nodes=tuple(_nodes_on(st.st_rdev, graph)),
    )


def _nodes_on(rdev: int, graph: BlockGraph | None) -> list[str]:
    """The nodes of QEMU whose file is the block device ``rdev``."""
    found = []
    for node in graph.nodes.values() if graph else ():
        with contextlib.suppress(OSError):
            st = os.stat(node.filename) if node.filename.startswith("/") else None
            if st is not None and stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                found.append(node.node_name)
    return found


async def backup_facts(
    session: QMPSession,
    spec: BackupSpec,
    choices: Sequence[DiskChoice],
    active: Sequence[ActiveBackup],
    *,
    backup_id: int,
    now: int,
    state_dir: Path,
    capabilities: Capabilities,
    options: BeginOptions | None = None,
    graph: BlockGraph | None = None,
) -> BackupFacts:
    """What a ``backup-begin`` of ``choices`` needs to know besides the graph: the files
    they name, the backups ``active`` now, QEMU's jobs, the NBD server, the host's probes
    (and, for bounded pull scratches, the free space of their folders).

    Host probes (O_DIRECT, a free port) are made only when QEMU runs on this host,
    reached over a unix socket.  Block devices named by ``type='block'`` are looked at
    here (is it one, its size, is it in use: mounted, held, open in ``graph``'s QEMU).
    """
    running = running_server(active)
    wanted = spec.server
    free_port = None
    if spec.mode == "pull" and running is None and wanted is not None and not wanted.port:
        free_port = find_free_port(wanted.name or "localhost")
    local = isinstance(session.address, str)
    bounded = spec.mode == "pull" and options is not None and options.scratch_reserve
    return BackupFacts(
        backup_id=backup_id,
        now=now,
        capabilities=capabilities,
        existing_files=frozenset(c.target for c in choices if os.path.lexists(c.target)),
        devices={c.target: device_facts(c.target, graph) for c in choices if c.device},
        busy_disks={d.disk: r.id for r in active for d in r.disks},
        job_ids=frozenset(await query_jobs(session)),
        scratch_dir=str(scratch_folder(state_dir)),
        default_socket=str(state_dir / "nbd.sock"),
        free_port=free_port,
        running_server=running,
        export_names=frozenset(d.export for r in active for d in r.disks if d.export),
        direct_io_dirs=frozenset(
            folder
            for folder in {os.path.dirname(c.target) for c in choices if not c.device}
            if spec.mode == "push"
            and local
            and (options is None or options.direct_io)
            and direct_io_works(folder)
        ),
        free_space={
            folder: free_bytes(folder)
            for folder in {os.path.dirname(c.target) for c in choices}
            if bounded
        },
    )


async def inventory(
    session: QMPSession, capabilities: Capabilities
) -> tuple[Inventory, BlockGraph]:
    """What recovery looks at in QEMU, and the block graph read in the same queries."""
    debug = capabilities.debug_block_graph
    replies = await query_graph_replies(session, debug)
    block = graph_from_replies(replies)
    nodes = replies["query-named-block-nodes"]
    edges: list[tuple[str, str]] = []
    if debug:
        graph = replies["x-debug-query-block-graph"]
        names = {n["id"]: n["name"] for n in graph["nodes"] if n["type"] == "block-driver"}
        edges = [
            (names[e["parent"]], names[e["child"]])
            for e in graph["edges"]
            if e["parent"] in names and e["child"] in names
        ]
    objects = await session.execute("qom-list", {"path": "/objects"})
    disk_of = {n: disk.name for disk in block.disks.values() for n in disk.chain}
    found = Inventory(
        jobs=await query_jobs(session),
        exports=tuple(e["id"] for e in await session.execute("query-block-exports")),
        nodes=tuple(n["node-name"] for n in nodes),
        edges=tuple(edges),
        bitmaps=tuple(
            (n["node-name"], b["name"])
            for n in nodes
            for b in n.get("dirty-bitmaps", ())
            if b.get("name")
        ),
        persistent=tuple(
            (n["node-name"], b["name"])
            for n in nodes
            for b in n.get("dirty-bitmaps", ())
            if b.get("name") and b.get("persistent")
        ),
        objects=tuple(o["name"] for o in objects),
        inconsistent=tuple(
            (disk_of[node.node_name], node.node_name, b.name)
            for node in block.nodes.values()
            if node.node_name in disk_of
            for b in node.bitmaps
            if b.inconsistent
        ),
        disk_of=disk_of,
    )
    return found, block


def scratch_files(state_dir: Path) -> list[str]:
    """The files in the state directory's scratch folder (pull scratches qmpbackup made)."""
    scratch = scratch_folder(state_dir)
    return sorted(str(p) for p in scratch.iterdir()) if scratch.is_dir() else []


async def probe_snapshot_overread(
    session: QMPSession,
    schema: QAPISchema,
    state_dir: Path,
    running: NbdServer | None,
    on_step: StepCallback | None = None,
) -> bool:
    """Whether this QEMU's snapshot-access answers a read that starts in clusters
    copy-before-write saved and runs past them with new data: a tiny fleecing is made
    (:mod:`qmpbackup.planner.probe`), written through and read across over NBD, and
    undone. Raises what :func:`~qmpbackup.runner.run_plan` raises, and NBDError."""
    folder = state_dir / "probe"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    planned = plan_snapshot_probe(str(folder), running)
    journal = await run_journaled(session, schema, planned.plan, state_dir, "probe", on_step)
    try:
        return await asyncio.to_thread(_reads_past_saved_clusters, planned)
    finally:
        await rollback(session, list(planned.plan.steps))
        journal.close("done")


def _reads_past_saved_clusters(planned: ProbePlan) -> bool:
    """Write as a guest through the filter, then read across what it saved."""
    offset, length = WRITE
    with NBDClient.connect(planned.writable) as guest:
        guest.pwrite(b"\x5a" * length, offset)
        guest.flush()
        if guest.pread(length, offset) != b"\x5a" * length:
            raise QmpBackupError("the snapshot-access probe could not write its source")
    offset, length = READ
    with NBDClient.connect(planned.view) as reader:
        return reader.pread(length, offset) != bytes(length)


async def probed_capabilities(
    session: QMPSession,
    schema: QAPISchema,
    state_dir: Path,
    capabilities: Capabilities,
    running: NbdServer | None,
    on_step: StepCallback | None = None,
) -> Capabilities:
    """``capabilities`` with what the snapshot-access probe finds on this QEMU build: run
    once per build, then remembered in the state directory."""
    results = ProbeResults(state_dir)
    found = results.get(capabilities.version, OVERREAD_PROBE)
    if found is None:
        found = await probe_snapshot_overread(session, schema, state_dir, running, on_step)
        if capabilities.version:
            results.remember(capabilities.version, OVERREAD_PROBE, found)
    return capabilities.model_copy(update={"snapshot_overread": found})


def remembered_capabilities(state_dir: Path, capabilities: Capabilities) -> Capabilities:
    """``capabilities`` with what an earlier probe of this QEMU build found, if one ran."""
    found = ProbeResults(state_dir).get(capabilities.version, OVERREAD_PROBE)
    if found is None:
        return capabilities
    return capabilities.model_copy(update={"snapshot_overread": found})


OVERREAD_PROBE = "snapshot_overread"
