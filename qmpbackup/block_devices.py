"""Block devices of this host: whether something uses one, and zeroing ranges of one.

A device is in use when it or a partition of it is mounted or a swap area, when the
kernel built another device on it (``/sys/dev/block/*/holders``: device-mapper, LVM,
md) or has it claimed (an exclusive open fails with EBUSY), or when a QEMU process
has it open (QEMU's image locks: byte-range locks at offsets 100 to 299).

Zeroing uses the kernel's guarantees (``block/ioctl.c``, ``block/fops.c``):
``BLKZEROOUT`` writes zeroes without deallocating (offloaded as WRITE ZEROES where
the device has it); ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` leaves the range reading
as zeroes and may deallocate it (thin volumes, a loop device's file), and fails with
EOPNOTSUPP where the device cannot do that without writing. A plain discard
(``BLKDISCARD``) guarantees nothing about what the range reads, so it is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BLKZEROOUT = 0x127F  # _IO(0x12, 127)
BLKSSZGET = 0x1268  # _IO(0x12, 104): logical block size
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# QEMU's file-posix locks bytes 100 + permission and 200 + unshared permission.
_QEMU_LOCK_START, _QEMU_LOCK_LENGTH = 100, 200

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(frozen=True)
class DeviceUse:
    """What uses a block device: where it (or a partition) is mounted, the kernel devices
    built on it or "the kernel" when an exclusive open is refused; and its size."""

    size: int
    mounts: tuple[str, ...]
    holders: tuple[str, ...]


def is_block_device(path: Path | str) -> bool:
    """True when ``path`` names a block device (following links)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def kernel_devices(rdev: int) -> list[str]:
    """``major:minor`` of a block device and of its partitions."""
    own = f"{os.major(rdev)}:{os.minor(rdev)}"
    found = [own]
    with contextlib.suppress(OSError):
        for child in Path("/sys/dev/block", own).iterdir():
            if (child / "partition").exists():
                found.append((child / "dev").read_text().strip())
    return found


def mounts(devices: Iterable[str], path: Path | str) -> tuple[str, ...]:
    """Where the devices ``major:minor`` are mounted (/proc/self/mountinfo), and "swap"
    when ``path`` is a swap area."""
    wanted = set(devices)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[2] in wanted:
                found.append(fields[4].replace("\\040", " "))
    with contextlib.suppress(OSError):
        swaps = [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]
        if any(os.path.realpath(s) == os.path.realpath(path) for s in swaps):
            found.append("swap")
    return tuple(found)


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def device_use(path: Path | str) -> DeviceUse:
    """What uses the block device ``path`` now (see the module). OSError if it cannot
    be opened."""
    devices = kernel_devices(os.stat(path).st_rdev)
    holders = [h.name for d in devices for h in _listdir(Path("/sys/dev/block", d, "holders"))]
    try:
        # O_EXCL on a block device: refused while the kernel has it claimed.
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as err:
        if err.errno != errno.EBUSY:
            raise
        holders = holders or ["the kernel (an exclusive open is refused)"]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return DeviceUse(size=size, mounts=mounts(devices, path), holders=tuple(holders))


def qemu_has_open(fd: int) -> bool:
    """True when another process holds a lock on QEMU's image-lock bytes of the file open
    as ``fd`` (for writing): a QEMU, qemu-nbd or qemu-img has it open."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _QEMU_LOCK_LENGTH, _QEMU_LOCK_START)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    fcntl.lockf(fd, fcntl.LOCK_UN, _QEMU_LOCK_LENGTH, _QEMU_LOCK_START)
    return False


def logical_block_size(fd: int) -> int:
    """The device's logical block size: the unit of zeroing and of direct I/O."""
    found = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
    size: int = struct.unpack("i", found)[0]
    return size


def punch(fd: int, offset: int, length: int) -> bool:
    """Make ``length`` bytes at ``offset`` read as zeroes, deallocating them where the
    device can; False (nothing done) where it cannot without writing them. OSError on
    other failures. Both numbers are multiples of the logical block size."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code))


def zero_out(fd: int, offset: int, length: int, sector: int) -> None:
    """Write ``length`` bytes of zeroes at ``offset`` (BLKZEROOUT for the whole logical
    blocks, plain writes at unaligned ends). OSError on failure."""
    start = -(-offset // sector) * sector
    end = max(start, (offset + length) // sector * sector)
    if start > offset:
        os.pwrite(fd, bytes(min(start, offset + length) - offset), offset)
    if end > start:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", start, end - start))
    if offset + length > end >= start:
        os.pwrite(fd, bytes(offset + length - end), end)
