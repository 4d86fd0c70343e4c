"""Block devices and LUKS-encrypted images as targets and scratches, against a real QEMU.

Block devices are loop devices (``losetup``, root only; skipped where the machine
has none), detached at teardown.  Encrypted targets are opened by stock
``qemu-img`` given the key file; the passphrase is looked for, and never found, in
everything qmpbackup wrote or printed and in every process's command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from qmpbackup.demo.throwaway import ThrowawayVM, images_equal
from qmpbackup.planner.devices import qcow2_room
from qmpbackup.request import BackupSpec, DiskBackupSpec, backup_to_xml

from .conftest import block_state
from .support import Cli, Loop

MiB = 1 << 20
VDA = 64 * MiB  # the slides' vda; vdb is 100 MiB
UUID = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"


def spec_file(path: Path, mode: str, **fields: Any) -> Path:
    """A ``<domainbackup>`` of vda alone (vdb left out) with ``fields``."""
    disks = (DiskBackupSpec(name="vda", **fields), DiskBackupSpec(name="vdb", backup=False))
    path.write_text(backup_to_xml(BackupSpec(mode=mode, disks=disks)))
    return path


def raw_view(device: str, size: int) -> str:
    """``--image-opts`` for the first ``size`` bytes of a raw device."""
    return f"driver=raw,size={size},file.driver=host_device,file.filename={device}"


def compare(reference: Path, *image: str) -> bool:
    """``qemu-img compare`` of an image given by ``--image-opts`` with a raw reference."""
    args = ["qemu-img", "compare", "-q", *image, f"driver=raw,file.filename={reference}"]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def encrypted(target: str, key: Path) -> tuple[str, ...]:
    """``qemu-img`` options opening an encrypted qcow2 ``target`` with the key in ``key``."""
    driver = "host_device" if target.startswith("/dev/") else "file"
    return (
        "--object",
        f"secret,id=s0,file={key}",
        "--image-opts",
        f"driver=qcow2,encrypt.key-secret=s0,file.driver={driver},file.filename={target}",
    )


def is_block(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


async def objects(vm: ThrowawayVM) -> list[str]:
    return [o["name"] for o in await vm.session.execute("qom-list", {"path": "/objects"})]


async def assert_clean(vm: ThrowawayVM) -> None:
    state = await block_state(vm)
    assert "qmpbackup-" not in str(state)
    assert not [o for o in await objects(vm) if o.startswith("qmpbackup-")]


def uri_of(out: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith("vda nbd"))


# -- block devices --------------------------------------------------------------


async def test_push_qcow2_and_raw_onto_block_devices(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    await vm.write("vda", 0x42, MiB, 3 * MiB)
    await vm.write("vdb", 0x58, 0, 4 * MiB)
    ref_a = await vm.reference("vda", tmp_path / "ref-vda.raw")
    ref_b = await vm.reference("vdb", tmp_path / "ref-vdb.raw")
    dev_a, dev_b = loop_device(80 * MiB).device, loop_device(128 * MiB).device
    spec = tmp_path / "push.xml"
    disks = (
        DiskBackupSpec(name="vda", type="block", target=dev_a, format="qcow2"),
        DiskBackupSpec(name="vdb", type="block", target=dev_b, format="raw"),
    )
    spec.write_text(backup_to_xml(BackupSpec(mode="push", disks=disks)))
    await cli.ok("backup-begin", str(spec))
    await vm.write("vda", 0x99, 0, 8 * MiB)
    await vm.write("vdb", 0x99, 0, 8 * MiB)
    await cli.finish(1)
    # The qcow2 was formatted onto the device; the raw copy overwrote the old data.
    assert images_equal(dev_a, ref_a, "qcow2")
    assert compare(ref_b, "--image-opts", raw_view(dev_b, 100 * MiB))
    assert is_block(dev_a) and is_block(dev_b)
    await assert_clean(vm)


async def test_aborted_push_to_a_block_device_leaves_the_device(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    device = loop_device(80 * MiB).device
    spec = spec_file(tmp_path / "push.xml", "push", type="block", target=device)
    await cli.ok("backup-begin", str(spec))
    await cli.ok("backup-end", "1", "--abort")
    await cli.ok("recover")
    assert is_block(device)
    await assert_clean(vm)


async def test_pull_with_a_block_device_scratch(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    await vm.write("vda", 0x42, 0, 4 * MiB)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    device = loop_device(qcow2_room(VDA)).device
    spec = spec_file(tmp_path / "pull.xml", "pull", type="block", scratch=device)
    begin = await cli.ok("backup-begin", str(spec))
    await vm.write("vda", 0x99, 0, 16 * MiB)  # kept in the scratch on the device
    out = tmp_path / "read.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", uri_of(begin.out), "-O", "qcow2", str(out)])
    assert images_equal(out, ref)
    await cli.ok("backup-end", "1")
    assert is_block(device)
    await assert_clean(vm)


async def test_block_devices_not_to_write_are_refused(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MiB))
    mounted, in_qemu = loop_device(80 * MiB).device, loop_device(80 * MiB).device
    subprocess.run(["mkfs.ext4", "-q", mounted], check=True)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    subprocess.run(["mount", mounted, str(mount_point)], check=True)
    try:
        add = {"driver": "host_device", "node-name": "user-dev", "filename": in_qemu}
        await vm.session.execute("blockdev-add", add)
        before = await block_state(vm)
        cases = {
            str(plain): "is not a block device",
            str(tmp_path / "absent"): "does not exist",
            mounted: f"holds a filesystem mounted at {mount_point}",
            in_qemu: "is already open in QEMU (node user-dev)",
        }
        for device, message in cases.items():
            for mode, where in (("push", "target"), ("pull", "scratch")):
                spec = spec_file(tmp_path / "s.xml", mode, type="block", **{where: device})
                result = await cli("backup-begin", str(spec))
                assert result.rc == 2, result.err
                assert result.err.startswith("error: ") and message in result.err, result.err
                assert device in result.err and len(result.err.splitlines()) == 1
        assert await block_state(vm) == before
        assert plain.read_bytes() == bytes(MiB)
        await vm.session.execute("blockdev-del", {"node-name": "user-dev"})
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


# -- encryption -----------------------------------------------------------------


class SecretWatch:
    """Everything a run shows where a secret could leak: what the CLI printed, the files
    of the state directory (journal, active records) read while the backup runs, and
    every process's command line, sampled while the CLI runs."""

    def __init__(self, passphrase: str) -> None:
        self.needle = passphrase.encode()
        self.seen: list[tuple[str, bytes]] = []

    def add(self, where: str, data: str | bytes) -> None:
        self.seen.append((where, data.encode() if isinstance(data, str) else data))

    def files(self, folder: Path) -> None:
        for path in folder.rglob("*"):
            if path.is_file():
                self.add(str(path), path.read_bytes())

    def cmdlines(self) -> None:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    self.add(
                        f"/proc/{entry.name}/cmdline", Path(entry.path, "cmdline").read_bytes()
                    )

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        async def sample() -> None:
            while True:
                await asyncio.to_thread(self.cmdlines)
                await asyncio.sleep(0.005)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def leaks(self) -> list[str]:
        return [where for where, data in self.seen if self.needle in data]


async def run(cli: Cli, watch: SecretWatch, *args: str) -> str:
    async with watch.sampling():
        result = await cli.ok(*args, verbose=True)
    watch.add(" ".join(args), result.out + result.err)
    return result.out


def key_file(tmp_path: Path) -> tuple[Path, str]:
    passphrase = f"pass-{uuid.uuid4().hex}"
    key = tmp_path / "backup.key"
    key.write_text(passphrase)  # no newline: QEMU and qemu-img read the file as it is
    key.chmod(0o600)
    return key, passphrase


async def test_push_to_an_encrypted_target_leaks_no_secret(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key, passphrase = key_file(tmp_path)
    watch = SecretWatch(passphrase)
    await vm.write("vda", 0x42, MiB, 3 * MiB)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    target = tmp_path / "vda.enc.qcow2"
    encryption = {"secret": {"uuid": UUID}}
    spec = spec_file(tmp_path / "push.xml", "push", target=str(target), encryption=encryption)
    secret = f"--secret={UUID}={key}"

    missing = await cli("backup-begin", str(spec))
    assert missing.rc == 2 and missing.err == (
        f"error: disk 'vda' is encrypted with the secret '{UUID}': pass --secret {UUID}=FILE\n"
    )
    plan = await run(cli, watch, "plan", str(spec), secret)
    assert f'"file": "{key}"' in plan
    await run(cli, watch, "plan", str(spec), secret, "--explain")
    await run(cli, watch, "backup-begin", str(spec), secret)
    watch.files(cli.state_dir)
    await vm.write("vda", 0x99, 0, 8 * MiB)
    await run(cli, watch, "jobinfo")
    for _ in range(600):
        result = await cli("backup-end", "1", verbose=True)
        watch.add("backup-end", result.out + result.err)
        if result.rc == 0:
            break
        await asyncio.sleep(0.1)
    watch.files(cli.state_dir)

    assert compare(ref, *encrypted(str(target), key))
    info = subprocess.run(["qemu-img", "info", str(target)], capture_output=True, text=True)
    assert "encrypted: yes" in info.stdout
    assert watch.seen and not watch.leaks()
    await assert_clean(vm)


async def test_pull_with_an_encrypted_scratch_serves_plain_data(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key, passphrase = key_file(tmp_path)
    watch = SecretWatch(passphrase)
    await vm.write("vda", 0x42, 0, 4 * MiB)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    spec = spec_file(tmp_path / "pull.xml", "pull", encryption={"secret": {"usage": "scratch"}})
    out = await run(cli, watch, "backup-begin", str(spec), f"--secret=scratch={key}")
    watch.files(cli.state_dir)
    scratch = next((cli.state_dir / "scratch").iterdir())
    info = subprocess.run(["qemu-img", "info", "-U", str(scratch)], capture_output=True, text=True)
    assert "encrypted: yes" in info.stdout
    await vm.write("vda", 0x99, 0, 16 * MiB)  # the old data goes encrypted into the scratch
    assert b"\x42" * 65536 not in scratch.read_bytes()
    read = tmp_path / "read.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", uri_of(out), "-O", "qcow2", str(read)])
    assert images_equal(read, ref)
    await run(cli, watch, "backup-end", "1")
    assert watch.seen and not watch.leaks()
    assert not scratch.exists()
    await assert_clean(vm)


async def test_push_to_an_encrypted_block_device(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, loop_device: Callable[[int], Loop]
) -> None:
    key, _ = key_file(tmp_path)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    device = loop_device(80 * MiB).device
    encryption = {"secret": {"uuid": UUID}}
    spec = spec_file(tmp_path / "p.xml", "push", type="block", target=device, encryption=encryption)
    await cli.ok("backup-begin", str(spec), f"--secret={UUID}={key}")
    await cli.finish(1)
    assert compare(ref, *encrypted(device, key))
    await assert_clean(vm)
