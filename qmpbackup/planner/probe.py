"""The plan of a probe of QEMU's snapshot-access: a tiny fleecing to read across.

QEMU 7.2's snapshot-access answers a read that starts in clusters copy-before-write
has saved and runs past them with the guest's new data (fixed upstream in 8.0, with
``hbitmap_status()``); whether a given QEMU does is no part of its schema.  The plan
makes a 1 MiB source of zeroes in a file, a scratch over it, a fleecing job with its
copy-before-write filter, snapshot-access over that filter, and two NBD exports: the
filter, writable (what a guest writes goes through it), and the view.  The caller
writes through the first, reads across the second (see :data:`WRITE`, :data:`READ`),
then undoes the plan step by step.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..qapi.commands import (
    BlockdevAddFile,
    BlockdevAddQcow2,
    BlockdevAddRaw,
    BlockdevAddSnapshotAccess,
    BlockdevBackup,
    BlockdevCreate,
    BlockdevDel,
    BlockExportAddNbd,
    BlockExportDel,
    CreateFileOptions,
    CreateQcow2Options,
    JobCancel,
    NbdServerStart,
    NbdServerStop,
    UnixAddress,
    UnixSocketPath,
)
from ..state.active import NbdServer
from .disks import create_steps
from .naming import PREFIX
from .plan import Plan, Step

SIZE = 1 << 20
#: The guest's write: clusters 1 to 4 of the source, made non-zero.
WRITE = (64 << 10, 256 << 10)
#: The read that starts in those saved clusters and runs 256 KiB past them: it must
#: read zeroes, the source as it was at the instant.
READ = (64 << 10, 512 << 10)

_NAME = f"{PREFIX}probe"


class ProbePlan(BaseModel):
    """The probe's plan, and the NBD URIs of its two exports."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    plan: Plan
    writable: str  # the copy-before-write filter, written as a guest would
    view: str  # snapshot-access: the instant


def plan_snapshot_probe(folder: str, running: NbdServer | None) -> ProbePlan:
    """The probe's steps, its files in ``folder``; its exports on the ``running`` NBD
    server, or on one it starts on a unix socket in ``folder``."""
    source, scratch = f"{folder}/{_NAME}-source.raw", f"{folder}/{_NAME}-scratch.qcow2"
    steps: list[Step] = []
    for name, path in (("source", source), ("scratch", scratch)):
        steps += create_steps(
            BlockdevCreate(
                job_id=f"{_NAME}-create-{name}",
                options=CreateFileOptions(filename=path, size=SIZE if name == "source" else 0),
            ),
            f"create the probe's {name} file",
            (path,),
        )
        steps.append(_add(BlockdevAddFile(node_name=f"{_NAME}-{name}-file", filename=path)))
    steps.append(_add(BlockdevAddRaw(node_name=f"{_NAME}-source", file=f"{_NAME}-source-file")))
    steps += create_steps(
        BlockdevCreate(
            job_id=f"{_NAME}-create-qcow2",
            options=CreateQcow2Options(file=f"{_NAME}-scratch-file", size=SIZE),
        ),
        "format the probe's scratch",
    )
    steps.append(
        _add(
            BlockdevAddQcow2(
                node_name=f"{_NAME}-scratch",
                file=f"{_NAME}-scratch-file",
                backing=f"{_NAME}-source",
            )
        )
    )
    steps.append(
        Step(
            command=BlockdevBackup(
                job_id=f"{_NAME}-job",
                device=f"{_NAME}-source",
                target=f"{_NAME}-scratch",
                sync="none",
                filter_node_name=f"{_NAME}-cbw",
                auto_finalize=True,
                auto_dismiss=False,
            ),
            reason="fleece the probe's source",
            undo=(JobCancel(id=f"{_NAME}-job"),),
        )
    )
    steps.append(_add(BlockdevAddSnapshotAccess(node_name=f"{_NAME}-access", file=f"{_NAME}-cbw")))
    server = running
    if server is None:
        socket = f"{folder}/{_NAME}.sock"
        server = NbdServer(transport="unix", socket=socket)
        steps.append(
            Step(
                command=NbdServerStart(addr=UnixAddress(data=UnixSocketPath(path=socket))),
                reason="start an NBD server for the probe",
                undo=(NbdServerStop(),),
                created_files=(socket,),
            )
        )
    for export, node, writable in (("write", "cbw", True), ("view", "access", False)):
        steps.append(
            Step(
                command=BlockExportAddNbd(
                    id=f"{_NAME}-{export}",
                    node_name=f"{_NAME}-{node}",
                    name=f"{_NAME}-{export}",
                    writable=writable,
                ),
                reason=f"export the probe's {node} node",
                undo=(BlockExportDel(id=f"{_NAME}-{export}", mode="hard"),),
            )
        )
    return ProbePlan(
        plan=Plan(steps=tuple(steps)),
        writable=server.uri(f"{_NAME}-write"),
        view=server.uri(f"{_NAME}-view"),
    )


def _add(
    command: BlockdevAddFile | BlockdevAddRaw | BlockdevAddQcow2 | BlockdevAddSnapshotAccess,
) -> Step:
    return Step(
        command=command,
        reason=f"open the probe's node {command.node_name}",
        undo=(BlockdevDel(node_name=command.node_name),),
    )
