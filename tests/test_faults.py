"""Faults during a backup, on a real QEMU: each shows its one-line message, leaves no
``qmpbackup-`` node, job, export or stray checkpoint, and lets the next backup be correct."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from qmpbackup.demo.throwaway import (
    DiskImage,
    ThrowawayVM,
    images_equal,
    make_slides_images,
    qemu_img,
    qemu_io,
)
from qmpbackup.errors import QmpBackupError
from qmpbackup.images.pull_copy import pull_copy
from qmpbackup.nbd import NBDError
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import restore
from qmpbackup.request import BackupSpec, DiskBackupSpec, backup_to_xml
from qmpbackup.state.active import ActiveBackupStore
from qmpbackup.state.checkpoints import CheckpointStore

from .qmp_cutter import QmpCutter
from .support import CLUSTER, Cli, CliResult, rebase
from .test_pull_backup import uris

MiB = 1024 * 1024
# vdb's guest offset that the faulty backups trip over.
BAD = 32 * MiB


def backup_xml(
    path: Path,
    mode: Literal["push", "pull"],
    disks: Mapping[str, Mapping[str, Any]],
    incremental: str | None = None,
) -> Path:
    """A ``<domainbackup>``; ``disks`` maps a disk to its other fields."""
    entries = tuple(DiskBackupSpec(name=name, **fields) for name, fields in disks.items())
    spec = BackupSpec(mode=mode, incremental=incremental, disks=entries)
    path.write_text(backup_to_xml(spec))
    return path


def push_to(
    path: Path, target: Path, incremental: str | None = None, **more: Mapping[str, Any]
) -> Path:
    """Push vdb alone into a qcow2 ``target`` (``more``: other disks' fields)."""
    disks: dict[str, Mapping[str, Any]] = {
        "vda": {"backup": False},
        "vdb": {"target": str(target), "format": "qcow2"},
    }
    return backup_xml(path, "push", {**disks, **more}, incremental)


def pull_vdb(
    path: Path, incremental: str | None = None, vdb: Mapping[str, Any] | None = None
) -> Path:
    """Pull vdb alone (``vdb``: its other fields)."""
    return backup_xml(path, "pull", {"vda": {"backup": False}, "vdb": vdb or {}}, incremental)


async def base_checkpoint(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> Path:
    """check1 on vda and vdb, and vdb's content at that instant as a qcow2 (the last good
    backup that later incrementals from check1 are rebased onto)."""
    ref = await vm.reference("vdb", tmp_path / "base.raw")
    if len(vm.disks) == 2:
        await cli.ok("checkpoint-create-as", "check1")
    else:
        spec = tmp_path / "check1.xml"
        spec.write_text(
            "<domaincheckpoint><name>check1</name><disks>"
            + "".join(f"<disk name='{d.name}' checkpoint='no'/>" for d in vm.disks[2:])
            + "</disks></domaincheckpoint>"
        )
        await cli.ok("checkpoint-create", str(spec))
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(ref), str(base))
    return base


async def settle(vm: ThrowawayVM, timeout: float = 30) -> list[dict[str, object]]:
    """Wait until no QEMU job is still running; return query-jobs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        jobs: list[dict[str, object]] = await vm.session.execute("query-jobs")
        if all(j["status"] == "concluded" for j in jobs):
            return jobs
        assert loop.time() < deadline, jobs
        await asyncio.sleep(0.02)


async def next_incremental(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, since: str, base: Path
) -> None:
    """The next backup: a push incremental of vdb from ``since`` that, rebased onto
    ``base``, equals vdb at its instant (writes after the instant excluded)."""
    ref = await vm.reference("vdb", tmp_path / "next.raw")
    target = tmp_path / "next.qcow2"
    others = {d.name: {"backup": False} for d in vm.disks[2:]}
    spec = push_to(tmp_path / "next.xml", target, since, **others)
    begun = await cli.ok("backup-begin", str(spec))
    assert "Backup id 1 created" in begun.out
    await vm.write("vdb", 0x99, 0, 2 * MiB)
    await settle(vm)
    assert (await cli.ok("backup-end", "1")).out == "Backup id 1 completed\n"
    rebase(target, base)
    assert images_equal(target, ref)


async def assert_clean(
    vm: ThrowawayVM,
    cli: Cli,
    checkpoints: Sequence[str],
    vda: Sequence[str] | None = None,
    via_cli: bool = True,
) -> None:
    """Nothing of qmpbackup's is left in QEMU or in the state directory's records;
    ``checkpoints`` (oldest first) are exactly the recorded checkpoints (as
    ``checkpoint-list`` prints them when ``via_cli``) and vdb's bitmaps; vda holds the
    bitmaps ``vda`` (default: the same), and no other node holds any."""
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    assert [n["node-name"] for n in nodes if n["node-name"].startswith("qmpbackup-")] == []
    assert await vm.session.execute("query-jobs") == []
    assert await vm.session.execute("query-block-exports") == []
    if via_cli:
        listed = (await cli.ok("checkpoint-list", "--name")).out.split()
    else:
        listed = [c.name for c in CheckpointStore(cli.state_dir).load_all()]
    assert listed == list(checkpoints)
    bitmaps = {
        n["node-name"]: {b.get("name") for b in n.get("dirty-bitmaps", [])}
        for n in nodes
        if n.get("dirty-bitmaps")
    }
    expected = {"vda-fmt": set(checkpoints if vda is None else vda), "vdb-fmt": set(checkpoints)}
    assert bitmaps == {node: names for node, names in expected.items() if names}
    assert ActiveBackupStore(cli.state_dir).load_all() == []


def one_line_error(result: CliResult) -> str:
    """The ``error:`` line of a run that failed at run time (exit 1)."""
    assert result.rc == 1, result
    return [line for line in result.err.splitlines() if line.startswith("error: ")][-1]


def only_line(result: CliResult) -> bool:
    """True when stderr is that one ``error:`` line and nothing else (SPEC §3)."""
    return len(result.err.strip().splitlines()) == 1


async def spawn(cli: Cli, *args: str) -> asyncio.subprocess.Process:
    """Start ``qmpbackup`` as ``cli`` runs it, with pipes, without waiting for it."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpbackup", "--qmp", str(cli.qmp or cli.vm.qmp_path),
        "--state-dir", str(cli.state_dir), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, limit=1 << 24,
    )  # fmt: skip


async def read_until(stream: asyncio.StreamReader | None, *words: str) -> list[str]:
    """Lines of ``stream`` up to the first that holds all ``words``."""
    assert stream is not None
    lines: list[str] = []
    while not lines or not all(word in lines[-1] for word in words):
        line = await stream.readline()
        assert line, f"{words} never printed: {lines}"
        lines.append(line.decode().rstrip("\n"))
    return lines


def host_offset(image: Path, guest: int) -> int | None:
    """Where ``image``'s top layer stores the guest offset ``guest`` (None if not there)."""
    for extent in json.loads(qemu_img("map", "-U", "--output=json", str(image))):
        start, end = int(extent["start"]), int(extent["start"] + extent["length"])
        if start <= guest < end and extent["depth"] == 0 and extent["data"]:
            return int(extent["offset"]) + guest - start
    return None


async def guest_write_error(
    vm: ThrowawayVM, disk: str, pattern: int, offset: int, n: int
) -> str | None:
    """A guest write; its error, if it failed."""
    try:
        await vm.write(disk, pattern, offset, n)
    except QmpBackupError as exc:
        return str(exc)
    return None


# -- 1. source read errors ----------------------------------------------------


class FilteredVM(ThrowawayVM):
    """A ThrowawayVM where a filter sits between a disk's qcow2 node and its file:
    ``filters[disk]`` is the filter's ``-blockdev`` options, ``{child}`` its file node."""

    def __init__(
        self,
        workdir: Path,
        disks: Sequence[DiskImage],
        filters: dict[str, str],
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, disks, name="filtered")
        self.filters = filters
        self.extra = list(extra)
        self.bad_host = 0  # bad_vm: the host offset whose first read fails

    def command_line(self) -> list[str]:
        """The usual command line; ``<disk>-file`` is the filter over ``<disk>-proto``."""
        argv: list[str] = []
        for arg in super().command_line():
            for disk, options in self.filters.items():
                if arg.startswith("driver=file,") and f"node-name={disk}-file," in arg:
                    argv += [arg.replace(f"={disk}-file,", f"={disk}-proto,"), "-blockdev"]
                    arg = options.format(child=f"{disk}-proto") + f",node-name={disk}-file"
            argv.append(arg)
        return argv + self.extra


@pytest.fixture
async def bad_vm(tmp_path: Path) -> AsyncIterator[FilteredVM]:
    """vdb's qcow2 sits on blkdebug: the first read of the host cluster that the guest's
    next new cluster (written at BAD) gets fails once with EIO."""
    disks = make_slides_images(tmp_path / "vm")
    active = disks[1].path
    # Allocate vdb's L2 table now: the next data cluster then goes at the end of the file.
    qemu_io(str(active), f"write -P 0x55 {8 * MiB} {MiB}", fmt="qcow2")
    bad_host = -(-active.stat().st_size // CLUSTER) * CLUSTER
    rule = (
        "driver=blkdebug,image={child},inject-error.0.event=read_aio,"
        "inject-error.0.iotype=read,inject-error.0.errno=5,inject-error.0.once=on,"
        f"inject-error.0.sector={bad_host // 512}"
    )
    machine = FilteredVM(tmp_path / "vm", disks, {"vdb": rule})
    machine.bad_host = bad_host
    await machine.start()
    try:
        yield machine
    finally:
        await machine.stop()


async def write_bad_cluster(vm: FilteredVM) -> None:
    """The guest writes the cluster whose first read will fail, and one more."""
    await vm.write("vdb", 0x66, BAD, CLUSTER)
    await vm.write("vdb", 0x67, 40 * MiB, CLUSTER)
    await vm.guest_io("vdb", "flush")
    assert host_offset(vm.disks[1].path, BAD) == vm.bad_host


async def test_guest_write_errors_are_seen(tmp_path: Path) -> None:
    """The harness sees a guest write fail (QEMU logs it instead of replying with it)."""
    disks = make_slides_images(tmp_path / "vm")
    rule = "driver=blkdebug,image={child},inject-error.0.event=write_aio,inject-error.0.errno=5"
    async with FilteredVM(tmp_path / "vm", disks, {"vdb": rule}) as vm:
        with pytest.raises(QmpBackupError, match="write failed: Input/output error"):
            await vm.write("vdb", 0x11, 0, CLUSTER)
        await vm.write("vda", 0x11, 0, CLUSTER)


async def test_info_sees_through_blkdebug(bad_vm: FilteredVM, tmp_path: Path) -> None:
    """``info`` names vdb's qcow2 file, not the json: pseudo-filename of blkdebug."""
    text = (await Cli(bad_vm, tmp_path / "state").ok("info")).out
    chain = text[text.index("  vdb:") :].splitlines()[1:3]
    assert [line.split()[0] for line in chain] == ["qcow2", "raw"]
    assert chain[0].split()[1] == str(bad_vm.disks[1].path), chain


async def test_push_source_read_error(bad_vm: FilteredVM, tmp_path: Path) -> None:
    """An incremental push that hits EIO on the source fails with QEMU's words; its
    checkpoint goes; the next incremental from the last good checkpoint is correct."""
    vm, cli = bad_vm, Cli(bad_vm, tmp_path / "state")
    base = await base_checkpoint(vm, cli, tmp_path)
    await write_bad_cluster(vm)
    inc = tmp_path / "inc.qcow2"
    await cli.ok("backup-begin", str(push_to(tmp_path / "2.xml", inc, "check1")), "check2")
    jobs = await settle(vm)
    assert [(j["id"], j.get("error")) for j in jobs] == [("qmpbackup-1-vdb", "Input/output error")]
    info = json.loads((await cli.ok("jobinfo", "--json")).out)
    assert (info["status"], info["disks"][0]["error"]) == ("failed", "Input/output error")
    ended = await cli("backup-end", "1")
    assert ended.err == (
        "error: Backup id 1 failed: vdb: Input/output error; checkpoint check2 removed; "
        f"partial target {inc} deleted\n"
    )
    assert not inc.exists()
    await assert_clean(vm, cli, ["check1"])
    # blkdebug's rule fired once: the next incremental from check1 reads the cluster fine.
    await next_incremental(vm, cli, tmp_path, "check1", base)


async def test_pull_source_read_error(bad_vm: FilteredVM, tmp_path: Path) -> None:
    """A pull reader that gets EIO: QEMU's job stays healthy (only the reader knows), so the
    reader aborts; the checkpoint goes, and the next pull incremental is correct."""
    vm, cli = bad_vm, Cli(bad_vm, tmp_path / "state")
    base = await base_checkpoint(vm, cli, tmp_path)
    await write_bad_cluster(vm)
    begun = await cli.ok("backup-begin", str(pull_vdb(tmp_path / "2.xml", "check1")), "check2")
    uri = uris(begun.out)["vdb"]
    with pytest.raises(NBDError) as failed:
        await asyncio.to_thread(
            pull_copy, uri, tmp_path / "b2.qcow2", backing=base, bitmap="backup-vdb"
        )
    assert f"read of 65536 bytes at offset {BAD} failed: EIO" in str(failed.value)
    assert not (tmp_path / "b2.qcow2").exists()
    assert [j["status"] for j in await vm.session.execute("query-jobs")] == ["running"]
    aborted = await cli.ok("backup-end", "1", "--abort")
    assert aborted.out.splitlines() == [
        "Backup id 1 aborted",
        "Domain checkpoint check2 deleted: its backup did not complete",
    ]
    await assert_clean(vm, cli, ["check1"])

    ref = await vm.reference("vdb", tmp_path / "ref3.raw")
    begun = await cli.ok("backup-begin", str(pull_vdb(tmp_path / "3.xml", "check1")), "check3")
    await vm.write("vdb", 0x99, BAD, MiB)
    copy = await asyncio.to_thread(
        pull_copy, uris(begun.out)["vdb"], tmp_path / "b3.qcow2", backing=base, bitmap="backup-vdb"
    )
    assert images_equal(copy.image, ref)
    assert (await cli.ok("backup-end", "1")).out == "Backup id 1 completed\n"
    await assert_clean(vm, cli, ["check1", "check3"], vda=["check1"], via_cli=False)


# -- 2. target write errors ---------------------------------------------------


@pytest.fixture
def eio_file(tmp_path: Path) -> Iterator[Path]:
    """A 100 MiB file on FUSE (nbdfuse over nbdkit's error filter) that fails every
    write with EIO: device-mapper's "error" target is not available in this container."""
    if os.geteuid() != 0 or not (shutil.which("nbdfuse") and shutil.which("nbdkit")):
        pytest.skip("needs root, nbdfuse and nbdkit")
    mount = tmp_path / "fuse"
    mount.mkdir()
    errors = [
        f"error-{op}{suffix}" for op in ("pwrite", "zero", "trim") for suffix in ("", "-rate")
    ]
    values = dict(zip(errors, ["EIO", "100%"] * 3, strict=True))
    fuse = subprocess.Popen(
        ["nbdfuse", str(mount / "eio.raw"), "[", "nbdkit", "memory", "size=100M",
         "--filter=error", *(f"{k}={v}" for k, v in values.items()), "]"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(250):
            if (mount / "eio.raw").exists() or fuse.poll() is not None:
                break
            time.sleep(0.02)
        if not (mount / "eio.raw").exists():
            pytest.skip("nbdfuse could not mount (no /dev/fuse?)")
        yield mount / "eio.raw"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


async def test_push_target_eio(vm: ThrowawayVM, cli: Cli, tmp_path: Path, eio_file: Path) -> None:
    """A push whose (reused) target fails every write with EIO: one line, checkpoint gone,
    the user's file left alone, the next incremental from check1 correct."""
    base = await base_checkpoint(vm, cli, tmp_path)
    await vm.write("vdb", 0x58, 0, 4 * MiB)
    spec = backup_xml(
        tmp_path / "eio.xml",
        "push",
        {
            "vda": {"backup": False},
            "vdb": {"reuse": True, "target": str(eio_file), "format": "raw"},
        },
    )
    await cli.ok("backup-begin", str(spec), "check2")
    await settle(vm)
    ended = await cli("backup-end", "1")
    assert ended.rc == 1
    assert ended.err == (
        "error: Backup id 1 failed: vdb: Input/output error; checkpoint check2 removed\n"
    )
    assert eio_file.exists()  # reused, so never removed
    await assert_clean(vm, cli, ["check1"])
    await next_incremental(vm, cli, tmp_path, "check1", base)


async def test_push_target_out_of_space(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    """A push whose target's filesystem fills up: QEMU's ENOSPC in one line, the partial
    target qmpbackup made is deleted, the checkpoint goes, the next incremental is right."""
    base = await base_checkpoint(vm, cli, tmp_path)
    await vm.write("vdb", 0x58, 0, 8 * MiB)
    full = tmpfs("full", "2M")
    target = full / "inc.qcow2"
    await cli.ok("backup-begin", str(push_to(tmp_path / "push.xml", target, "check1")), "check2")
    await settle(vm)
    ended = await cli("backup-end", "1")
    assert ended.rc == 1
    assert ended.err == (
        "error: Backup id 1 failed: vdb: No space left on device; checkpoint check2 removed; "
        f"partial target {target} deleted\n"
    )
    assert os.listdir(full) == []
    await assert_clean(vm, cli, ["check1"])
    await next_incremental(vm, cli, tmp_path, "check1", base)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (locks aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


async def test_pull_target_out_of_space(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    """A pull into a repository whose filesystem fills up: one line, the repository and
    the checkpoints as they were, QEMU clean; once there is room, the next run is an
    incremental that also covers the failed run's changes and restores exactly."""
    repo = tmpfs("repo", "24M")
    await cli.ok("backup", "--repo", str(repo), "--mode", "pull", "--no-progress")
    kept = tree(repo)
    checkpoints = (await cli.ok("checkpoint-list", "--name")).out
    await vm.write("vdb", 0x5B, 0, 32 * MiB)
    failed = await cli("backup", "--repo", str(repo), "--mode", "pull", "--no-progress")
    message = one_line_error(failed)
    assert message.startswith("error: could not copy vdb into "), message
    assert message.endswith("failed: No space left on device"), message
    assert only_line(failed), failed.err
    assert tree(repo) == kept
    assert (await cli.ok("checkpoint-list", "--name")).out == checkpoints
    assert await vm.session.execute("query-jobs") == []
    assert await vm.session.execute("query-block-exports") == []
    assert (await cli.ok("recover")).out == "Nothing to recover\n"

    subprocess.run(["mount", "-o", "remount,size=64M", str(repo)], check=True)
    ref = await vm.reference("vdb", tmp_path / "ref.raw")
    done = await cli.ok("backup", "--repo", str(repo), "--mode", "pull", "--no-progress")
    first = Repository.open(repo).backups()[0].id
    assert f"vdb: incremental (changes since backup-{first})" in done.out, done.out
    restored = tmp_path / "vdb.qcow2"
    restore(Repository.open(repo), "vdb", restored)
    assert images_equal(restored, ref)


async def test_pull_scratch_out_of_space(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    """The scratch reserves room for the whole disk when it is made. A filesystem that
    cannot hold it refuses the backup at begin, with nothing left behind; one that can
    takes every guest overwrite during the backup without the guest seeing an error."""
    base = await base_checkpoint(vm, cli, tmp_path)
    await vm.write("vdb", 0x58, 0, 8 * MiB)
    tiny = tmpfs("tiny", "1M")
    spec = pull_vdb(tmp_path / "p.xml", "check1", {"scratch": str(tiny / "scratch.qcow2")})
    refused = await cli("backup-begin", str(spec), "check2")
    assert one_line_error(refused) == (
        "error: could not format the scratch of vdb as qcow2, its space reserved "
        "(job qmpbackup-1-vdb-create-qcow2): Could not resize image: "
        "Failed to resize underlying file: Could not preallocate new data: "
        "No space left on device"
    )
    assert only_line(refused), refused.err
    assert os.listdir(tiny) == []
    await assert_clean(vm, cli, ["check1"], via_cli=False)

    # vdb's 100 MiB, its qcow2 metadata, and some slack.
    roomy = tmpfs("roomy", "102M")
    spec = pull_vdb(tmp_path / "p.xml", "check1", {"scratch": str(roomy / "scratch.qcow2")})
    ref = await vm.reference("vdb", tmp_path / "ref2.raw")
    uri = uris((await cli.ok("backup-begin", str(spec), "check2")).out)["vdb"]
    # SPEC §1: the guest is never disturbed, even when it overwrites the whole disk.
    assert await guest_write_error(vm, "vdb", 0x99, 0, 100 * MiB) is None
    copy = await asyncio.to_thread(
        pull_copy, uri, tmp_path / "inc2.qcow2", backing=base, bitmap="backup-vdb"
    )
    assert images_equal(copy.image, ref)  # the view still holds the instant
    assert (await cli.ok("backup-end", "1")).out == "Backup id 1 completed\n"
    assert os.listdir(roomy) == []
    await assert_clean(vm, cli, ["check1", "check2"], vda=["check1"], via_cli=False)
    await next_incremental(vm, cli, tmp_path, "check2", copy.image)


# -- 3. the NBD reader goes away mid-pull --------------------------------------

READER = """
import sys
from qmpbackup.nbd import NBDClient
client = NBDClient.connect(sys.argv[1])
print(len(client.pread(1 << 20, 0)), flush=True)
while True:  # read on until killed, so that the kill lands mid-request
    for offset in range(0, client.size, 8 << 20):
        client.pread(8 << 20, offset)
"""


async def test_reader_disconnects_mid_pull(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """A reader killed mid-read (no NBD_CMD_DISC) breaks nothing: the export still serves
    the instant, backup-end completes cleanly, the next pull incremental is correct."""
    base = await base_checkpoint(vm, cli, tmp_path)
    await vm.write("vdb", 0x58, 0, 4 * MiB)
    await vm.write("vdb", 0x59, 60 * MiB, MiB)
    ref2 = await vm.reference("vdb", tmp_path / "ref2.raw")
    begun = await cli.ok("backup-begin", str(pull_vdb(tmp_path / "2.xml", "check1")), "check2")
    uri = uris(begun.out)["vdb"]
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", READER, uri, stdout=subprocess.PIPE
    )
    assert reader.stdout is not None
    assert (await reader.stdout.readline()).strip() == str(MiB).encode()
    await vm.write("vdb", 0x99, 0, 8 * MiB)  # the guest goes on meanwhile
    await asyncio.sleep(0.1)
    reader.send_signal(signal.SIGKILL)
    assert await reader.wait() == -signal.SIGKILL
    # A new reader gets the whole instant from the same export.
    inc2 = await asyncio.to_thread(
        pull_copy, uri, tmp_path / "inc2.qcow2", backing=base, bitmap="backup-vdb"
    )
    assert images_equal(inc2.image, ref2)
    assert (await cli.ok("backup-end", "1")).out == "Backup id 1 completed\n"
    await assert_clean(vm, cli, ["check1", "check2"], vda=["check1"], via_cli=False)

    ref3 = await vm.reference("vdb", tmp_path / "ref3.raw")
    begun = await cli.ok("backup-begin", str(pull_vdb(tmp_path / "3.xml", "check2")))
    await vm.write("vdb", 0x77, 0, MiB)
    inc3 = await asyncio.to_thread(
        pull_copy, uris(begun.out)["vdb"], tmp_path / "inc3.qcow2", backing=inc2.image,
        bitmap="backup-vdb",
    )  # fmt: skip
    await cli.ok("backup-end", "1")
    assert images_equal(inc3.image, ref3)
    await assert_clean(vm, cli, ["check1", "check2"], vda=["check1"], via_cli=False)


# -- 4. and 5.: a copy that runs long -------------------------------------------


@pytest.fixture
async def slow_vm(tmp_path: Path) -> AsyncIterator[FilteredVM]:
    """vdb's qcow2 reads its file through a throttle group of 1 MiB/s (guest writes are
    not slowed), until ``fast_again``. The vCPUs stay stopped (-S): with SeaBIOS running,
    QEMU 7.2's main loop stalled (QMP silent) until the throttled copy had drained."""
    disks = make_slides_images(tmp_path / "vm")
    throttle = "driver=throttle,throttle-group=slow,file={child}"
    extra = ["-object", f"throttle-group,id=slow,x-bps-read={MiB}", "-S"]
    machine = FilteredVM(tmp_path / "vm", disks, {"vdb": throttle}, extra)
    await machine.start()
    try:
        yield machine
    finally:
        await machine.stop()


async def fast_again(vm: ThrowawayVM) -> None:
    """Lift vdb's read limit."""
    await vm.session.execute(
        "qom-set", {"path": "/objects/slow", "property": "limits", "value": {"bps-read": 0}}
    )


async def begin_slow_incremental(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> Path:
    """Backup id 1: vdb incremental from check1 (16 MiB dirty, 16 s at 1 MiB/s) creating
    check2; returns its target once the copy runs."""
    await vm.write("vdb", 0x58, 0, 16 * MiB)
    target = tmp_path / "inc2.qcow2"
    await cli.ok("backup-begin", str(push_to(tmp_path / "2.xml", target, "check1")), "check2")
    jobs = await vm.session.execute("query-jobs")
    assert [(j["id"], j["status"]) for j in jobs] == [("qmpbackup-1-vdb", "running")], jobs
    assert jobs[0]["current-progress"] < jobs[0]["total-progress"] == 16 * MiB
    return target


async def test_abort_mid_copy(slow_vm: FilteredVM, tmp_path: Path) -> None:
    """``backup-end --abort`` while vdb still copies: aborted, check2 gone from the list
    and the bitmaps, the partial target deleted, the next incremental from check1 correct."""
    vm, cli = slow_vm, Cli(slow_vm, tmp_path / "state")
    base = await base_checkpoint(vm, cli, tmp_path)
    target = await begin_slow_incremental(vm, cli, tmp_path)
    proc = await spawn(cli, "-v", "--log-format", "json", "backup-end", "1", "--abort")
    # The reply to job-cancel itself: the schema's reply names job-cancel too.
    await read_until(proc.stderr, '"qmp.reply"', '"execute": "job-cancel"')
    # QEMU took the cancel; the job still waits for its reads queued in the throttle.
    jobs = await vm.session.execute("query-jobs")
    assert jobs[0]["status"] == "running" and jobs[0]["current-progress"] < 16 * MiB
    await fast_again(vm)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert not [line for line in err.decode().splitlines() if '"debug"' not in line]
    assert out.decode().splitlines() == [
        "Backup id 1 aborted",
        "Domain checkpoint check2 deleted: its backup did not complete",
        f"Partial target {target} deleted",
    ]
    assert not target.exists()
    await assert_clean(vm, cli, ["check1"])
    await vm.write("vdb", 0x59, 50 * MiB, MiB)
    await next_incremental(vm, cli, tmp_path, "check1", base)


async def quit_and_restart(vm: ThrowawayVM) -> None:
    """The guest powers off (QMP ``quit``) mid-copy; QEMU starts again on the same images."""
    await vm.session.execute("quit")
    assert vm.process is not None
    await asyncio.to_thread(vm.process.wait)
    await vm.session.disconnect()
    await vm.start()
    await fast_again(vm)


async def test_qemu_quits_then_recover(slow_vm: FilteredVM, tmp_path: Path) -> None:
    """QEMU quits mid-copy and starts again: the stale record does not wedge backup-begin
    for good: it names ``recover``, which drops check2; the next incremental is correct."""
    vm, cli = slow_vm, Cli(slow_vm, tmp_path / "state")
    base = await base_checkpoint(vm, cli, tmp_path)
    await begin_slow_incremental(vm, cli, tmp_path)
    await quit_and_restart(vm)
    spec = push_to(tmp_path / "3.xml", tmp_path / "inc3.qcow2", "check1")
    refused = await cli("backup-begin", str(spec))
    message = one_line_error(refused)
    assert only_line(refused), refused.err
    assert message.startswith("error: an earlier run left leftovers: backup id 1: left over")
    assert message.endswith("; run 'qmpbackup recover' first")
    recovered = (await cli.ok("recover")).out.splitlines()
    assert recovered[0] == "backup id 1: left over, its run is gone"
    assert recovered[-3:] == [
        "checkpoint check2: its backup did not complete",
        f"keep {tmp_path / 'inc2.qcow2'}: its copy may have finished, "
        "but no checkpoint follows from it",
        "Recovered",
    ]
    await assert_clean(vm, cli, ["check1"])
    await next_incremental(vm, cli, tmp_path, "check1", base)


async def test_qemu_killed_mid_job(slow_vm: FilteredVM, tmp_path: Path) -> None:
    """QEMU SIGKILLed mid-copy, started again on the same images: its persistent bitmaps
    come back inconsistent. ``recover`` names them and removes them with the checkpoint,
    and the dead backup; a new full, then an incremental from it, are correct."""
    vm, cli = slow_vm, Cli(slow_vm, tmp_path / "state")
    await base_checkpoint(vm, cli, tmp_path)
    await vm.stop()  # check1's bitmaps are saved into the images...
    await vm.start()  # ...and loaded again: in use until QEMU closes the images
    target = await begin_slow_incremental(vm, cli, tmp_path)
    await vm.kill()
    await vm.start()
    await fast_again(vm)
    info = (await cli.ok("info")).out
    assert info.count("bitmap check1: ") == info.count("INCONSISTENT") == 2, info
    refused = await cli("backup-begin", str(push_to(tmp_path / "3.xml", target, "check1")))
    assert one_line_error(refused).endswith("; run 'qmpbackup recover' first")

    plan = (await cli.ok("recover", "--dry-run")).out.splitlines()
    recovered = (await cli.ok("recover")).out.splitlines()
    assert recovered == [*plan, "Recovered"]
    # check2's bitmaps were never saved: they are simply gone.
    assert recovered == [
        "backup id 1: left over, its run is gone",
        "remove bitmap check1 from vda-fmt: inconsistent, it cannot serve a backup",
        "remove bitmap check1 from vdb-fmt: inconsistent, it cannot serve a backup",
        "checkpoint check2: its backup did not complete",
        "checkpoint check1: bitmap inconsistent on vda, vdb (QEMU stopped without saving "
        "it), so the checkpoint is deleted; the next backup of those disks must be full",
        f"keep {target}: its copy may have finished, but no checkpoint follows from it",
        "Recovered",
    ]
    await assert_clean(vm, cli, [])
    assert (await cli.ok("recover")).out == "Nothing to recover\n"

    # A new full with check3 holds the instant of its begin, not the write after it.
    ref = await vm.reference("vdb", tmp_path / "ref3.raw")
    full = tmp_path / "full3.qcow2"
    await cli.ok("backup-begin", str(push_to(tmp_path / "4.xml", full)), "check3")
    await vm.write("vdb", 0x5A, 60 * MiB, MiB)
    await settle(vm)
    assert (await cli.ok("backup-end", "1")).out == "Backup id 1 completed\n"
    assert images_equal(full, ref)
    await assert_clean(vm, cli, ["check3"], vda=[])  # vda takes no part in this backup
    await next_incremental(vm, cli, tmp_path, "check3", full)


async def test_qemu_killed_idle(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """A QEMU killed with no backup running: check1 (saved, loaded again) comes back
    inconsistent, check2 (made since the start) is gone. Incrementals from either are
    refused with a hint; ``recover`` removes both; a full then works."""
    await cli.ok("checkpoint-create-as", "check1")
    await vm.stop()
    await vm.start()
    await cli.ok("checkpoint-create-as", "check2")
    await vm.write("vdb", 0x61, 0, MiB)
    await vm.kill()
    await vm.start()
    spec = push_to(tmp_path / "inc.xml", tmp_path / "inc.qcow2", "check1")
    refused = await cli("backup-begin", str(spec), "check3")
    assert one_line_error(refused) == (
        "error: disk 'vdb': bitmap 'check1' on node vdb-fmt is inconsistent (QEMU stopped "
        "without saving it); run 'qmpbackup recover' to remove it, then take a full backup"
    )
    spec = push_to(tmp_path / "inc.xml", tmp_path / "inc.qcow2", "check2")
    refused = await cli("backup-begin", str(spec), "check3")
    assert one_line_error(refused) == (
        "error: disk 'vdb': bitmap 'check2' of the checkpoint is missing in QEMU; "
        "take a full backup"
    )
    assert not (tmp_path / "inc.qcow2").exists()
    assert (await cli.ok("recover")).out.splitlines() == [
        "remove bitmap check1 from vda-fmt: inconsistent, it cannot serve a backup",
        "remove bitmap check1 from vdb-fmt: inconsistent, it cannot serve a backup",
        "checkpoint check1: bitmap inconsistent on vda, vdb (QEMU stopped without saving "
        "it), so the checkpoint is deleted; the next backup of those disks must be full",
        "checkpoint check2: bitmap missing on vda, vdb (QEMU stopped without saving "
        "it), so the checkpoint is deleted; the next backup of those disks must be full",
        "Recovered",
    ]
    await assert_clean(vm, cli, [])
    ref = await vm.reference("vdb", tmp_path / "ref.raw")
    full = tmp_path / "full.qcow2"
    await cli.ok("backup-begin", str(push_to(tmp_path / "full.xml", full)), "check3")
    await settle(vm)
    await cli.ok("backup-end", "1")
    assert images_equal(full, ref)
    await assert_clean(vm, cli, ["check3"], vda=[])


# -- 6. two backup-begin at once -------------------------------------------------


async def test_two_begins_at_once(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """Two CLI processes begin a backup of vdb at the same moment: one wins, the other
    exits 1 with one clear line and leaves nothing; the winner's backup is correct."""
    await vm.write("vdb", 0x58, MiB, 4 * MiB)
    ref = await vm.reference("vdb", tmp_path / "ref.raw")
    targets = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    specs = [push_to(tmp_path / f"{n}.xml", t) for n, t in zip("ab", targets, strict=True)]
    results = await asyncio.gather(
        *(cli("backup-begin", str(spec), f"check-{n}") for n, spec in zip("ab", specs, strict=True))
    )
    assert sorted(r.rc for r in results) == [0, 1], results
    won = 0 if results[0].rc == 0 else 1
    winner, loser = results[won], results[1 - won]
    assert "Backup id 1 created" in winner.out
    assert one_line_error(loser) in (
        f"error: another qmpbackup run is working on this VM ({cli.state_dir})",
        "error: disk 'vdb' is already being backed up by backup id 1",
    )
    assert only_line(loser), loser.err
    assert not targets[1 - won].exists()
    await settle(vm)
    assert (await cli.ok("backup-end", "1")).out == "Backup id 1 completed\n"
    assert images_equal(targets[won], ref)
    await assert_clean(vm, cli, [f"check-{'ab'[won]}"], vda=[], via_cli=False)


# -- 7. qmpbackup killed mid-plan (its QMP connection drops) -----------------------


async def test_killed_mid_plan(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """A pull backup-begin SIGKILLed once its transaction ran (check2 and the fleecing
    job exist in QEMU, nothing is saved): backup-begin then refuses with a pointer to
    ``recover``, which cleans all and drops check2's bitmap; the next backup is correct."""
    base = await base_checkpoint(vm, cli, tmp_path)
    await vm.write("vdb", 0x58, 0, 4 * MiB)
    spec = pull_vdb(tmp_path / "p.xml", "check1")
    proxy = tmp_path / "hold.sock"
    ran: list[str] = []

    def after_transaction(message: dict[str, Any]) -> bool:
        # The first pull begin on this QEMU probes snapshot-access with a server of its
        # own: the backup's server is the one started after the transaction.
        ran.append(message.get("execute", ""))
        return "transaction" in ran and message.get("execute") == "nbd-server-start"

    # The run waits for a reply that never comes: killed at a fixed step, not a race.
    async with QmpCutter(proxy, vm.qmp_path, after_transaction, "hold") as cutter:
        proc = await spawn(Cli(vm, cli.state_dir, qmp=proxy), "backup-begin", str(spec), "check2")
        await asyncio.wait_for(cutter.cut_seen.wait(), 60)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    # What the killed run left: its job and nodes, check2's bitmap, no record, no metadata.
    jobs = await vm.session.execute("query-jobs")
    assert [(j["id"], j["status"]) for j in jobs] == [("qmpbackup-1-vdb", "running")]
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    vdb = next(n for n in nodes if n["node-name"] == "vdb-fmt")
    assert {b.get("name") for b in vdb["dirty-bitmaps"]} >= {"check1", "check2"}
    assert [c.name for c in CheckpointStore(cli.state_dir).load_all()] == ["check1"]
    assert ActiveBackupStore(cli.state_dir).load_all() == []

    refused = await cli("backup-begin", str(spec), "check3")
    message = one_line_error(refused)
    assert only_line(refused), refused.err
    assert message.startswith("error: an earlier run left leftovers: unfinished backup-begin")
    assert message.endswith("; run 'qmpbackup recover' first")
    recovered = await cli.ok("recover")
    assert recovered.out.splitlines()[-1] == "Recovered"
    await assert_clean(vm, cli, ["check1"])
    assert list((cli.state_dir / "scratch").iterdir()) == []
    with (
        socket.socket(socket.AF_UNIX) as probe,
        pytest.raises((ConnectionRefusedError, FileNotFoundError)),  # the NBD server is gone
    ):
        probe.connect(str(cli.state_dir / "nbd.sock"))
    await next_incremental(vm, cli, tmp_path, "check1", base)
