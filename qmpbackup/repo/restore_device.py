"""Restore one disk of a backup onto an existing block device, read back and checked.

The one place qmpbackup writes over something that exists, so only with ``force``,
only onto a block device, and only raw. Refused before anything is written: a device
smaller than the disk, or in use (:mod:`qmpbackup.block_devices`: mounted, held by
device-mapper, LVM or md, claimed by the kernel, open in a QEMU process). The device
is then held open exclusively (``O_EXCL``), so that nothing mounts or claims it while
it is written.

A format 2 chain is copied by this process (:func:`~qmpbackup.repo.chain_copy.
copy_chain_into`), each block checked on its way; other chains (encrypted, format 1)
by ``qemu-img convert -n``. Zero ranges are written as zeroes (``BLKZEROOUT``: no
deallocation); with ``sparse`` the disk's range of the device is first made to read as
zeroes with a hole punched (deallocated where the device can), and only data is
written (``qemu-img`` is told ``--target-is-zero``). Either way the device is then
flushed and read back with ``O_DIRECT`` (the device, not the page cache), every block
compared with the digests recorded at backup time. Bytes past the disk's size are left.
"""

from __future__ import annotations

import contextvars
import errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from ..block_devices import (
    device_use,
    is_block_device,
    logical_block_size,
    punch,
    qemu_has_open,
    zero_out,
)
from ..errors import InvalidInputError, QmpBackupError, TargetExistsError
from ..files import pwrite_all
from ..images.keyed import image_args
from ..images.qcow2_reader import Qcow2Unsupported
from ..images.qemu_img import qemu_img
from .chain_copy import copy_chain_into
from .digests import Digests, block_digest
from .records import RepositoryError
from .repository import Repository
from .restore import (
    RestoreResult,
    describe_blocks,
    recorded_digests,
    select_backup,
)

log = structlog.get_logger("qmpbackup.restore")

_READ = 4 << 20  # bytes per read-back read


def punch_disk(fd: int, size: int) -> bool:
    """Make the first ``size`` bytes of the device open as ``fd`` read as zeroes by
    deallocating them; False where the device cannot."""
    sector = logical_block_size(fd)
    whole = size // sector * sector
    if whole and not punch(fd, 0, whole):
        return False
    if size > whole:
        zero_out(fd, whole, size - whole, sector)
    return True


class DeviceSink:
    """Raw writes onto an open block device; zero ranges made to read as zeroes."""

    def __init__(self, fd: int, size: int, sparse: bool) -> None:
        self.fd = fd
        self.sector = logical_block_size(fd)
        # With sparse, one hole punched over the whole disk's range leaves only the
        # data to write; without it, or where the device cannot, zeroes are written.
        self.reads_zero = sparse and punch_disk(fd, size)
        # Aligned clusters go around the page cache (a third of the time of buffered
        # writes onto a loop device); the rest (decompressed clusters, a short last
        # one) through it: the kernel keeps the two coherent.
        self.direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        try:
            pwrite_all(self.direct, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            pwrite_all(self.fd, data, offset)

    def zero(self, offset: int, length: int) -> None:
        if not self.reads_zero:
            zero_out(self.fd, offset, length, self.sector)

    def finish(self) -> str | None:
        os.fsync(self.fd)
        self.abandon()
        return None

    def abandon(self) -> None:
        """Close the direct descriptor; nothing to undo: the device was given to be
        overwritten."""
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1


def open_device(device: Path, size: int, force: bool) -> int:
    """The block device ``device``, opened for writing and held exclusively, once it is
    known to be free and at least ``size`` bytes. TargetExistsError without ``force``;
    InvalidInputError naming what uses it, or that it is too small."""
    if not force:
        raise TargetExistsError(
            f"{device} is a block device: restoring onto it overwrites it; add --force"
        )
    try:
        use = device_use(device)
    except OSError as exc:
        raise QmpBackupError(f"cannot open {device}: {exc.strerror}") from None
    if use.mounts:
        raise InvalidInputError(
            f"{device} holds a filesystem mounted at {', '.join(use.mounts)}: left alone"
        )
    if use.holders:
        raise InvalidInputError(
            f"{device} is in use by {', '.join(use.holders)} (device-mapper, LVM, md): left alone"
        )
    if use.size < size:
        raise InvalidInputError(
            f"{device} has {use.size} bytes, fewer than the disk's {size}: left alone"
        )
    try:
        fd = os.open(device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise InvalidInputError(
                f"{device} is in use (claimed by the kernel): left alone"
            ) from None
        raise QmpBackupError(f"cannot open {device}: {exc.strerror}") from None
    if qemu_has_open(fd):
        os.close(fd)
        raise InvalidInputError(
            f"{device} is open in a QEMU process (its lock is held): left alone"
        )
    return fd


def read_back(device: Path, expected: Digests) -> list[int]:
    """The blocks of the first ``expected.size`` bytes of ``device`` whose digests differ
    from ``expected``, read with O_DIRECT. OSError if a read fails."""
    size, block = expected.size, expected.block_size
    chunk = max(block, _READ // block * block)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    local = threading.local()
    try:

        def check(offset: int) -> list[int]:
            length = min(chunk, size - offset)
            # O_DIRECT wants an aligned buffer (mmap's is) of whole logical blocks (the
            # chunk's are); one per thread, reused: a new one costs a fault per page.
            if not hasattr(local, "buffer"):
                local.buffer = mmap.mmap(-1, chunk)
            done = os.preadv(fd, [local.buffer], offset)
            if done < length:
                raise OSError(errno.EIO, f"{device}: short read at byte {offset + done}")
            view = memoryview(local.buffer)
            try:
                first = offset // block
                return [
                    first + k
                    for k in range(-(-length // block))
                    if block_digest(view[k * block : min((k + 1) * block, length)],
                                    expected.algorithm)
                    != expected.get(first + k)
                ]  # fmt: skip
            finally:
                view.release()

        with ThreadPoolExecutor(2, thread_name_prefix="qmpbackup-readback") as pool:
            # Each read runs in a copy of this context: the digests' key is a context
            # variable (images.keyed), which the pool's threads do not inherit.
            done = [
                pool.submit(contextvars.copy_context().run, check, offset)
                for offset in range(0, size, chunk)
            ]
            return [i for future in done for i in future.result()]
    finally:
        os.close(fd)


def _write(fd: int, device: Path, chain: list[Path], expected: Digests, sparse: bool) -> None:
    """Write ``chain``'s content onto the open ``device``: this process's copy, or
    ``qemu-img convert -n`` for a chain it does not read."""
    try:
        copied = copy_chain_into(chain, expected, lambda: DeviceSink(fd, expected.size, sparse))
    except Qcow2Unsupported as exc:
        log.info("restore.through-qemu-img", image=str(chain[-1]), reason=str(exc))
        # qemu-img skips the zero ranges only when told the device reads zeroes.
        zeroed = sparse and punch_disk(fd, expected.size)
        options = ["--target-is-zero"] if zeroed else []
        # -t none: O_DIRECT onto the device, 1.5 s against 8.6 s through the page cache
        # for a 2 GiB chain (scripts/bench-restore-device).
        qemu_img(
            "convert", "-q", "-n", *image_args(chain[-1]),
            "-O", "raw", "-t", "none", *options, str(device),
        )  # fmt: skip
        os.fsync(fd)
        return
    if copied.bad:
        raise RepositoryError(
            f"{describe_blocks(copied.bad, expected.block_size)} differs from the recorded digests"
        )


def restore_device(
    repo: Repository,
    disk: str,
    device: Path,
    backup_id: str | None = None,
    *,
    fmt: str = "raw",
    force: bool = False,
    sparse: bool = False,
) -> RestoreResult:
    """Write disk ``disk`` as it was at backup ``backup_id`` (default: the newest complete
    backup holding it) raw onto the existing block device ``device``, then read it back
    against the digests recorded at backup time.

    Raises TargetExistsError without ``force``; InvalidInputError for a ``fmt`` other
    than raw, a device that is not one, is too small or in use (nothing written);
    RepositoryError naming the first block the device does not hold as recorded;
    ImageError, OSError on failures.
    """
    device = Path(device).absolute()
    if fmt != "raw":
        raise InvalidInputError(f"a block device is restored raw: --format {fmt} is for a file")
    if not is_block_device(device):
        raise InvalidInputError(f"{device} is not a block device")
    record, disk_record = select_backup(repo, disk, backup_id)
    what = f"backup {record.id}, disk {disk}"
    expected = recorded_digests(repo, record, disk_record)
    chain = repo.chain(record.id, disk)
    fd = open_device(device, expected.size, force)
    log.info("restore.begin", backup=record.id, disk=disk, out=str(device), fmt="raw")
    try:
        _write(fd, device, chain, expected, sparse)
        # The read-back must see the device: drop what the writes left in the page cache.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        bad = read_back(device, expected)
    except RepositoryError as exc:
        raise RepositoryError(f"{what}: {exc}") from None
    finally:
        os.close(fd)
    if bad:
        raise RepositoryError(
            f"{what}: {device}: {describe_blocks(bad, expected.block_size)} read back "
            "differs from the recorded digests"
        )
    log.info("restore.done", backup=record.id, disk=disk, out=str(device), blocks=expected.count)
    return RestoreResult(
        backup_id=record.id,
        disk=disk,
        out=device,
        fmt="raw",
        virtual_size=disk_record.virtual_size,
        blocks_checked=expected.count,
    )
