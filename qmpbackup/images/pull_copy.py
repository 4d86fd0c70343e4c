"""Copying a pull backup's exports into images with the built-in NBD client.

Full: every extent that is not known to read as zeroes is copied into a new
qcow2 (or raw) image; zero extents stay sparse.  Incremental/differential:
only the extents the export's dirty bitmap marks are written, into a qcow2
whose backing file is the previous backup; dirty extents that now read as
zeroes are written as zeroes, never dropped, so they hide the older data.
The reader runs several NBD connections with several requests in flight
each; this process writes the image itself (``qcow2_writer``), with data that
reads as zeroes left sparse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import QmpBackupError
from ..files import pwrite_all
from ..nbd import Extent, NBDClient, NBDError, TLSConfig
from ..nbd.copy import Done, copy_ranges
from .encrypted_sink import EncryptedSink
from .qcow2_compressed import Compression
from .qcow2_writer import CLUSTER, Qcow2Writer

ALLOCATION = "base:allocation"
_ZERO = 2  # base:allocation: the extent reads as zeroes
_DIRTY = 1  # qemu:dirty-bitmap:*: the extent changed since the checkpoint

Progress = Callable[[int], None]
# Measured by scripts/bench (2 CPUs, QEMU 7.2 serving): 1 MiB requests, 8 in flight
# on each of 2 connections beat larger requests (their buffers fall out of the CPU
# caches between the socket and the file) and more connections (QEMU serves all of
# them from one thread).
REQUEST_SIZE = 1 << 20
IN_FLIGHT = 8
CONNECTIONS = 2
WRITERS = 2  # threads writing and hashing the new image
# Compressing, every CPU: zstd and zlib let go of the GIL, and compress more slowly
# than the export is read.
COMPRESSORS = max(WRITERS, os.cpu_count() or 1)


@dataclass(frozen=True)
class CopyResult:
    """What a pull copy wrote."""

    image: Path
    size: int
    data_bytes: int
    zero_bytes: int
    # qcow2 only: the digest of every block written or zeroed, and the file digest,
    # as hashed on the way in (qmpbackup.images.qcow2_writer).
    blocks: dict[int, bytes] | None = None
    file_digest: str | None = None


def _intersect(
    allocation: Iterator[Extent], dirty: list[tuple[int, int]]
) -> Iterator[tuple[int, int, int]]:
    """(offset, length, allocation flags) of the dirty parts, both inputs in order."""
    ranges = iter(dirty)
    current = next(ranges, None)
    for extent in allocation:
        end = extent.offset + extent.length
        while current is not None and current[0] < end:
            lo, hi = max(extent.offset, current[0]), min(end, current[1])
            if lo < hi:
                yield lo, hi - lo, extent.flags
            if current[1] > end:
                break  # the dirty range goes on into the next extent
            current = next(ranges, None)


# Up to this many dirty ranges, their allocation is asked range by range; beyond, in
# one sweep from the first to the last (one request per extent instead of per range).
_PER_RANGE = 16


def _plan_ranges(
    source: NBDClient, dirty_context: str | None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(data ranges to copy, zero ranges to write as zeroes)."""
    data: list[tuple[int, int]] = []
    zeros: list[tuple[int, int]] = []
    if dirty_context is None:
        for extent in source.extents(ALLOCATION):
            if not extent.flags & _ZERO:
                data.append((extent.offset, extent.length))
        return data, zeros
    dirty = [(e.offset, e.offset + e.length) for e in source.extents(dirty_context)
             if e.flags & _DIRTY]  # fmt: skip
    if not dirty:
        return data, zeros
    if len(dirty) <= _PER_RANGE:
        pieces = [
            piece
            for lo, hi in dirty
            for piece in _intersect(source.extents(ALLOCATION, lo, hi - lo), [(lo, hi)])
        ]
    else:
        lo, hi = dirty[0][0], dirty[-1][1]
        pieces = list(_intersect(source.extents(ALLOCATION, lo, hi - lo), dirty))
    for offset, length, flags in pieces:
        (zeros if flags & _ZERO else data).append((offset, length))
    return data, zeros


def _cluster_aligned(
    data: list[tuple[int, int]], zeros: list[tuple[int, int]], size: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The ranges in whole clusters: data grows to its clusters' edges (the view reads
    right there too), zeroes keep only the clusters they cover whole; the rest of a
    partly zero cluster is read as data."""
    spans: list[tuple[int, int]] = []
    whole: list[tuple[int, int]] = []
    for offset, length in zeros:
        lo, hi = -(-offset // CLUSTER) * CLUSTER, (offset + length) // CLUSTER * CLUSTER
        if offset + length == size:
            hi = size
        if lo < hi:
            whole.append((lo, hi - lo))
            spans += [(offset, lo - offset)] if offset < lo else []
            spans += [(hi, offset + length - hi)] if hi < offset + length else []
        else:
            spans.append((offset, length))
    out: list[tuple[int, int]] = []
    for offset, length in sorted(data + spans):
        lo = offset // CLUSTER * CLUSTER
        hi = min(size, -(-(offset + length) // CLUSTER) * CLUSTER)
        if out and lo <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], hi) - start)
        else:
            out.append((lo, hi - lo))
    return out, whole


class _FileSink:
    """The copy engine's sink for a new image file written by this process, on threads
    of its own: the copy's scheduler goes on reading while data is written and hashed
    (both let go of the GIL)."""

    block = CLUSTER
    max_request = 32 << 20

    def __init__(
        self,
        out: Path,
        size: int,
        fmt: str,
        backing: Path | None,
        compression: Compression | None = None,
    ) -> None:
        self.out = out
        self.size = size
        self._qcow2: Qcow2Writer | None = None
        self._fd = -1
        threads = WRITERS if compression is None else COMPRESSORS
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="qmpbackup-write")
        try:
            if fmt == "qcow2":
                name = os.path.relpath(backing, out.parent) if backing is not None else None
                self._qcow2 = Qcow2Writer(out, size, name, compression=compression)
            else:
                self._fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                os.ftruncate(self._fd, size)
        except FileExistsError:
            self._pool.shutdown()
            raise QmpBackupError(f"{out} exists: refusing to overwrite it") from None
        except OSError as exc:
            self._pool.shutdown()
            raise QmpBackupError(f"cannot create {out}: {exc.strerror}") from None

    def write(self, offset: int, data: memoryview, done: Done) -> None:
        self._pool.submit(self._store, offset, data, done)

    def _store(self, offset: int, data: memoryview, done: Done) -> None:
        try:
            if self._qcow2 is not None:
                self._qcow2.write(offset, data)
            else:
                pwrite_all(self._fd, data, offset)
        except OSError as exc:
            done(NBDError(f"write of {len(data)} bytes at offset {offset} failed: {exc.strerror}"))
            return
        except Exception as exc:  # on this thread: the copy must hear of it
            done(NBDError(f"write of {len(data)} bytes at offset {offset} failed: {exc}"))
            return
        done(None)

    def zero(self, offset: int, length: int, done: Done) -> None:
        # A new raw file reads as zeroes already; qcow2 marks zero clusters over a backing.
        if self._qcow2 is not None:
            self._qcow2.zero(offset, length)
        done(None)

    def hashed(self) -> tuple[dict[int, bytes] | None, str | None]:
        """What the qcow2 writer hashed (blocks, file digest), once finished."""
        if self._qcow2 is None:
            return None, None
        return self._qcow2.blocks, self._qcow2.file_digest

    def finish(self) -> None:
        self._pool.shutdown()
        if self._qcow2 is not None:
            self._qcow2.finish()
        else:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def abandon(self) -> None:
        self._pool.shutdown()
        if self._qcow2 is not None:
            self._qcow2.abandon()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.out.unlink(missing_ok=True)


def pull_copy(
    source_uri: str,
    out: Path,
    *,
    fmt: str = "qcow2",
    backing: Path | None = None,
    bitmap: str | None = None,
    tls: TLSConfig | None = None,
    connections: int = CONNECTIONS,
    on_progress: Progress | None = None,
    on_start: Progress | None = None,
    compression: Compression | None = None,
    encrypt: bool = False,
) -> CopyResult:
    """Copy an export into the new image ``out``.

    With ``bitmap`` (the export's dirty bitmap, e.g. ``vda``) only dirty
    extents are written and ``backing`` (the previous backup) becomes the
    backing file of ``out``, which must then be qcow2.  With ``compression``, a
    qcow2 ``out`` holds compressed clusters. ``encrypt``: ``out`` is a
    LUKS-encrypted qcow2 made beforehand by :func:`~.qemu_img.create_encrypted`, which
    QEMU writes (:mod:`.encrypted_sink`), with the key set by
    :func:`~qmpbackup.images.keyed.using_key` in this thread.
    """
    dirty_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
    if dirty_context is not None and (backing is None or fmt != "qcow2"):
        raise ValueError("an incremental copy needs a qcow2 image and its backing file")
    if fmt not in ("qcow2", "raw"):
        raise ValueError(f"unknown image format {fmt!r}")
    if encrypt and fmt != "qcow2":
        raise ValueError("only a qcow2 image can be encrypted")
    contexts = [ALLOCATION] + ([dirty_context] if dirty_context else [])
    with NBDClient.connect(
        source_uri, connections=connections, meta_contexts=contexts, tls=tls
    ) as source:
        data, zeros = _plan_ranges(source, dirty_context)
        if fmt == "qcow2":
            data, zeros = _cluster_aligned(data, zeros, source.size)
        if on_start is not None:
            on_start(sum(n for _, n in data))
        sink: _FileSink | EncryptedSink
        if encrypt:
            sink = EncryptedSink(out, source.size, backing)
        else:
            sink = _FileSink(out, source.size, fmt, backing, compression)
        try:
            for offset, length in zeros:
                sink.zero(offset, length, _raise)
            copied = copy_ranges(
                source,
                sink,
                data,
                request_size=REQUEST_SIZE,
                in_flight=IN_FLIGHT,
                on_progress=on_progress,
            )
            try:
                sink.finish()
            except OSError as exc:
                raise QmpBackupError(f"cannot write {out}: {exc.strerror}") from None
        except BaseException:
            sink.abandon()
            raise
    blocks, whole = sink.hashed()
    return CopyResult(
        image=out,
        size=source.size,
        data_bytes=copied,
        zero_bytes=sum(n for _, n in zeros),
        blocks=blocks,
        file_digest=whole,
    )


def _raise(error: NBDError | None) -> None:
    if error is not None:
        raise error
