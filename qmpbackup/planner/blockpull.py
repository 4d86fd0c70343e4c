"""Plan ``blockpull``: stream a disk's whole backing chain into its top layer.

One ``block-stream`` job, with no base, into the disk's top format node (the node a
``-blockdev`` on an instant restore's overlay names): QEMU copies every cluster the top
layer does not hold from the chain below, then drops the backing link. Until that last
step the image keeps its backing file, and every cluster copied equals what the chain
holds, so the image is valid at every instant: a killed run or QEMU leaves it as good
as before, and the pull starts again. ``--abort`` is one ``job-cancel``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import InvalidInputError, PlanError
from ..qapi.capabilities import Capabilities
from ..qapi.commands import BlockStream, JobCancel
from ..qmp.graph import BlockGraph
from ..qmp.jobs import JobState
from .naming import pull_job
from .plan import Plan, Step


def plan_blockpull(
    graph: BlockGraph,
    disk: str,
    capabilities: Capabilities,
    jobs: Mapping[str, JobState],
    bandwidth: int | None = None,
) -> Plan:
    """The plan starting the pull of ``disk``; empty when its pull job already runs
    (a second ``blockpull`` follows it). UnknownDiskError for an unknown disk,
    InvalidInputError for a bad bandwidth or a disk with nothing to pull, PlanError
    when this QEMU has no ``block-stream``."""
    if bandwidth is not None and bandwidth < 1:
        raise InvalidInputError(
            f"--bandwidth must be a positive number of bytes/s, not {bandwidth}"
        )
    found = graph.disk(disk)
    job = pull_job(found.name)
    if job in jobs and jobs[job].status not in ("concluded", "null"):
        return Plan()
    top = graph.node(found.top)
    if top.backing_child is None and top.backing_filename is None:
        raise InvalidInputError(f"disk {found.name} has no backing file: nothing to pull")
    if found.read_only:
        raise InvalidInputError(f"disk {found.name} is read-only: its top layer cannot be written")
    if not capabilities.block_stream:
        raise PlanError("this QEMU has no block-stream command: blockpull needs it")
    backing = top.backing_filename or graph.node(top.backing_child or "").filename
    step = Step(
        command=BlockStream(job_id=job, device=found.top, speed=bandwidth),
        reason=f"copy into {graph.image_path(top)} every cluster {found.name} still reads "
        f"from its backing chain ({backing}), then drop the backing link",
        undo=(JobCancel(id=job),),
        lane=found.name,
    )
    return Plan(steps=(step,))


def plan_pull_abort(disk: str, jobs: Mapping[str, JobState]) -> Plan:
    """The plan cancelling the pull of ``disk``: what was copied stays in the top layer,
    which keeps its backing file. InvalidInputError when no pull of it runs."""
    job = pull_job(disk)
    if job not in jobs or jobs[job].status in ("concluded", "null"):
        raise InvalidInputError(f"no blockpull of disk {disk} is running")
    step = Step(
        command=JobCancel(id=job),
        reason=f"stop the pull of {disk}: the clusters copied so far stay, the backing file too",
    )
    return Plan(steps=(step,))
