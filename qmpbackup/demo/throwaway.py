"""A throwaway QEMU with disk images, for the demo and the tests.

It starts ``qemu-system-x86_64`` with no guest OS; guest writes are simulated
with ``qemu-io`` through the human monitor, exactly as a guest's writes reach
the block layer.  :meth:`ThrowawayVM.reference` copies a disk's current
content to a raw file, to compare backups against.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import QmpBackupError
from ..images.qemu_img import qemu_img as run_qemu_img
from ..qmp.session import QMPSession

QEMU = os.environ.get("QMPBACKUP_QEMU", "qemu-system-x86_64")


def kvm_usable() -> bool:
    """True when /dev/kvm can be opened for read and write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_img(*args: str) -> str:
    """Run ``qemu-img`` and return its output; ImageError with its stderr on failure."""
    return run_qemu_img(*args).stdout


def qemu_io(image: str, command: str, fmt: str = "raw") -> None:
    """Run one ``qemu-io`` command on an image that no QEMU has open."""
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, image], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or "failed" in proc.stdout:
        raise QmpBackupError(f"qemu-io {command!r} on {image}: {proc.stdout}{proc.stderr}")


# How a disk is attached: ``blockdev`` (file and format nodes, virtio-blk on the format
# node), ``drive`` (legacy ``-drive if=none`` and virtio-blk), ``throttle`` (as blockdev,
# with the device on a throttle filter over the format node), ``pflash`` (``-drive
# if=pflash``, unit N of a disk called ``pflashN``) and ``pflash-blockdev`` (blockdev
# nodes given to the machine as ``pflashN=NODE``).
Attach = Literal["blockdev", "drive", "throttle", "pflash", "pflash-blockdev"]


@dataclass(frozen=True)
class DiskImage:
    """A guest disk: its qdev id, its top image and format, optional backing image."""

    name: str
    path: Path
    fmt: str = "qcow2"
    backing: Path | None = None
    backing_fmt: str = "raw"
    # For a disk with no file: a null-co device of this size whose every request
    # takes ``latency_ns``, so a copy of it runs long while a cancel stays quick.
    null_size: int | None = None
    latency_ns: int = 0
    attach: Attach = "blockdev"
    read_only: bool = False

    @property
    def qdev(self) -> str:
        """The QOM path of the disk's device, as ``qemu-io -d`` takes it."""
        if self.attach.startswith("pflash"):
            return f"/machine/system.flash{self.name.removeprefix('pflash')}"
        return f"/machine/peripheral/{self.name}/virtio-backend"

    @classmethod
    def slow(cls, name: str, size: int, latency_ns: int) -> DiskImage:
        """A raw disk on ``null-co``: reads return junk after ``latency_ns``."""
        return cls(name=name, path=Path("/dev/null"), fmt="raw", null_size=size,
                   latency_ns=latency_ns)  # fmt: skip


def make_slides_images(workdir: Path) -> list[DiskImage]:
    """The slides' layout: ``Base1.img`` (raw, with data) <- ``Active1.qcow2``,
    ``Base2.img`` (raw, 100M, empty) <- ``Active2.qcow2``."""
    workdir.mkdir(parents=True, exist_ok=True)
    base1, base2 = workdir / "Base1.img", workdir / "Base2.img"
    qemu_img("create", "-q", "-f", "raw", str(base1), "64M")
    # Base1 plays the installed OS: some data, some holes.
    qemu_io(str(base1), "write -P 0x41 0 4M")
    qemu_io(str(base1), "write -P 0x61 16M 1M")
    with open(base2, "wb") as handle:
        handle.truncate(100 * 1024 * 1024)
    disks = []
    for index, base in ((1, base1), (2, base2)):
        active = workdir / f"Active{index}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.name, str(active))
        disks.append(DiskImage(name=f"vd{'ab'[index - 1]}", path=active, backing=base))
    return disks


class ThrowawayVM:
    """A QEMU process with the given disks, a QMP socket, and a way to write as the guest."""

    def __init__(self, workdir: Path, disks: Sequence[DiskImage], name: str = "throwaway") -> None:
        self.workdir = workdir
        self.disks = list(disks)
        self.name = name
        self.qmp_path = workdir / "qmp.sock"
        # QEMU serves one client per monitor: the harness keeps its own.
        self.harness_path = workdir / "harness.sock"
        self.log_path = workdir / "qemu.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._session: QMPSession | None = None

    def command_line(self) -> list[str]:
        """The QEMU command line."""
        accel = "kvm" if kvm_usable() else "tcg"
        argv = [
            QEMU, "-M", "q35", "-nodefaults", "-display", "none", "-accel", accel,
            "-m", "128", "-name", self.name,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.harness_path},server=on,wait=off",
        ]  # fmt: skip
        for disk in self.disks:
            argv += _disk_args(disk)
        flashes = [d for d in self.disks if d.attach == "pflash-blockdev"]
        argv[2] += "".join(f",{d.name}={d.name}-fmt" for d in flashes)
        return argv

    async def start(self, timeout: float = 30.0) -> None:
        """Start QEMU and wait until its QMP socket accepts a connection."""
        self._remove_sockets()
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            self.command_line(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.qmp_path.exists() and self.harness_path.exists()):
            if self.process.poll() is not None:
                raise QmpBackupError(f"QEMU exited: {self.log_path.read_text().strip()}")
            if loop.time() > deadline:
                raise QmpBackupError("QEMU did not create its QMP socket")
            await asyncio.sleep(0.02)
        # The socket file exists once QEMU binds it, a little before it listens.
        while True:
            session = QMPSession(str(self.harness_path), name="throwaway-harness")
            try:
                await session.connect()
            except QmpBackupError:
                if self.process.poll() is not None:
                    self.process = None
                    raise QmpBackupError(
                        f"QEMU exited: {self.log_path.read_text().strip()}"
                    ) from None
                if loop.time() > deadline:
                    self.process.kill()
                    self.process.wait()
                    self.process = None
                    raise
                await asyncio.sleep(0.05)
                continue
            self._session = session
            return

    @property
    def session(self) -> QMPSession:
        """The harness's own QMP session (used for guest writes)."""
        assert self._session is not None, "start() first"
        return self._session

    async def hmp(self, command: str) -> str:
        """Run a human-monitor command and return its output."""
        out: str = await self.session.execute("human-monitor-command", {"command-line": command})
        return out

    async def guest_io(self, disk: str, command: str) -> None:
        """Run a qemu-io command against ``disk`` as the guest would (through its device);
        QmpBackupError if it fails."""
        seen = self.log_path.stat().st_size
        device = next((d.qdev for d in self.disks if d.name == disk), None)
        device = device or f"/machine/peripheral/{disk}/virtio-backend"
        out = await self.hmp(f'qemu-io -d {device} "{command}"')
        # HMP's qemu-io prints an I/O error to QEMU's stderr (our log), not into its reply.
        with self.log_path.open(errors="replace") as log:
            log.seek(seen)
            logged = [line for line in log.read().splitlines() if "failed" in line]
        if logged or "failed" in out or "error" in out.lower():
            detail = "; ".join([out.strip(), *logged]).strip("; ")
            raise QmpBackupError(f"guest I/O {command!r} on {disk}: {detail}")

    async def write(self, disk: str, pattern: int, offset: int | str, length: int | str) -> None:
        """Guest writes ``length`` bytes of ``pattern`` at ``offset``."""
        await self.guest_io(disk, f"write -P {pattern:#x} {offset} {length}")

    async def reference(self, disk: str, out: Path) -> Path:
        """Copy ``disk``'s current guest-visible content to the raw file ``out``."""
        await self.guest_io(disk, "flush")
        image = next(d for d in self.disks if d.name == disk)
        qemu_img("convert", "-U", "-f", image.fmt, "-O", "raw", str(image.path), str(out))
        return out

    async def stop(self) -> None:
        """Quit QEMU (kill it if it does not go) and close the session."""
        if self._session is not None:
            with contextlib.suppress(QmpBackupError):
                await self._session.execute("quit")
            await self._session.disconnect()
            self._session = None
        if self.process is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 10)
            except TimeoutError:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
            self.process = None
        self._remove_sockets()

    async def kill(self) -> None:
        """SIGKILL QEMU, as a crash would: nothing is flushed, bitmaps stay in use."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.process.wait)
            self.process = None
        if self._session is not None:
            with contextlib.suppress(QmpBackupError):
                await self._session.disconnect()
            self._session = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # A QEMU that was killed (or lost its monitor) leaves its socket files.
        for path in (self.qmp_path, self.harness_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def __aenter__(self) -> ThrowawayVM:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _disk_args(disk: DiskImage) -> list[str]:
    """The command-line arguments attaching one disk."""
    ro = ",read-only=on" if disk.read_only else ""
    if disk.attach == "pflash":
        unit = disk.name.removeprefix("pflash")
        readonly = ",readonly=on" if disk.read_only else ""
        return ["-drive", f"if=pflash,format={disk.fmt},unit={unit},file={disk.path}{readonly}"]
    if disk.attach == "drive":
        assert disk.backing is None and disk.null_size is None
        drive = f"if=none,id={disk.name}-drive,file={disk.path},format={disk.fmt},discard=unmap"
        return ["-drive", drive, "-device", f"virtio-blk,drive={disk.name}-drive,id={disk.name}"]
    node = f"{disk.name}-fmt"
    argv: list[str] = []
    if disk.backing is not None:
        argv += [
            "-blockdev",
            f"driver=file,filename={disk.backing},node-name={disk.name}-base-file,read-only=on",
            "-blockdev",
            f"driver={disk.backing_fmt},file={disk.name}-base-file,"
            f"node-name={disk.name}-base,read-only=on",
        ]
    if disk.null_size is not None:
        protocol = (
            f"driver=null-co,size={disk.null_size},latency-ns={disk.latency_ns},read-zeroes=off"
        )
    else:
        protocol = f"driver=file,filename={disk.path}"
    # discard=unmap: a guest's trims reach the image, as on a real VM set up for it.
    argv += ["-blockdev", f"{protocol},node-name={disk.name}-file,discard=unmap{ro}"]
    fmt = f"driver={disk.fmt},file={disk.name}-file,node-name={node},discard=unmap{ro}"
    if disk.backing is not None:
        fmt += f",backing={disk.name}-base"
    argv += ["-blockdev", fmt]
    if disk.attach == "throttle":
        # A throttle group of 100 MiB/s: what the guest sees is unchanged, only paced.
        group = f"{disk.name}-tg"
        argv += [
            "-object", f"throttle-group,id={group},x-bps-total={100 << 20}",
            "-blockdev", f"driver=throttle,throttle-group={group},file={node},"
            f"node-name={disk.name}-throttle",
        ]  # fmt: skip
        node = f"{disk.name}-throttle"
    if disk.attach != "pflash-blockdev":
        argv += ["-device", f"virtio-blk,drive={node},id={disk.name}"]
    return argv


def firmware_code(path: Path) -> Path:
    """A 64 KiB stand-in for OVMF_CODE, to give as pflash0 (QEMU takes a pflash1 NVRAM only
    with a pflash0, each a multiple of 4 KiB): its reset vector halts the CPU for good."""
    code = bytearray(b"\xff" * 65536)
    code[-16:-12] = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
    path.write_bytes(bytes(code))
    return path


def images_equal(a: Path | str, b: Path | str, fmt_a: str | None = None) -> bool:
    """True when ``qemu-img compare`` finds the two images' guest content equal."""
    args = ["qemu-img", "compare", "-q"]
    if fmt_a:
        args += ["-f", fmt_a]
    proc = subprocess.run([*args, str(a), str(b)], capture_output=True, check=False)
    if proc.returncode > 1:
        raise QmpBackupError(f"qemu-img compare failed: {proc.stderr.decode().strip()}")
    return proc.returncode == 0


def remove_tree(path: Path) -> None:
    """Remove a work directory."""
    shutil.rmtree(path, ignore_errors=True)
