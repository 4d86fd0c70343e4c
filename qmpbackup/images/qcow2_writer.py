"""A new qcow2 image written directly by this process: where a pull copy stores its data.

Passing the data through a QEMU process (qemu-storage-daemon over NBD) costs
two more copies of every byte and halved the pull rate; the image a backup
writes is simple enough to lay out here instead.  Data clusters are appended
in the order they arrive; the L2 tables are kept in memory (64 KiB per 512 MiB
of disk, the oldest written out when more than :data:`TABLES_IN_MEMORY` are
held) and the L1 table, the refcounts and the header are written when the
image is finished.  Until then the header is zero, so an image cut short is
not mistaken for a qcow2.

Every 64 KiB chunk of the file is hashed (BLAKE3) as it is written: the chunks'
digests give the file digest of a format 2 record and, for data clusters, the
digests of the guest blocks they hold (:attr:`Qcow2Writer.blocks`), so the data is
hashed once, on its way in, and never read back.

The format is qcow2 version 3 with 64 KiB clusters and 16-bit refcounts,
every allocated cluster referenced once (as ``qemu-img check`` expects);
clusters that must read as zeroes over a backing file are zero clusters.
With a compression type, each data cluster is compressed by the calling thread
(zstd and zlib let go of the GIL) and packed with the others
(:mod:`~qmpbackup.images.qcow2_compressed`), a host cluster counting a reference
per compressed cluster in it; one that does not shrink is stored plain.
The specification is QEMU's ``docs/interop/qcow2.txt``.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from array import array
from pathlib import Path

import blake3

from ..files import pwrite_all
from .qcow2_compressed import ENTRY_COMPRESSED, TYPE_IDS, Compression, Packer, compress
from .qcow2_reader import chunks_digest

MAGIC = 0x514649FB
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts
HEADER_LENGTH = 104
HEADER_LENGTH_COMPRESSED = 112  # with compression_type, padded to a multiple of 8
INCOMPATIBLE_COMPRESSION = 1 << 3  # a compression type other than zlib
EXT_BACKING_FORMAT = 0xE2792ACA
L2_ENTRIES = CLUSTER // 8
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_ZERO = 1  # the cluster reads as zeroes
OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLES_IN_MEMORY = 64
WRITEBACK_WINDOW = 64 << 20  # bytes appended between two starts of writeback


class Qcow2Writer:
    """Writes the new image ``path`` (never an existing file) of ``size`` bytes.

    ``write`` and ``zero`` take cluster-aligned offsets (the last cluster may be
    short); ``finish`` makes the image valid, ``abandon`` removes it.  ``backing``
    is stored as the backing file name as given (keep it relative to ``path``'s
    folder for a movable chain), with format ``backing_fmt``.  With ``compression``,
    data clusters are stored compressed with it.  ValueError for a size that is not
    whole sectors, OSError if the file cannot be made.
    """

    def __init__(
        self,
        path: Path,
        size: int,
        backing: str | None = None,
        backing_fmt: str = "qcow2",
        compression: Compression | None = None,
    ) -> None:
        if size <= 0 or size % 512:
            raise ValueError(f"a qcow2 image needs a size in whole sectors, not {size}")
        self.path = path
        self.size = size
        self.backing = backing
        self.backing_fmt = backing_fmt
        self.compression = compression
        self._packer = Packer(self._allocate, CLUSTER_BITS)
        self._clusters = -(-size // CLUSTER)
        self._l1_size = -(-self._clusters // L2_ENTRIES)
        self._tables: dict[int, array[int]] = {}
        self._table_hosts: dict[int, int] = {}  # L2 index -> its host cluster, once written
        self._next = 1  # host cluster 0 is the header
        self._advised = 0  # host bytes up to here have had their writeback started
        # The digest of every host cluster written, 32 bytes each, by host cluster.
        self._chunks = bytearray(32)
        # Guest cluster -> the digest of its bytes, for every cluster written or zeroed.
        self.blocks: dict[int, bytes] = {}
        self.file_digest: str | None = None  # once finished
        # Held while the layout changes; re-entered when placing data writes a table out.
        self._lock = threading.RLock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            self._header()  # checked now, written (with its magic) by finish()
        except BaseException:
            self.abandon()
            raise

    # -- data ---------------------------------------------------------------

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Store ``data`` at guest ``offset``; rewritten clusters keep their place.

        Several threads may write at once: where the data goes is decided under a lock,
        the data is written and hashed outside it.
        """
        first, count = self._span(offset, len(data))
        view = memoryview(data)
        if self.compression is not None:
            self._write_compressed(first, count, view, self.compression)
            return
        with self._lock:
            pieces = self._place(first, count)
        digests: list[bytes] = []
        for host, start, n in pieces:
            digests += self._pwrite(view[start * CLUSTER : (start + n) * CLUSTER], host)
        for i, digest in enumerate(digests):
            if (i + 1) * CLUSTER > len(view):  # the disk's short last cluster: unpadded
                digest = blake3.blake3(view[i * CLUSTER :]).digest()
            self.blocks[first + i] = digest

    def _place(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """Host clusters for guest clusters ``first`` on: (host offset, first of the
        clusters, how many) runs; new clusters are appended, in one run if all are new."""
        hosts = [self._entry(first + i) & OFFSET_MASK for i in range(count)]
        if not any(hosts):
            start = self._allocate(count)
            for i in range(count):
                self._set(first + i, (start + i) << CLUSTER_BITS | OFLAG_COPIED)
            return [(start << CLUSTER_BITS, 0, count)]
        pieces = []
        for i, host in enumerate(hosts):
            if not host:
                host = self._allocate(1) << CLUSTER_BITS
            self._set(first + i, host | OFLAG_COPIED)
            pieces.append((host, i, 1))
        return pieces

    def _write_compressed(
        self, first: int, count: int, view: memoryview, compression: Compression
    ) -> None:
        """Compress and hash outside the lock; place under it; write outside it."""
        clusters = [view[i * CLUSTER : (i + 1) * CLUSTER] for i in range(count)]
        digests = [blake3.blake3(piece).digest() for piece in clusters]
        packed = [
            compress(piece if len(piece) == CLUSTER else bytes(piece).ljust(CLUSTER, b"\0"),
                     compression)
            for piece in clusters
        ]  # fmt: skip
        writes: list[tuple[int, memoryview | bytes]] = []
        with self._lock:
            for i, data in enumerate(packed):
                entry = self._entry(first + i)
                if entry & ENTRY_COMPRESSED:
                    self._packer.release(entry)
                    self._set(first + i, 0)
                    entry = 0
                # Incompressible, or a plain cluster rewritten: plain, where it is.
                if data is None or entry & OFFSET_MASK:
                    writes += [(host, clusters[i]) for host, _, _ in self._place(first + i, 1)]
                    continue
                entry, done = self._packer.add(data)
                self._set(first + i, entry)
                writes += done
        for host, out in writes:
            self._pwrite(out, host)
        for i, digest in enumerate(digests):
            self.blocks[first + i] = digest

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at guest ``offset`` read as zeroes, over any backing."""
        first, count = self._span(offset, length)
        with self._lock:
            self._zero(first, count)

    def _zero(self, first: int, count: int) -> None:
        for index in range(first, first + count):
            entry = self._entry(index)
            self.blocks[index] = _zero_digest(min(CLUSTER, self.size - index * CLUSTER))
            if entry & ENTRY_COMPRESSED:  # its data goes: the cluster is unallocated
                self._packer.release(entry)
                entry = 0
                self._set(index, 0)
            if self.backing is None and not entry:
                continue  # nothing below: an unallocated cluster reads as zeroes
            self._set(index, entry | OFLAG_ZERO | (OFLAG_COPIED if entry & OFFSET_MASK else 0))

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        end = offset + length
        if offset % CLUSTER or offset < 0 or end > self.size or length <= 0:
            raise ValueError(f"qcow2 write of {length} bytes at {offset} is not cluster-aligned")
        if end % CLUSTER and end != self.size:
            raise ValueError(f"qcow2 write of {length} bytes at {offset} ends mid-cluster")
        return offset // CLUSTER, -(-length // CLUSTER)

    def _allocate(self, count: int) -> int:
        start = self._next
        self._next += count
        return start

    def _pwrite(self, data: memoryview | bytes, host: int) -> list[bytes]:
        """Write ``data`` at the cluster-aligned ``host`` offset; the digests of the
        host clusters it fills (the last zero-padded, as it reads in the file)."""
        pwrite_all(self._fd, data, host)
        view = memoryview(data)
        digests = []
        for start in range(0, len(view), CLUSTER):
            piece = view[start : start + CLUSTER]
            if len(piece) < CLUSTER:
                piece = memoryview(bytes(piece) + bytes(CLUSTER - len(piece)))
            digests.append(blake3.blake3(piece).digest())
        first = host >> CLUSTER_BITS
        end = (first + len(digests)) * 32
        with self._lock:
            if len(self._chunks) < end:
                self._chunks += bytes(end - len(self._chunks))
            self._chunks[first * 32 : end] = b"".join(digests)
            self._advise()
        return digests

    def _advise(self) -> None:
        end = self._next << CLUSTER_BITS
        if end - self._advised >= WRITEBACK_WINDOW:
            # Start writing back what came in so far (DONTNEED does, for dirty pages):
            # the disk works during the copy, and the final fsync has little left; the
            # backup's pages also stop crowding the host's page cache.  Clusters are
            # appended, so the range since the last call is what is new (a cluster still
            # being written by another thread is only dirtied again).
            os.posix_fadvise(self._fd, self._advised, end - self._advised, os.POSIX_FADV_DONTNEED)
            self._advised = end

    # -- L2 tables ------------------------------------------------------------

    def _table(self, index: int) -> array[int]:
        table = self._tables.get(index)
        if table is not None:
            return table
        table = array("Q", bytes(CLUSTER))
        host = self._table_hosts.get(index)
        if host is not None:  # written out earlier: read it back
            table = array("Q", os.pread(self._fd, CLUSTER, host << CLUSTER_BITS))
            table.byteswap()
        if len(self._tables) >= TABLES_IN_MEMORY:
            self._write_table(min(self._tables))
        self._tables[index] = table
        return table

    def _entry(self, cluster: int) -> int:
        return self._table(cluster // L2_ENTRIES)[cluster % L2_ENTRIES]

    def _set(self, cluster: int, entry: int) -> None:
        self._table(cluster // L2_ENTRIES)[cluster % L2_ENTRIES] = entry

    def _write_table(self, index: int) -> None:
        table = self._tables.pop(index)
        if index not in self._table_hosts:
            self._table_hosts[index] = self._allocate(1)
        out = array("Q", table)
        out.byteswap()  # big-endian on disk
        self._pwrite(out.tobytes(), self._table_hosts[index] << CLUSTER_BITS)

    # -- finishing ------------------------------------------------------------

    def finish(self) -> None:
        """Write the tables, the refcounts and the header, and sync the file."""
        for host, data in self._packer.close():
            self._pwrite(data, host)
        for index in sorted(self._tables):
            table = self._tables[index]
            if any(table) or index in self._table_hosts:
                self._write_table(index)
        l1 = array("Q", [0] * self._l1_size)
        for index, host in self._table_hosts.items():
            l1[index] = host << CLUSTER_BITS | OFLAG_COPIED
        l1_clusters = -(-self._l1_size * 8 // CLUSTER)
        l1_host = self._allocate(l1_clusters)
        l1.byteswap()
        self._pwrite(l1.tobytes(), l1_host << CLUSTER_BITS)
        # Refcount blocks and the table for every cluster, themselves included.
        per_block = CLUSTER * 8 >> REFCOUNT_ORDER
        blocks = table_clusters = 0
        while True:
            total = self._next + blocks + table_clusters
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // CLUSTER)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        blocks_host = self._allocate(blocks)
        table_host = self._allocate(table_clusters)
        used = self._next
        refcounts = array("H", [1]) * used
        for host, count in self._packer.refs.items():
            refcounts[host] = count
        for block in range(blocks):
            counts = refcounts[block * per_block : (block + 1) * per_block]
            counts.extend([0] * (per_block - len(counts)))
            counts.byteswap()
            self._pwrite(counts.tobytes(), (blocks_host + block) << CLUSTER_BITS)
        refcount_table = array("Q", [(blocks_host + b) << CLUSTER_BITS for b in range(blocks)])
        refcount_table.byteswap()
        self._pwrite(refcount_table.tobytes(), table_host << CLUSTER_BITS)
        # The file must cover every allocated cluster, even a trailing sparse one.
        os.ftruncate(self._fd, max(os.fstat(self._fd).st_size, used << CLUSTER_BITS))
        os.fsync(self._fd)
        header = self._header(l1_host, self._l1_size, table_host, table_clusters)
        self._pwrite(header, 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.file_digest = self._file_digest(used)

    def _file_digest(self, clusters: int) -> str:
        """The format 2 file digest, from the digests of the clusters as written (a cluster
        never written reads as zeroes)."""
        unwritten = _zero_digest(CLUSTER)
        digests = (bytes(self._chunks[index * 32 : (index + 1) * 32]) for index in range(clusters))
        return chunks_digest(digest if any(digest) else unwritten for digest in digests)

    def _header(
        self, l1_host: int = 0, l1_size: int = 0, table_host: int = 0, table_clusters: int = 0
    ) -> bytes:
        extensions = b""
        backing = b""
        if self.backing is not None:
            name = self.backing_fmt.encode()
            extensions += struct.pack(">II", EXT_BACKING_FORMAT, len(name))
            extensions += name + bytes(-len(name) % 8)
            backing = self.backing.encode()
        extensions += struct.pack(">II", 0, 0)
        length, incompatible, tail = HEADER_LENGTH, 0, b""
        if self.compression is not None:
            length, tail = HEADER_LENGTH_COMPRESSED, bytes([TYPE_IDS[self.compression]]) + bytes(7)
            incompatible = INCOMPATIBLE_COMPRESSION if TYPE_IDS[self.compression] else 0
        backing_offset = length + len(extensions) if backing else 0
        header = struct.pack(
            ">IIQIIQIIQQIIQQQQII",
            MAGIC if l1_host else 0,  # no magic until the image is finished
            3,
            backing_offset,
            len(backing),
            CLUSTER_BITS,
            self.size,
            0,  # no encryption
            l1_size,
            l1_host << CLUSTER_BITS,
            table_host << CLUSTER_BITS,
            table_clusters,
            0,  # no snapshots
            0,
            incompatible,
            0,  # compatible features
            0,  # autoclear features
            REFCOUNT_ORDER,
            length,
        )
        out = header + tail + extensions + backing
        if len(out) > CLUSTER:
            raise ValueError(f"backing file name too long for one cluster: {self.backing!r}")
        return out

    def abandon(self) -> None:
        """Close and remove the unfinished image."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)


@functools.lru_cache(maxsize=4)
def _zero_digest(length: int) -> bytes:
    return blake3.blake3(bytes(length)).digest()
