"""``backup --mode pull --encrypt-key``: the instant, read with the built-in NBD client,
goes into LUKS-encrypted qcow2 images that qemu-nbd writes; stock ``qemu-img`` proves
them; the key is nowhere; refusals, failures and signals leave the repository as it was
and no qemu-nbd behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import DiskImage, ThrowawayVM, images_equal, qemu_img
from qmpbackup.repo.repository import Repository

from .support import Cli, CliResult
from .test_encrypted_repo import (
    KiB,
    MiB,
    _assert_key_nowhere,
    _Cmdlines,
    _key,
    _opts,
    _slot_iters,
    _verify_finds_a_flipped_byte,
)

SINK = b"qmpbackup-sink-"


def _sinks(where: Path) -> dict[int, bytes]:
    """The qemu-nbd processes writing an encrypted pull image under ``where`` now: pid ->
    cmdline (only this test's: other test runs on the machine may have sinks too)."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = path.read_bytes()
            ours = SINK in line and str(where).encode() in line
            if line.split(b"\0")[0].endswith(b"qemu-nbd") and ours:
                found[int(path.parent.name)] = line
    return found


def _recording_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put ``qemu-nbd`` and ``qemu-img`` first in PATH, each writing its arguments to the
    file returned before it runs (the process watch may miss a short-lived one)."""
    shims, log = tmp_path / "shims", tmp_path / "argv.log"
    shims.mkdir()
    for tool in ("qemu-nbd", "qemu-img"):
        real = shutil.which(tool)
        assert real is not None
        (shims / tool).write_text(
            f'#!/bin/bash\nprintf "%s\\0" {tool} "$@" >> {log}\necho >> {log}\n'
            f'exec -a {tool} {real} "$@"\n'
        )
        (shims / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    return log


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


async def _backup_writing_after_the_instant(
    cli: Cli, vm: ThrowawayVM, args: list[str], log: list[str], pattern: int
) -> CliResult:
    """Run ``backup`` (console logs with ``-v`` or JSON ones); once it says the backup
    started (its instant is set), the guest writes 1 KiB at 40 MiB."""
    argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(vm.qmp_path), *log]
    argv += ["--state-dir", str(cli.state_dir), "backup", *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    err = asyncio.ensure_future(proc.stderr.read())
    out: list[bytes] = []
    while line := await proc.stdout.readline():
        out.append(line)
        if b" started" in line:
            await vm.write("vda", pattern, 40 * MiB, KiB)
    await proc.wait()
    assert proc.returncode is not None
    return CliResult(proc.returncode, b"".join(out).decode(), (await err).decode())


async def test_encrypted_pull_chain_holds_each_instant_and_hides_the_key(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv_log = _recording_tools(tmp_path, monkeypatch)
    key = _key(tmp_path)
    repo = Repository(tmp_path / "repo", "testvm")
    root = str(repo.root)
    refs: list[Path] = []
    outputs: list[str] = []
    logs = [["-v"], ["-v", "--log-format", "json"], ["-v"]]
    with _Cmdlines() as watch:
        for run in range(3):
            await vm.write("vda", 0x40 + run, (run * 2 + 1) * MiB, 128 * KiB)
            if run == 2:
                # Zeroes over the base image's data: the incremental must hide that data.
                await vm.guest_io("vda", "write -z 0 192k")
            refs.append(await vm.reference("vda", tmp_path / f"ref{run}.raw"))
            level = ["--level", "full"] if run == 0 else []
            args = ["--repo", root, "--mode", "pull", "--encrypt-key", str(key), "--disk", "vda"]
            done = await _backup_writing_after_the_instant(
                cli, vm, [*args, *level], logs[run], 0x70 + run
            )
            assert done.rc == 0, done.err
            assert "taken while copying" in done.out
            outputs += [done.out, done.err]
            assert not _sinks(tmp_path)
        records = repo.backups()
        assert [(r.level, r.mode) for r in records] == [("full", "pull"), ("inc", "pull"),
                                                        ("inc", "pull")]  # fmt: skip
        assert all(r.encryption == "luks" and r.digest_key for r in records)
        for depth, (record, ref) in enumerate(zip(records, refs, strict=True), start=1):
            out = tmp_path / f"restored{depth}.qcow2"
            args = ["--out", str(out), "--backup", record.id, "--encrypt-key", str(key)]
            done = await cli.ok("restore", "--repo", root, "--disk", "vda", *args, verbose=True)
            outputs += [done.out, done.err]
            # The guest's write after each instant is in none of them.
            assert images_equal(out, ref), depth
        good = await cli.ok("verify", "--repo", root, "--encrypt-key", str(key), verbose=True)
        outputs += [good.out, good.err]
    assert "3 backups verified" in good.out
    # Three sinks ran, each with a private socket, gone with its folder.
    ran = argv_log.read_bytes().split(b"\0\n")
    sinks = [c for c in ran if c.startswith(b"qemu-nbd\0") and SINK in c]
    assert len(sinks) == 3, ran
    for line in sinks:
        socket = Path(next(a for a in line.split(b"\0") if SINK in a).decode())
        assert not socket.parent.exists()
    outputs += [c.decode(errors="replace") for c in watch.seen.values()]

    obj = f"secret,id=k,file={key}"
    for depth, (record, ref) in enumerate(zip(records, refs, strict=True), start=1):
        image = repo.image_path(record, "vda")
        info = json.loads(qemu_img("info", "-U", "--output=json", str(image)))
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        if depth > 1:  # chained by a relative name, as push images are
            name = info["backing-filename"]
            parent = repo.image_path(records[depth - 2], "vda")
            assert not os.path.isabs(name) and (image.parent / name).resolve() == parent.resolve()
        assert _slot_iters(image) < 100_000
        qemu_img("check", "--object", obj, "--image-opts", _opts(image, depth))
        qemu_img("compare", "--object", obj, "--image-opts", _opts(image, depth),
                 f"driver=raw,file.filename={ref}")  # fmt: skip

    _assert_key_nowhere(tmp_path, key, outputs)

    # A byte flipped in an encrypted pull image is found, and the file named.
    await _verify_finds_a_flipped_byte(cli, root, key, repo.image_path(records[1], "vda"))


async def test_encrypted_pull_refusals_write_nothing(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key = _key(tmp_path)
    root = tmp_path / "repo"
    pull = ["--repo", str(root), "--disk", "vda", "--mode", "pull"]
    await cli.ok("backup", *pull, "--encrypt-key", str(key))
    (record,) = Repository(root, "testvm").backups()
    image = Repository(root, "testvm").image_path(record, "vda")
    before = _files(root)
    checkpoints = (await cli.ok("checkpoint-list", "--name")).out
    wrong = _key(tmp_path, b"not the key")
    for args, words in [
        ((), "is encrypted: give its --encrypt-key"),
        (("--encrypt-key", str(wrong)), f"does not open {image}"),
        (("--encrypt-key", str(key), "--compress"), "cannot be combined"),
    ]:
        refused = await cli("backup", *pull, *args)
        assert refused.rc in (1, 2), refused
        assert len(refused.err.strip().splitlines()) == 1 and words in refused.err, refused.err
        assert _files(root) == before
        assert (await cli.ok("checkpoint-list", "--name")).out == checkpoints
    plain = ["--repo", str(tmp_path / "plain"), "--disk", "vda", "--mode", "pull"]
    await cli.ok("backup", *plain)
    refused = await cli("backup", *plain, "--encrypt-key", str(key))
    assert refused.rc in (1, 2) and "is not encrypted" in refused.err, refused.err


async def _start_backup(cli: Cli, vm: ThrowawayVM, *args: str) -> asyncio.subprocess.Process:
    argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(vm.qmp_path)]
    argv += ["--state-dir", str(cli.state_dir), "backup", *args]
    return await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def _wait_for_sink(proc: asyncio.subprocess.Process, where: Path) -> dict[int, bytes]:
    """The sinks under ``where`` once one runs; the backup's output if it ends first."""
    deadline = time.monotonic() + 60
    while not (found := _sinks(where)):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"no qemu-nbd sink started: {await proc.communicate()}")
        await asyncio.sleep(0.01)
    return found


async def test_a_failed_or_stopped_encrypted_pull_leaves_no_sink_and_no_image(
    tmp_path: Path,
) -> None:
    """While qemu-nbd writes the encrypted image of a slow disk (every read takes 200 ms):
    the sink killed (the copy fails), the backup SIGTERMed, the backup SIGKILLed (the
    kernel kills the sink). Each time no sink is left and the repository is as it was;
    the killed run's leftovers go with the next run, which chains as before."""
    work = tmp_path / "vm"
    work.mkdir()
    small = work / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(small), "16M")
    disks = [DiskImage(name="vda", path=small), DiskImage.slow("vdb", 256 * MiB, 200_000_000)]
    key = _key(tmp_path)
    repo = Repository(tmp_path / "repo", "slowvm")
    args = ["--repo", str(repo.root), "--mode", "pull", "--encrypt-key", str(key)]
    async with ThrowawayVM(work, disks, name="slowvm") as vm:
        cli = Cli(vm, tmp_path / "state")
        await cli.ok("backup", *args, "--disk", "vda")
        before, records = _files(repo.root), repo.backups()

        proc = await _start_backup(cli, vm, *args, "--disk", "vdb")
        (pid,) = await _wait_for_sink(proc, tmp_path)
        os.kill(pid, signal.SIGKILL)
        out, err = await proc.communicate()
        assert proc.returncode == 1, (out, err)
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "could not copy vdb" in lines[0], lines
        assert not _sinks(tmp_path) and _files(repo.root) == before and repo.backups() == records

        proc = await _start_backup(cli, vm, *args, "--disk", "vdb")
        await _wait_for_sink(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        out, err = await proc.communicate()
        assert proc.returncode == 1 and b"interrupted" in err, (out, err)
        assert not _sinks(tmp_path) and _files(repo.root) == before and repo.backups() == records

        proc = await _start_backup(cli, vm, *args, "--disk", "vdb")
        sinks = list((await _wait_for_sink(proc, tmp_path)).values())
        proc.kill()
        await proc.wait()
        deadline = time.monotonic() + 10
        while _sinks(tmp_path):
            assert time.monotonic() < deadline, "the sink outlived its backup"
            await asyncio.sleep(0.05)
        killed = Path(next(a for a in sinks[0].split(b"\0") if SINK in a).decode()).parent
        assert killed.exists()  # nobody was there to remove it
        await cli.ok("recover")
        await vm.write("vda", 0x44, MiB, 64 * KiB)
        ref = await vm.reference("vda", tmp_path / "ref.raw")
        done = await cli.ok("backup", *args, "--disk", "vda")
        assert "vda: incremental" in done.out
        # The next sink removed the killed one's folder; its image went with its record.
        assert not killed.exists()
        assert len(repo.backups()) == 2 and not _sinks(tmp_path)
        out_image = tmp_path / "restored.raw"
        await cli.ok("restore", "--repo", str(repo.root), "--disk", "vda", "--out",
                     str(out_image), "--format", "raw", "--encrypt-key", str(key))  # fmt: skip
        assert images_equal(out_image, ref)
