"""qcow2 compressed clusters as QEMU writes and reads them (``docs/interop/qcow2.txt``).

A compressed cluster is a zstd frame (compression type 1) or a raw deflate stream with
a 4 KiB window (type 0, zlib), written by the libraries themselves; its L2 descriptor
holds the byte offset of the data and how many 512-byte sectors it spans.  Decoding
follows QEMU's: the data may be followed by anything up to its last sector's end, and
a cluster is good when exactly a whole cluster comes out.

:class:`Packer` lays compressed clusters one after the other into host clusters, as
QEMU's ``qcow2_alloc_bytes`` does: several share a host cluster (which then counts a
reference for each), one may run on into the next host cluster when that is contiguous.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import Literal

import zstandard

from ..errors import QmpBackupError

Compression = Literal["zlib", "zstd"]
#: The header's ``compression_type`` byte (offset 104) of each compression.
TYPE_IDS: dict[Compression, int] = {"zlib": 0, "zstd": 1}
ENTRY_COMPRESSED = 1 << 62
SECTOR = 512
# QEMU compresses at zstd's default level 3. Level 1 took a quarter less CPU for 2 % more
# bytes (512 MiB of a tar of /usr: 1.58 s against 2.14 s, 253 MiB against 248 MiB): a pull
# backup compresses on the CPUs that also read the export.
ZSTD_LEVEL = 1
ZLIB_WINDOW = -12  # raw deflate, 4 KiB window: QEMU's
# Stored compressed when at least a sector is saved (QEMU keeps anything under a whole
# cluster): below that, the few bytes saved cost a decompression at every restore.
SAVED_AT_LEAST = SECTOR
RESERVE = 16  # host clusters taken at a time for compressed data


class BadCompressedCluster(QmpBackupError):
    """A compressed cluster does not decode into exactly one cluster."""


_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    # Neither zstandard object may be shared between threads: one of each per thread.
    found: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if found is None:
        found = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return found


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


def compress(data: bytes | memoryview, compression: Compression) -> bytes | None:
    """``data`` (one whole cluster) compressed; None when that saves less than a sector."""
    if compression == "zstd":
        out = _zstd_compressor().compress(data)
    else:
        packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WINDOW, 9)
        out = packer.compress(data) + packer.flush()
    return out if len(out) <= len(data) - SAVED_AT_LEAST else None


def decompress(raw: bytes | memoryview, compression: Compression, length: int) -> bytes:
    """The ``length``-byte cluster that ``raw`` (its data, maybe with bytes after it)
    holds; BadCompressedCluster if it does not decode into exactly that many bytes."""
    try:
        out = _unzstd(bytes(raw), length) if compression == "zstd" else _inflate(raw, length)
    except (zstandard.ZstdError, zlib.error) as exc:
        raise BadCompressedCluster(f"compressed cluster does not decode: {exc}") from None
    if len(out) != length:
        raise BadCompressedCluster(f"compressed cluster decodes into {len(out)} bytes")
    return out


def _inflate(raw: bytes | memoryview, length: int) -> bytes:
    # Good once the cluster is full, whether or not the stream says it ended (QEMU's rule).
    return zlib.decompressobj(ZLIB_WINDOW).decompress(raw, length)


def _unzstd(raw: bytes, length: int) -> bytes:
    # QEMU reads frame after frame until the cluster is full; ours and QEMU's are one.
    out = b""
    while len(out) < length:
        declared = zstandard.frame_content_size(raw)
        if declared < 0:
            # No size in the frame (neither QEMU nor we write one so): read no more than
            # the cluster can hold, so that a crafted frame cannot expand without bound.
            reader = _zstd_decompressor().stream_reader(raw, read_across_frames=False)
            rest = reader.read(length - len(out) + 1)
            if len(out) + len(rest) != length:
                raise BadCompressedCluster("zstd frame of another size than a cluster")
            return out + rest
        if declared > length - len(out):
            raise BadCompressedCluster(f"zstd frame of {declared} bytes in a cluster")
        frame = _zstd_decompressor().decompressobj()
        out += frame.decompress(raw)
        if not frame.eof:
            raise BadCompressedCluster("zstd frame cut short")
        raw = frame.unused_data
    return out


def descriptor(offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of ``length`` compressed bytes at host byte ``offset``."""
    shift = 62 - (cluster_bits - 8)
    sectors = (offset + length - 1) // SECTOR - offset // SECTOR  # beyond the first
    return ENTRY_COMPRESSED | sectors << shift | offset


def span(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, bytes to read) of a compressed L2 entry: up to the end of its
    last sector, which may hold the start of the next compressed cluster."""
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = (entry >> shift & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * SECTOR - offset % SECTOR


class Packer:
    """Compressed clusters placed byte after byte in host clusters that ``allocate(n)``
    (the first of ``n`` new host clusters) gives, :data:`RESERVE` at a time.

    Host clusters are handed back whole, to be written once; :attr:`refs` holds the
    reference count of every host cluster taken (0 for those never used).
    Not thread-safe: the writer calls it under its lock.
    """

    def __init__(self, allocate: Callable[[int], int], cluster_bits: int) -> None:
        self._allocate = allocate
        self._bits = cluster_bits
        self._cluster = 1 << cluster_bits
        self._first = 0  # host cluster where the buffered bytes start
        self._end = 0  # host clusters up to here are taken
        self._buffer = bytearray()
        self.refs: dict[int, int] = {}

    def add(self, data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
        """Place ``data``: its L2 descriptor, and the host clusters now complete
        (host byte offset, whole cluster)."""
        cluster = self._cluster
        start = self._first * cluster + len(self._buffer)
        done: list[tuple[int, bytes]] = []
        if start + len(data) > self._end * cluster:
            new = self._allocate(RESERVE)
            if new != self._end:  # not contiguous: what is left of this run stays free
                done = self.close()
                self._first = new
                start = new * cluster
            self._end = new + RESERVE
            for host in range(new, self._end):
                self.refs[host] = 0
        self._buffer += data
        for host in range(start // cluster, (start + len(data) - 1) // cluster + 1):
            self.refs[host] += 1
        whole = len(self._buffer) // cluster
        if whole:
            done.append((self._first * cluster, bytes(self._buffer[: whole * cluster])))
            del self._buffer[: whole * cluster]
            self._first += whole
        return descriptor(start, len(data), self._bits), done

    def release(self, entry: int) -> None:
        """A compressed cluster placed here is no longer referenced."""
        offset, length = span(entry, self._bits)
        for host in range(offset // self._cluster, (offset + length - 1) // self._cluster + 1):
            self.refs[host] -= 1

    def close(self) -> list[tuple[int, bytes]]:
        """The partly filled host cluster, padded with zeroes; the rest taken stays free."""
        if not self._buffer:
            return []
        last = bytes(self._buffer) + bytes(self._cluster - len(self._buffer))
        host = self._first * self._cluster
        self._buffer.clear()
        self._first += 1
        return [(host, last)]
