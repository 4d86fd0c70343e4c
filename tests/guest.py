"""Test support for the real Linux guest that ``scripts/build-guest`` caches.

The guest is Debian's kernel with a busybox initramfs (``scripts/guest/``): it
mounts ``/dev/vda`` and ``/dev/vdb`` (ext4) at ``/data/a`` and ``/data/b``, runs
qemu-ga on the ``org.qemu.guest_agent.0`` port, prints :data:`READY_MARKER` on
its serial console and writes files ``f-NNNNNN`` (content: :func:`expected_content`)
on each, listing each in ``MANIFEST`` once it is on disk.  Images are read back
on the host with ``debugfs`` and checked with ``e2fsck``, never mounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from qmpbackup.demo.throwaway import QEMU, DiskImage, ThrowawayVM, kvm_usable, qemu_img
from qmpbackup.errors import QmpBackupError

REPO = Path(__file__).resolve().parent.parent
READY_MARKER = "QMPBACKUP-GUEST-READY"
AGENT_PORT = "org.qemu.guest_agent.0"
SKIP_REASON = "the test guest is not built: run scripts/setup --guest (or scripts/build-guest)"
TCG = "tcg,thread=multi"
LINE = "{name} qmpbackup guest workload\n"


# Lines the real-guest tests report (files verified per restored disk): the suite's
# terminal summary prints them, so that a passing run shows its counts too.
GUEST_REPORT: list[str] = []


def guest_cache() -> Path:
    """The folder ``scripts/build-guest`` builds into."""
    return Path(os.environ.get("QMPBACKUP_GUEST_CACHE") or REPO / ".cache" / "guest")


@dataclass(frozen=True)
class GuestArtifacts:
    """A built guest: its kernel, its initramfs, a host copy of its busybox, the
    build's key and its kernel package (``name version``)."""

    kernel: Path
    initrd: Path
    busybox: Path
    key: str
    kernel_package: str


def guest_artifacts() -> GuestArtifacts | None:
    """The current build in the cache, or None when ``scripts/build-guest`` has not run."""
    current = guest_cache() / "current"
    try:
        packages: dict[str, str] = json.loads((current / "build.json").read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return None
    kernel = " ".join(next((i for i in packages.items() if i[0].startswith("linux-")), ("?",)))
    found = GuestArtifacts(
        current / "vmlinuz",
        current / "initrd.img",
        current / "busybox",
        current.resolve().name,
        kernel,
    )
    return found if found.kernel.is_file() and found.initrd.is_file() else None


def skip_reason() -> str | None:
    """Why the guest tests cannot run here, or None when they can."""
    if guest_artifacts() is None:
        return SKIP_REASON
    if not all(shutil.which(_tool(name)) for name in ("mkfs.ext4", "debugfs", "e2fsck")):
        return (
            "e2fsprogs (mkfs.ext4, debugfs, dumpe2fs, e2fsck) is missing: run scripts/setup --guest"
        )
    return None


def expected_content(name: str) -> bytes:
    """What the guest writes into file ``name`` (``f-NNNNNN``); scripts/guest/workload.sh."""
    number = int(name.removeprefix("f-"))
    return LINE.format(name=name).encode() * (64 + (number * 37) % 1600)


def cpu_for(accel: str) -> str:
    """The ``-cpu`` model for an accelerator: the host's under KVM, ``max`` under TCG."""
    return "host" if accel.startswith("kvm") else "max"


def _boots_to_ready(artifacts: GuestArtifacts, accel: str, timeout: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="qmpbackup-probe-") as tmp:
        console = Path(tmp, "console.log")
        argv = [
            QEMU, "-M", "q35", "-nodefaults", "-display", "none", "-no-reboot",
            "-accel", accel, "-cpu", cpu_for(accel), "-m", "256",
            "-kernel", str(artifacts.kernel), "-initrd", str(artifacts.initrd),
            "-append", "console=ttyS0 quiet panic=-1 qmpbackup.workload=none",
            "-serial", f"file:{console}",
            "-chardev", "null,id=qga0", "-device", "virtio-serial",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}",
        ]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if console.exists() and READY_MARKER in console.read_text(errors="replace"):
                    return True
                time.sleep(0.1)
            return False
        finally:
            process.kill()
            process.wait()


def guest_accel(kvm_timeout: float = 10.0) -> str:
    """The ``-accel`` value that boots the guest here: ``kvm`` when a probe boot reaches
    the ready marker within ``kvm_timeout``, else :data:`TCG`.  The answer is kept in the
    cache folder per QEMU version and kernel, so the probe runs once per machine."""
    artifacts = guest_artifacts()
    if artifacts is None or not kvm_usable():
        return TCG
    record = guest_cache() / "accel.json"
    known: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(record.read_text())
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    version = f"{(qemu.stdout or QEMU).splitlines()[0]}, {artifacts.kernel_package}"
    if version not in known:
        started = time.monotonic()
        accel = "kvm" if _boots_to_ready(artifacts, "kvm", kvm_timeout) else TCG
        known[version] = {"accel": accel, "probe_seconds": round(time.monotonic() - started, 1)}
        partial = record.with_name(f"accel.json.{os.getpid()}")
        partial.write_text(json.dumps(known, indent=2) + "\n")
        partial.replace(record)
    return str(known[version]["accel"])


def make_ext4_disk(path: Path, size: int, fmt: str = "qcow2") -> Path:
    """An empty ext4 filesystem of ``size`` bytes in a new ``fmt`` (qcow2 or raw) image."""
    raw = path if fmt == "raw" else path.with_name(path.name + ".mkfs.raw")
    with open(raw, "wb") as handle:
        handle.truncate(size)
    try:
        _run("mkfs.ext4", "-q", "-F", "-L", path.stem[:16], str(raw))
        if fmt != "raw":
            qemu_img("convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path))
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
    return path


class GuestVM(ThrowawayVM):
    """A :class:`ThrowawayVM` that boots the guest: its disks are ``/dev/vda``, ``/dev/vdb``
    in order, its serial console goes to ``console.log`` and its agent listens on
    ``agent.sock`` in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        disks: Sequence[DiskImage],
        artifacts: GuestArtifacts,
        *,
        name: str = "guest",
        append: str = "",
        memory_mib: int = 256,
        accel: str | None = None,
    ) -> None:
        super().__init__(workdir, disks, name=name)
        self.artifacts = artifacts
        self.append = f"console=ttyS0 quiet panic=-1 {append}".strip()
        self.memory_mib = memory_mib
        self.accel = accel or guest_accel()
        self.console_path = workdir / "console.log"
        self.agent_path = workdir / "agent.sock"

    def command_line(self) -> list[str]:
        """ThrowawayVM's command line with the guest's accelerator, memory, kernel,
        serial console and agent port."""
        argv = super().command_line()
        argv[argv.index("-accel") + 1] = self.accel
        argv[argv.index("-m") + 1] = str(self.memory_mib)
        return [
            *argv, "-cpu", cpu_for(self.accel), "-no-reboot",
            "-kernel", str(self.artifacts.kernel), "-initrd", str(self.artifacts.initrd),
            "-append", self.append, "-serial", f"file:{self.console_path}",
            "-chardev", f"socket,path={self.agent_path},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}",
        ]  # fmt: skip

    async def start(self, timeout: float = 30.0) -> None:
        """Start QEMU (the guest boots at once); see :meth:`wait_ready`."""
        self.console_path.unlink(missing_ok=True)
        await super().start(timeout)

    def console(self) -> str:
        """What the guest printed on its serial console so far."""
        path = self.console_path
        return path.read_text(errors="replace") if path.exists() else ""

    async def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait for the guest's ready marker; return the seconds waited.  QmpBackupError
        (with the console's tail) if QEMU exits or the marker does not come in time."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while READY_MARKER not in self.console():
            if self.process is None or self.process.poll() is not None:
                raise QmpBackupError(f"QEMU exited before the guest was ready:\n{self.console()}")
            if loop.time() - started > timeout:
                raise QmpBackupError(f"guest not ready in {timeout} s:\n{self.console()[-2000:]}")
            await asyncio.sleep(0.1)
        return loop.time() - started

    async def wait_exit(self, timeout: float = 60.0) -> bool:
        """Wait for QEMU to exit by itself (the guest powered off); False on timeout."""
        if self.process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout)
        return self.process is None or self.process.poll() is not None

    def _remove_sockets(self) -> None:
        super()._remove_sockets()
        self.agent_path.unlink(missing_ok=True)


def ext4_guest(workdir: Path, append: str = "") -> GuestVM:
    """The guest on two new 64 MiB ext4 disks in ``workdir``, ``vda`` qcow2 and ``vdb``
    raw, not started yet; the calling test is skipped when the guest is not built."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    artifacts = guest_artifacts()
    assert artifacts is not None
    size = 64 << 20
    disks = [
        DiskImage("vda", make_ext4_disk(workdir / "vda.qcow2", size, "qcow2"), "qcow2"),
        DiskImage("vdb", make_ext4_disk(workdir / "vdb.raw", size, "raw"), "raw"),
    ]
    return GuestVM(workdir, disks, artifacts, append=append)


def _tool(name: str) -> str:
    """An e2fsprogs tool: from PATH, else from /usr/sbin or /sbin (not in a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([_tool(argv[0]), *argv[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise QmpBackupError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}".strip())
    return proc


def _image_format(image: Path) -> str:
    return str(json.loads(qemu_img("info", "-U", "--output=json", str(image)))["format"])


@contextlib.contextmanager
def raw_copy(image: Path, replay: bool = False) -> Iterator[Path]:
    """A temporary raw copy of ``image`` (any format QEMU reads), removed afterwards;
    ``replay``: with its ext4 journal replayed (as a mount would), nothing else repaired."""
    with tempfile.TemporaryDirectory(prefix="qmpbackup-fs-") as tmp:
        raw = Path(tmp, "fs.raw")
        qemu_img("convert", "-U", "-f", _image_format(image), "-O", "raw", str(image), str(raw))
        if replay:
            _replay_journal(raw)
        yield raw


def _replay_journal(raw: Path) -> None:
    cmd = [_tool("e2fsck"), "-y", "-E", "journal_only", str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 1):  # 1: the journal was replayed
        raise QmpBackupError(f"journal replay of {raw}: {proc.stdout}{proc.stderr}")


def _debugfs(raw: Path, request: str) -> str:
    return _run("debugfs", "-R", request, str(raw)).stdout


def read_manifest(image: Path, replay: bool = False) -> list[str]:
    """The names in ``/MANIFEST`` of the ext4 filesystem in ``image``, unmounted
    (``replay``: after replaying its journal, needed after a crash; see :func:`raw_copy`)."""
    with raw_copy(image, replay) as raw:
        return _debugfs(raw, "cat /MANIFEST").split()


class FileCheck(NamedTuple):
    """What :func:`check_files` found: counts, and the names of the bad files."""

    listed: int
    correct: int
    wrong: list[str]
    missing: list[str]


def check_files(image: Path, replay: bool = False) -> FileCheck:
    """Read every file of the ext4 filesystem in ``image`` (unmounted; ``replay``: after
    replaying its journal) and compare each one its MANIFEST lists with
    :func:`expected_content`."""
    dump = tempfile.TemporaryDirectory(prefix="qmpbackup-dump-")
    with raw_copy(image, replay) as raw, dump as out:
        _debugfs(raw, f"rdump / {out}")
        manifest = Path(out, "MANIFEST")
        names = manifest.read_text().split() if manifest.exists() else []
        wrong, missing = [], []
        for name in names:
            path = Path(out, name)
            if not path.exists():
                missing.append(name)
            elif path.read_bytes() != expected_content(name):
                wrong.append(name)
    return FileCheck(len(names), len(names) - len(wrong) - len(missing), wrong, missing)


class Fsck(NamedTuple):
    """``e2fsck -fn`` of an image: clean (no error found and, unless replayed, no journal
    to replay), whether its journal needed recovery (``needs_recovery``), and the output."""

    clean: bool
    needs_recovery: bool
    output: str


def e2fsck_clean(image: Path, replay: bool = False) -> Fsck:
    """Check the ext4 filesystem in ``image`` without changing it: as it is (e2fsck -n does
    not replay a journal) or, with ``replay``, after its journal is replayed on a copy."""
    with raw_copy(image) as raw:
        header = _run("dumpe2fs", "-h", str(raw)).stdout
        features = re.search(r"^Filesystem features:\s*(.*)$", header, re.M)
        recovery = features is not None and "needs_recovery" in features.group(1).split()
        if replay:
            _replay_journal(raw)
        proc = subprocess.run(
            [_tool("e2fsck"), "-fn", str(raw)], capture_output=True, text=True, check=False
        )
    clean = proc.returncode == 0 and (replay or not recovery)
    return Fsck(clean, recovery, proc.stdout + proc.stderr)
