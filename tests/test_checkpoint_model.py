"""Checkpoints against a real QEMU, checked against a model (hypothesis, stateful).

Random sequences of guest writes (data, zeroes, discards), checkpoint creations
(some disks left out, custom bitmap names), deletions (with and without
children), measurements (``VM.checkpoint_sizes``) and, in a few runs, a push
incremental backup.  The model keeps, per checkpoint and disk, the 64 KiB
clusters written since the checkpoint was made (the bitmaps' granularity is the
qcow2 cluster size); every live checkpoint records on its own, so deleting one
changes nothing for the others.

One QEMU serves every run of a test; each run gets a fresh state directory and
ends by removing every bitmap.  The API's clock is replaced: ``ticking`` gives
each call a new second, ``same-second`` gives every call the same one (what a
script creating checkpoints in a row sees with second-resolution creation
times).

Longer hunt (more runs and longer sequences)::

    QMPBACKUP_HYPOTHESIS_EXAMPLES=500 python -m pytest -q tests/test_checkpoint_model.py

``QMPBACKUP_HYPOTHESIS_EXAMPLES`` is the number of runs (sequences) of the
ticking-clock test (default 25; the same-second test makes half as many), and
``QMPBACKUP_HYPOTHESIS_STEPS`` the longest sequence (default 40).
A failing sequence is shrunk to a minimal one only in that long hunt, or with
``QMPBACKUP_HYPOTHESIS_SHRINK=1``: against QEMU, shrinking takes minutes, so the
default run reports the sequence as found.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import qmpbackup.api
from qmpbackup.api import VM
from qmpbackup.demo.throwaway import ThrowawayVM, make_slides_images
from qmpbackup.errors import (
    ConnectionFailedError,
    InvalidInputError,
    QmpBackupError,
    UnknownCheckpointError,
)
from qmpbackup.request import BackupSpec, CheckpointDiskSpec, CheckpointSpec, DiskBackupSpec

from .support import CLUSTER, allocated_clusters, clusters_of

T = TypeVar("T")

RUNS = int(os.environ.get("QMPBACKUP_HYPOTHESIS_EXAMPLES", "25"))
STEPS = int(os.environ.get("QMPBACKUP_HYPOTHESIS_STEPS", "40"))
# Shrinking a failure against QEMU takes minutes: only in the long hunt, or when asked.
SHRINK = any(
    os.environ.get(v) for v in ("QMPBACKUP_HYPOTHESIS_EXAMPLES", "QMPBACKUP_HYPOTHESIS_SHRINK")
)
# Push backups per run: each takes a few tenths of a second.
BACKUPS_PER_RUN = 1

MiB = 1024 * 1024
SIZES = {"vda": 64 * MiB, "vdb": 100 * MiB}
DISKS = tuple(SIZES)
# Names that collide often: checkpoints and bitmaps share one pool.
NAMES = ("c1", "c2", "c3", "c10", "b", "a", "Z9", "x.y", "m-1", "m+2")
BITMAPS = (*NAMES, "bm-1", "bm-2")


# --------------------------------------------------------------------------
# One QEMU for every run


class Rig:
    """A QEMU with the slides' disks, its event loop, and a QMP connection for the API."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.vm = ThrowawayVM(workdir / "vm", make_slides_images(workdir / "vm"), name="modelvm")
        self.api: VM | None = None
        self.runs = 0

    async def start(self, attempts: int = 3) -> None:
        """Start QEMU and connect the API's session."""
        # QEMU creates its sockets before it listens on them: a connect can be refused.
        for attempt in range(attempts):
            try:
                await self.vm.start()
                break
            except ConnectionFailedError:
                await self.vm.kill()
                if attempt == attempts - 1:
                    raise
        self.api = await VM.connect(str(self.vm.qmp_path), self.workdir / "state-0")

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on the rig's loop."""
        return self.loop.run_until_complete(coro)

    def fresh(self) -> tuple[VM, Path]:
        """An API object over the same connection with an empty state dir, and a work dir."""
        assert self.api is not None, "start() first"
        self.runs += 1
        run_dir = self.workdir / f"run-{self.runs}"
        run_dir.mkdir()
        base = self.api
        return VM(base.session, base.schema, run_dir / "state", base.name, base.key), run_dir

    async def bitmaps(self) -> dict[str, dict[str, int]]:
        """``{disk: {bitmap: dirty bytes}}`` on each disk's top node, as QEMU holds them."""
        nodes = await self.vm.session.execute("query-named-block-nodes", {"flat": True})
        by_node = {n["node-name"]: n for n in nodes}
        return {
            disk: {b["name"]: b["count"] for b in by_node[f"{disk}-fmt"].get("dirty-bitmaps", [])}
            for disk in DISKS
        }

    async def scrub(self) -> None:
        """Remove every bitmap, job and qmpbackup node: the next run starts clean."""
        session = self.vm.session
        for job in await session.execute("query-jobs"):
            with contextlib.suppress(QmpBackupError):
                await session.execute("job-cancel", {"id": job["id"], "force": True})
            with contextlib.suppress(QmpBackupError):
                await session.execute("job-dismiss", {"id": job["id"]})
        for _ in range(2):  # a format node first, then the protocol node under it
            for node in await session.execute("query-named-block-nodes", {"flat": True}):
                if node["node-name"].startswith("qmpbackup-"):
                    with contextlib.suppress(QmpBackupError):
                        await session.execute("blockdev-del", {"node-name": node["node-name"]})
        for disk, found in (await self.bitmaps()).items():
            for name in found:
                await session.execute(
                    "block-dirty-bitmap-remove", {"node": f"{disk}-fmt", "name": name}
                )

    def close(self) -> None:
        """Disconnect, quit QEMU, close the loop."""
        if self.api is not None:
            self.run(self.api.close())
        self.run(self.vm.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """One QEMU for every run of this module's tests."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README's setup")
    with tempfile.TemporaryDirectory(prefix="qmpbackup-model-") as tmp:
        machine = Rig(Path(tmp))
        try:
            machine.run(machine.start())
            yield machine
        finally:
            machine.close()


class Clock:
    """Replaces ``time`` in qmpbackup.api: each ``time()`` one second later, or always the same."""

    def __init__(self, ticking: bool) -> None:
        self.ticking = ticking
        self.now = 1_700_000_000.0

    def time(self) -> float:
        if self.ticking:
            self.now += 1
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


# --------------------------------------------------------------------------
# The model


@dataclass
class Point:
    """A checkpoint of the model: its bitmap per covered disk, and what was written since."""

    name: str
    bitmaps: dict[str, str]
    # Clusters written (data, zeroes or discard) since the checkpoint, per disk.
    dirty: dict[str, set[int]] = field(default_factory=dict)
    # Of those, the clusters that hold data the guest wrote (not zeroed or discarded since).
    data: dict[str, set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for disk in self.bitmaps:
            self.dirty.setdefault(disk, set())
            self.data.setdefault(disk, set())


def disk_entry(disk: str, how: str, bitmap: str) -> CheckpointDiskSpec | None:
    """How a checkpoint spec lists ``disk``: not at all, ``no``, or with its own bitmap."""
    if how == "unlisted":
        return None
    if how == "no":
        return CheckpointDiskSpec(name=disk, checkpoint="no")
    if how == "listed":
        return CheckpointDiskSpec(name=disk)
    return CheckpointDiskSpec(name=disk, bitmap=bitmap)


# An existing checkpoint by position, or a name that may be unknown.
choices = st.one_of(st.integers(0, 20), st.sampled_from(NAMES))


class CheckpointModel(RuleBasedStateMachine):
    """Checkpoint operations on the rig's QEMU, each checked against :class:`Point`s."""

    rig: ClassVar[Rig]

    def __init__(self) -> None:
        super().__init__()
        self.api, self.dir = self.rig.fresh()
        self.live: list[Point] = []  # oldest first
        self.backups = 0
        self.pattern = 0

    # -- helpers ------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.rig.run(coro)

    def find(self, which: int | str) -> str:
        """The checkpoint name ``which`` designates (an unknown one for some names)."""
        if isinstance(which, int):
            return self.live[which % len(self.live)].name if self.live else "none"
        return which

    def point(self, name: str) -> Point | None:
        return next((p for p in self.live if p.name == name), None)

    def expected_sizes(self, point: Point) -> dict[str, int]:
        return {disk: len(point.dirty[disk]) * CLUSTER for disk in point.bitmaps}

    # -- rules --------------------------------------------------------------

    @rule(
        disk=st.sampled_from(DISKS),
        kind=st.sampled_from(["data", "data", "data", "zero", "discard"]),
        cluster=st.integers(0, 40) | st.integers(0, 1599),
        sectors=st.sampled_from([0, 0, 0, 1, 17, 127]),
        length=st.integers(1, 16).map(lambda n: n * CLUSTER)
        | st.integers(1, 300).map(lambda n: n * 512),
    )
    def write(self, disk: str, kind: str, cluster: int, sectors: int, length: int) -> None:
        """The guest writes data or zeroes, or discards; every live checkpoint sees it."""
        size = SIZES[disk]
        offset = (cluster % (size // CLUSTER)) * CLUSTER
        if kind == "data":
            offset += sectors * 512
        else:
            # Zeroes and discards are whole clusters, so the model knows what holds data.
            length = -(-length // CLUSTER) * CLUSTER
        length = min(length, size - offset)
        if kind == "data":
            self.pattern = self.pattern % 255 + 1
            self.run(self.rig.vm.write(disk, self.pattern, offset, length))
        elif kind == "zero":
            self.run(self.rig.vm.guest_io(disk, f"write -z {offset} {length}"))
        else:
            self.run(self.rig.vm.guest_io(disk, f"discard {offset} {length}"))
        touched = clusters_of(offset, length)
        event(f"write: {kind}")
        for point in self.live:
            if disk in point.bitmaps:
                point.dirty[disk] |= touched
                if kind == "data":
                    point.data[disk] |= touched
                else:
                    point.data[disk] -= touched

    @rule(
        name=st.sampled_from(NAMES),
        how=st.tuples(*[st.sampled_from(["unlisted", "unlisted", "listed", "no", "bitmap"])] * 2),
        bitmap=st.sampled_from(BITMAPS),
    )
    def create(self, name: str, how: tuple[str, ...], bitmap: str) -> None:
        """checkpoint_create: refused for a taken name or bitmap, or when it covers no disk."""
        entries = [disk_entry(d, h, bitmap) for d, h in zip(DISKS, how, strict=True)]
        spec = CheckpointSpec(name=name, disks=tuple(e for e in entries if e is not None))
        # libvirt's meaning: once any disk is listed, an unlisted one gets no bitmap.
        listed = any(h != "unlisted" for h in how)
        wanted = {
            d: bitmap if h == "bitmap" else name
            for d, h in zip(DISKS, how, strict=True)
            if h != "no" and not (h == "unlisted" and listed)
        }
        taken = any(b == p.bitmaps.get(d) for p in self.live for d, b in wanted.items())
        if self.point(name) is not None or not wanted or taken:
            event("create: refused")
            with pytest.raises(InvalidInputError):
                self.run(self.api.checkpoint_create(spec))
            return
        event(f"create: {len(wanted)} disk(s)")
        made, frozen = self.run(self.api.checkpoint_create(spec))
        assert frozen is None
        assert {d.name: d.bitmap for d in made.bitmap_disks()} == wanted
        assert made.parent == (self.live[-1].name if self.live else None)
        self.live.append(Point(name, wanted))

    @rule(which=choices, children=st.booleans())
    def delete(self, which: int | str, children: bool) -> None:
        """checkpoint_delete: the checkpoint (and with ``children`` every later one) goes."""
        name = self.find(which)
        point = self.point(name)
        if point is None:
            with pytest.raises(UnknownCheckpointError):
                self.run(self.api.checkpoint_delete(name, children=children))
            return
        event("delete with children" if children else "delete")
        at = self.live.index(point)
        doomed = self.live[at:] if children else [point]
        assert self.run(self.api.checkpoint_delete(name, children=children)) == [
            p.name for p in doomed
        ]
        self.live = [p for p in self.live if p not in doomed]

    @rule(which=choices)
    def measure(self, which: int | str) -> None:
        """checkpoint_sizes: bytes dirtied since the checkpoint, per covered disk."""
        name = self.find(which)
        point = self.point(name)
        if point is None:
            with pytest.raises(UnknownCheckpointError):
                self.run(self.api.checkpoint_sizes(name))
            return
        event("measure: dirty" if any(self.expected_sizes(point).values()) else "measure: clean")
        assert self.run(self.api.checkpoint_sizes(name)) == self.expected_sizes(point)

    @precondition(lambda self: self.live and self.backups < BACKUPS_PER_RUN)
    @rule(which=st.integers(0, 20), new=st.none() | st.sampled_from(NAMES))
    def backup(self, which: int, new: str | None) -> None:
        """A push incremental from a checkpoint holds exactly the clusters written since."""
        self.backups += 1
        point = self.live[which % len(self.live)]
        files = {d: self.dir / f"inc{self.backups}-{d}.qcow2" for d in point.bitmaps}
        disks = tuple(
            DiskBackupSpec(name=d, target=str(files[d]), format="qcow2")
            if d in files
            else DiskBackupSpec(name=d, backup=False)
            for d in DISKS
        )
        spec = BackupSpec(mode="push", incremental=point.name, disks=disks)
        checkpoint = CheckpointSpec(name=new) if new is not None else None
        if new is not None and (
            self.point(new) is not None
            or any(new == p.bitmaps.get(d) for p in self.live for d in files)
        ):
            with pytest.raises(InvalidInputError):
                self.run(self.api.backup_begin(spec, checkpoint))
            return
        event("backup" + (" with a checkpoint" if new else ""))
        begun = self.run(self.api.backup_begin(spec, checkpoint))
        self.run(self.api.wait_backup(begun.record.id))
        ended = self.run(self.api.backup_end(begun.record.id))
        assert (ended.outcome, ended.errors, ended.dropped_checkpoint) == ("completed", {}, None)
        for disk, path in files.items():
            allocated = allocated_clusters(path)
            # Zeroed or discarded clusters may be copied as zero clusters or left out.
            assert point.data[disk] <= allocated <= point.dirty[disk], disk
            if point.data[disk] == point.dirty[disk]:
                assert allocated == point.dirty[disk]
        if new is not None:
            assert begun.checkpoint is not None
            assert begun.checkpoint.parent == (self.live[-1].name if self.live else None)
            self.live.append(Point(new, {d: new for d in files}))

    # -- invariants ---------------------------------------------------------

    @invariant()
    def qemu_holds_the_model(self) -> None:
        """Each disk has exactly the live checkpoints' bitmaps, each with the model's count."""
        expected = {
            disk: {
                p.bitmaps[disk]: len(p.dirty[disk]) * CLUSTER
                for p in self.live
                if disk in p.bitmaps
            }
            for disk in DISKS
        }
        assert self.run(self.rig.bitmaps()) == expected

    @invariant()
    def metadata_is_a_chain(self) -> None:
        """Checkpoints list oldest first, each the child of the one before."""
        listed = [(c.name, c.parent) for c in self.api.checkpoints()]
        names = [p.name for p in self.live]
        assert listed == list(zip(names, [None, *names], strict=False))

    def teardown(self) -> None:
        self.run(self.rig.scrub())
        shutil.rmtree(self.dir, ignore_errors=True)


def run_model(rig: Rig, ticking: bool, runs: int = RUNS) -> None:
    """Run the state machine ``runs`` times with the API's clock replaced."""
    machine = type("Model", (CheckpointModel,), {"rig": rig})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qmpbackup.api, "time", Clock(ticking))
        run_state_machine_as_test(  # type: ignore[no-untyped-call]
            machine,
            settings=settings(
                max_examples=runs,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=list(Phase) if SHRINK else [Phase.explicit, Phase.reuse, Phase.generate],
            ),
        )


@pytest.mark.qemu
def test_checkpoint_model_ticking_clock(rig: Rig) -> None:
    """Every operation at its own second."""
    run_model(rig, ticking=True)
    assert rig.run(rig.bitmaps()) == {disk: {} for disk in DISKS}


@pytest.mark.qemu
def test_checkpoint_model_same_second(rig: Rig) -> None:
    """Every operation within one second: creation order must still be kept."""
    run_model(rig, ticking=False, runs=max(1, RUNS // 2))
    assert rig.run(rig.bitmaps()) == {disk: {} for disk in DISKS}


@pytest.mark.qemu
def test_same_second_checkpoints_keep_creation_order(rig: Rig) -> None:
    """c2, c1, c3 made within one second: a chain in that order; c1 with children is c1, c3.

    The minimal sequence the same-second model run finds, kept as a plain test.
    """
    api, run_dir = rig.fresh()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(qmpbackup.api, "time", Clock(ticking=False))
            made = [
                rig.run(api.checkpoint_create(CheckpointSpec(name=n)))[0]
                for n in ("c2", "c1", "c3")
            ]
            assert [(c.name, c.parent) for c in made] == [("c2", None), ("c1", "c2"), ("c3", "c1")]
            assert [c.name for c in api.checkpoints()] == ["c2", "c1", "c3"]
            assert rig.run(api.checkpoint_delete("c1", children=True)) == ["c1", "c3"]
            assert rig.run(rig.bitmaps()) == {disk: {"c2": 0} for disk in DISKS}
    finally:
        rig.run(rig.scrub())
        shutil.rmtree(run_dir, ignore_errors=True)
