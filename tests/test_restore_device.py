"""``restore --out /dev/…``: a disk restored onto an existing block device, against a real QEMU.

The devices are loop devices (``losetup``, root only; skipped where the machine has
none) over files filled with 0xa5 (old data the restore must overwrite), detached at
teardown. A refusal is one line, and leaves every byte of the device as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.restore import recorded_digests
from qmpbackup.repo.restore_device import read_back, restore_device

from .repo_builder import SIZE, Write, add_backup, qemu_img, reference
from .support import Cli, Loop

MiB = 1 << 20
KiB = 1 << 10
VDA = 64 * MiB  # the slides' vda


def equal(device: str, reference: Path, size: int = VDA) -> bool:
    """``qemu-img compare`` of the first ``size`` bytes of ``device`` with a raw file."""
    view = f"driver=raw,size={size},file.driver=host_device,file.filename={device}"
    args = [
        "qemu-img",
        "compare",
        "-q",
        "--image-opts",
        view,
        f"driver=raw,file.filename={reference}",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def restore_args(root: str, device: str, *more: str) -> list[str]:
    return ["restore", "--repo", root, "--disk", "vda", "--out", device, *more]


async def backup_chain(vm: ThrowawayVM, cli: Cli, root: str, *key: str) -> Path:
    """Full and incremental of vda with guest writes before each, the first 2 MiB zeroed
    by the guest; the raw reference at the incremental's instant, then more writes."""
    await vm.write("vda", 0x61, 0, 4 * MiB)
    await cli.ok("backup", "--repo", root, "--disk", "vda", *key)
    await vm.write("vda", 0x62, 8 * MiB, 3 * MiB)
    await vm.guest_io("vda", f"write -z 0 {2 * MiB}")
    await cli.ok("backup", "--repo", root, "--disk", "vda", *key)
    ref = await vm.reference("vda", vm.workdir / "instant.raw")
    await vm.write("vda", 0x63, 16 * MiB, MiB)  # after the instant: not restored
    return ref


async def test_restore_onto_a_device_equals_the_instant(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    root = str(tmp_path / "repo")
    ref = await backup_chain(vm, cli, root)
    now = await vm.reference("vda", tmp_path / "now.raw")
    exact, bigger = loop_device(VDA), loop_device(VDA + 16 * MiB)
    done = await cli.ok(*restore_args(root, exact.device, "--force"))
    assert "blocks read back from the device" in done.out, done.out
    assert equal(exact.device, ref) and not equal(exact.device, now)
    # --sparse: the zero ranges are holes in the loop's file; past the disk, untouched.
    full = bigger.allocated()
    await cli.ok(*restore_args(root, bigger.device, "--force", "--sparse"))
    assert equal(bigger.device, ref)
    assert bigger.allocated() < full - 40 * MiB, (bigger.allocated(), full)
    with bigger.backing.open("rb") as tail:
        tail.seek(VDA)
        assert tail.read() == b"\xa5" * 16 * MiB
    # Without --sparse the zeroes are written, over a device that held other data.
    await vm.write("vda", 0x64, 0, VDA)
    await cli.ok("backup", "--repo", root, "--disk", "vda")
    await cli.ok(*restore_args(root, bigger.device, "--force"))
    assert not equal(bigger.device, ref)
    ids = sorted(p.stem for p in (tmp_path / "repo").rglob("vda/*.qcow2"))
    await cli.ok(*restore_args(root, bigger.device, "--force", "--backup", ids[1]))
    assert equal(bigger.device, ref)


async def test_an_encrypted_chain_restores_onto_a_device(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"q" * 44)
    root = str(tmp_path / "repo")
    ref = await backup_chain(vm, cli, root, "--encrypt-key", str(key))
    loop = loop_device(VDA + 8 * MiB)  # qemu-img convert -n onto a bigger device
    for sparse in ((), ("--sparse",)):
        done = await cli.ok(
            *restore_args(root, loop.device, "--force", *sparse, "--encrypt-key", str(key)),
            verbose=True,
        )
        assert "restore.through-qemu-img" in done.err
        assert equal(loop.device, ref)
        # --sparse: punched first, and qemu-img told --target-is-zero.
        assert not sparse or loop.allocated() < VDA // 2 + 8 * MiB, loop.allocated()
        with loop.backing.open("rb") as tail:
            tail.seek(VDA)
            assert tail.read() == b"\xa5" * 8 * MiB
        subprocess.run(["dd", "if=/dev/urandom", f"of={loop.device}", "bs=1M", "count=4"],
                       check=True, capture_output=True)  # fmt: skip


@contextlib.contextmanager
def holding(argv: list[str], ready: str) -> Iterator[None]:
    """A process running ``argv`` until the end of the block, once it printed ``ready``."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and ready in proc.stdout.readline()
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


HOLD_EXCL = (
    "import os, sys, time; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); "
    "print('held', flush=True); time.sleep(60)"
)


async def test_restore_onto_a_device_refusals_write_nothing(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    root = str(tmp_path / "repo")
    await vm.write("vda", 0x61, 0, MiB)
    await cli.ok("backup", "--repo", root, "--disk", "vda")
    loop, small = loop_device(VDA), loop_device(VDA - 64 * KiB)
    before = loop.digest()
    plain = tmp_path / "existing.raw"
    plain.write_bytes(b"x")

    async def refused(device: str, words: str, *more: str) -> None:
        result = await cli(*restore_args(root, device, *more))
        assert result.rc in (1, 2), result
        assert len(result.err.strip().splitlines()) == 1 and words in result.err, result.err
        assert loop.digest() == before

    await refused(loop.device, "add --force")
    await refused(loop.device, "--format qcow2 is for a file", "--force", "--format", "qcow2")
    await refused(str(plain), "--force writes only over a block device", "--force")
    assert plain.read_bytes() == b"x"
    await refused(str(plain), "exists: refusing to overwrite it")
    await refused(small.device, "fewer than the disk's", "--force")
    subprocess.run(["mkfs.ext4", "-q", loop.device], check=True)
    before = loop.digest()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    # Read-only: a mount writes nothing then, so the device's digest stays as it was.
    subprocess.run(["mount", "-o", "ro", loop.device, str(mountpoint)], check=True)
    try:
        await refused(loop.device, f"mounted at {mountpoint}", "--force")
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    with holding([sys.executable, "-c", HOLD_EXCL, loop.device], "held"):
        await refused(loop.device, "is in use by the kernel", "--force")
    pid_file = tmp_path / "qemu-nbd.pid"
    nbd = ["qemu-nbd", "--fork", "--pid-file", str(pid_file), "-f", "raw"]
    subprocess.run([*nbd, "--socket", str(tmp_path / "nbd.sock"), loop.device], check=True)
    try:
        await refused(loop.device, "open in a QEMU process", "--force")
    finally:
        os.kill(int(pid_file.read_text()), 15)
    await cli.ok(*restore_args(root, loop.device, "--force"))
    assert loop.digest() != before


async def test_restore_refuses_a_device_under_device_mapper(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    if shutil.which("dmsetup") is None:
        pytest.skip("no dmsetup")
    root = str(tmp_path / "repo")
    await cli.ok("backup", "--repo", root, "--disk", "vda")
    loop = loop_device(VDA)
    table = f"0 {VDA // 512} linear {loop.device} 0"
    name = f"qmpbackup-test-{os.getpid()}"
    made = subprocess.run(
        ["dmsetup", "create", name], input=table, capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"device-mapper is not available here: {made.stderr.strip().splitlines()[0]}")
    try:
        before = loop.digest()
        result = await cli(*restore_args(root, loop.device, "--force"))
        assert result.rc in (1, 2) and "is in use by dm-" in result.err, result.err
        assert loop.digest() == before
    finally:
        subprocess.run(["dmsetup", "remove", name], check=False)


def test_a_chain_with_holes_restores_over_old_data_and_the_read_back_finds_a_change(
    tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    """A chain with holes and guest zeroes restores over old data (no VM: the fast path
    alone); a byte changed on the device afterwards, in the loop's file, is found."""
    repo = Repository(tmp_path / "repo", "vm1")
    full: list[Write] = [(0x11, 0, MiB), (0x12, 3 * MiB, 512 * KiB), (0, 5 * MiB, MiB)]
    inc: list[Write] = [(0x21, 512 * KiB, 64 * KiB), (None, 3 * MiB, 64 * KiB)]
    add_backup(repo, {"vda": ("full", full)}, 0)
    record = add_backup(repo, {"vda": ("inc", inc)}, 1)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(reference(tmp_path / "ref.qcow2", full, inc)), str(ref))
    loop = loop_device(SIZE)
    result = restore_device(repo, "vda", Path(loop.device), force=True)
    assert result.blocks_checked == SIZE // (64 * KiB) and equal(loop.device, ref, SIZE)
    expected = recorded_digests(repo, record, record.disk("vda"))  # type: ignore[arg-type]
    assert read_back(Path(loop.device), expected) == []
    with loop.backing.open("r+b") as backing:
        backing.seek(3 * MiB + 5)
        backing.write(b"\x5a")  # into block 48, which the incremental zeroed
    assert read_back(Path(loop.device), expected) == [48]
