"""Per-block digests of a disk's content at a backup's instant.

Block ``i`` covers bytes ``i * block_size`` up to ``min((i + 1) * block_size, size)``; its
digest is BLAKE2b (32 bytes) over exactly those bytes, so the last block may be short.
Blocks that read as zero are never read: their digest is computed once per length.

File format (``<backup-id>.digests``), little endian::

    b"QMPBDIG1"  u64 block_size  u64 size  then one 32-byte digest per block
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import struct
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import QmpBackupError
from ..files import atomic_write_bytes
from ..images.qemu_nbd import serve_image
from ..nbd import NBDClient

DIGEST_SIZE = 32
DEFAULT_BLOCK_SIZE = 1 << 20
_MAGIC = b"QMPBDIG1"
_HEADER = struct.Struct("<8sQQ")
_READ_BATCH = 16  # blocks per NBD read
_ZERO_FLAG = 2  # base:allocation: reads as zero


class DigestError(QmpBackupError):
    """Digests could not be computed, read or derived."""


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one block's bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes (computed once per length)."""
    return block_digest(bytes(length))


def block_count(size: int, block_size: int) -> int:
    """The number of blocks of a ``size``-byte disk."""
    return -(-size // block_size)


def block_length(index: int, size: int, block_size: int) -> int:
    """The length of block ``index`` of a ``size``-byte disk."""
    return min(block_size, size - index * block_size)


@dataclass(frozen=True)
class Digests:
    """The digests of every block of a ``size``-byte disk."""

    block_size: int
    size: int
    blocks: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.size < 0:
            raise DigestError(f"bad digests geometry {self.block_size}/{self.size}")
        if len(self.blocks) != block_count(self.size, self.block_size):
            raise DigestError(
                f"{len(self.blocks)} digests for {block_count(self.size, self.block_size)} blocks"
            )

    @classmethod
    def from_map(cls, block_size: int, size: int, digests: Mapping[int, bytes]) -> Digests:
        """Digests from a map holding every block index of the disk."""
        count = block_count(size, block_size)
        missing = [i for i in range(count) if i not in digests]
        if missing:
            raise DigestError(f"digests of {len(missing)} blocks missing (first {missing[0]})")
        return cls(block_size, size, tuple(digests[i] for i in range(count)))

    def save(self, path: Path) -> None:
        """Write to ``path`` atomically."""
        data = _HEADER.pack(_MAGIC, self.block_size, self.size) + b"".join(self.blocks)
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: Path) -> Digests:
        """Read a digests file."""
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            raise DigestError(f"{path}: truncated digests file")
        magic, block_size, size = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise DigestError(f"{path}: not a digests file")
        body = data[_HEADER.size :]
        if block_size <= 0 or len(body) != block_count(size, block_size) * DIGEST_SIZE:
            raise DigestError(f"{path}: digests file of the wrong length")
        blocks = tuple(body[i : i + DIGEST_SIZE] for i in range(0, len(body), DIGEST_SIZE))
        return cls(block_size, size, blocks)


def file_digest(path: Path) -> str:
    """BLAKE2b (hex) of a file's bytes: any change anywhere in the file shows."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def changed_blocks(dirty_extents: Iterable[tuple[int, int]], block_size: int) -> set[int]:
    """The indexes of the blocks that the ``(offset, length)`` extents touch."""
    blocks: set[int] = set()
    for offset, length in dirty_extents:
        if length > 0:
            blocks.update(range(offset // block_size, block_count(offset + length, block_size)))
    return blocks


def resized_blocks(old_size: int, new_size: int, block_size: int) -> set[int]:
    """Blocks whose digest a resize from ``old_size`` to ``new_size`` makes unknowable
    without reading: the one that held the old or new end, when that end is unaligned."""
    edge = min(old_size, new_size)
    if old_size == new_size or edge % block_size == 0:
        return set()
    return {edge // block_size}


def derive(parent: Digests, changed: Mapping[int, bytes], size: int) -> Digests:
    """The digests of a disk of ``size`` bytes that equals ``parent`` except in ``changed``.

    Blocks past the parent's end read as zero. ``changed`` must hold every block from
    :func:`resized_blocks`.
    """
    bs = parent.block_size
    count = block_count(size, bs)
    stray = [i for i in changed if not 0 <= i < count]
    if stray:
        raise DigestError(f"changed block {stray[0]} is beyond the disk's {count} blocks")
    missing = resized_blocks(parent.size, size, bs) - set(changed)
    if missing:
        raise DigestError(f"block {min(missing)} changed with the disk size: it must be read")
    known = block_count(parent.size, bs)
    blocks: list[bytes] = []
    for i in range(count):
        if i in changed:
            blocks.append(changed[i])
        elif i < known:
            blocks.append(parent.blocks[i])
        else:
            blocks.append(zero_digest(block_length(i, size, bs)))
    return Digests(bs, size, tuple(blocks))


def compare(expected: Digests, actual: Digests) -> list[int]:
    """Indexes of the blocks whose digests differ (blocks present in one only included)."""
    if expected.block_size != actual.block_size:
        raise DigestError(
            f"cannot compare digests of {expected.block_size} and {actual.block_size}-byte blocks"
        )
    longest = max(len(expected.blocks), len(actual.blocks))
    return [
        i
        for i in range(longest)
        if i >= len(expected.blocks)
        or i >= len(actual.blocks)
        or expected.blocks[i] != actual.blocks[i]
    ]


class _ZeroRanges:
    """Block ranges that read as zero, from ``base:allocation`` extents."""

    def __init__(self, client: NBDClient, size: int, block_size: int) -> None:
        self.starts: list[int] = []
        self.stops: list[int] = []
        if "base:allocation" not in client.contexts:
            return
        for extent in client.extents("base:allocation", 0, size):
            if not extent.flags & _ZERO_FLAG:
                continue
            first = block_count(extent.offset, block_size)
            end = min(extent.end, size)
            last = block_count(end, block_size) if end == size else end // block_size
            if first < last:
                self.starts.append(first)
                self.stops.append(last)

    def __contains__(self, index: int) -> bool:
        pos = bisect_right(self.starts, index) - 1
        return pos >= 0 and index < self.stops[pos]


def _runs(indexes: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs ``(first, count)`` of sorted ``indexes``, at most ``limit`` long."""
    start = prev = -2
    for i in indexes:
        if i == prev + 1 and i - start < limit:
            prev = i
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = i
    if start >= 0:
        yield start, prev - start + 1


def digest_client(
    client: NBDClient,
    size: int,
    blocks: Iterable[int] | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[int, bytes]:
    """Digests of ``blocks`` (default: all) of the first ``size`` bytes of an export."""
    if size > client.size:
        raise DigestError(f"export {client.address} has {client.size} bytes, not {size}")
    count = block_count(size, block_size)
    wanted = sorted(set(range(count) if blocks is None else blocks))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < count:
        raise DigestError(f"blocks {wanted[0]}..{wanted[-1]} outside the disk's {count} blocks")
    zeroes = _ZeroRanges(client, size, block_size)
    result: dict[int, bytes] = {}
    to_read: list[int] = []
    for i in wanted:
        if i in zeroes:
            result[i] = zero_digest(block_length(i, size, block_size))
        else:
            to_read.append(i)
    buf = bytearray(_READ_BATCH * block_size)
    for first, n in _runs(to_read, _READ_BATCH):
        offset = first * block_size
        length = min(n * block_size, size - offset)
        view = memoryview(buf)[:length]
        client.readinto(view, offset)
        for k in range(n):
            result[first + k] = block_digest(view[k * block_size : (k + 1) * block_size])
    return result


@contextlib.contextmanager
def open_source(
    source: Path | str, *, fmt: str = "qcow2", connections: int = 4
) -> Iterator[NBDClient]:
    """An NBD client on a local image (served read-only by ``qemu-nbd``) or on an
    ``nbd://``/``nbd+unix://`` URI, with ``base:allocation`` negotiated."""
    with contextlib.ExitStack() as stack:
        text = str(source)
        uri = text if text.startswith("nbd") else stack.enter_context(serve_image(Path(text), fmt))
        client = NBDClient.connect(uri, connections=connections, meta_contexts=["base:allocation"])
        with client:
            yield client


def digest_image(
    source: Path | str,
    size: int | None = None,
    blocks: Iterable[int] | None = None,
    *,
    fmt: str = "qcow2",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[int, bytes]:
    """Digests of ``blocks`` (default: all) of the first ``size`` bytes (default: all) of a
    local image with its backing chain, or of an ``nbd://``/``nbd+unix://`` export."""
    with open_source(source, fmt=fmt) as client:
        return digest_client(
            client, client.size if size is None else size, blocks, block_size=block_size
        )


def digest_all(
    source: Path | str,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Digests:
    """The :class:`Digests` of the first ``size`` bytes (default: all) of an image or export."""
    with open_source(source, fmt=fmt) as client:
        size = client.size if size is None else size
        return Digests.from_map(
            block_size, size, digest_client(client, size, block_size=block_size)
        )
