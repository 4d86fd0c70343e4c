"""Per-block digests read through NBD: from an export, or from a local image (with its
backing chain) that ``qemu-nbd`` serves read-only.

Blocks that read as zeroes (``base:allocation``) are never read. This is how format 1
records are checked, and how any image is read that this process cannot read itself.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .digests import (
    Algorithm,
    DigestError,
    Digests,
    block_count,
    block_digest,
    block_length,
    zero_digest,
)

if TYPE_CHECKING:
    from ..nbd import NBDClient

_READ_BYTES = 16 << 20  # at most, per NBD read
_ZERO_FLAG = 2  # base:allocation: reads as zero


class _ZeroRanges:
    """Block ranges that read as zero, and the blocks that may not, from
    ``base:allocation`` extents."""

    def __init__(self, client: NBDClient, size: int, block_size: int) -> None:
        self.starts: list[int] = []
        self.stops: list[int] = []
        self.count = block_count(size, block_size)
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

    def others(self) -> Iterator[int]:
        """The blocks not known to read as zeroes, in order, zero ranges skipped whole."""
        pos = 0
        for start, stop in zip([*self.starts, self.count], [*self.stops, self.count], strict=True):
            yield from range(pos, start)
            pos = stop


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
    block_size: int,
    algorithm: Algorithm,
) -> dict[int, bytes]:
    """Digests of ``blocks`` of the first ``size`` bytes of an export (zero blocks among
    them included); by default, of every block not known to read as zeroes (the work
    follows the data, not the size). DigestError for blocks outside the disk, NBDError
    if a read fails."""
    if size > client.size:
        raise DigestError(f"export {client.address} has {client.size} bytes, not {size}")
    count = block_count(size, block_size)
    zeroes = _ZeroRanges(client, size, block_size)
    wanted = list(zeroes.others()) if blocks is None else sorted(set(blocks))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < count:
        raise DigestError(f"blocks {wanted[0]}..{wanted[-1]} outside the disk's {count} blocks")
    result: dict[int, bytes] = {}
    to_read: list[int] = []
    for i in wanted:
        if i in zeroes:
            result[i] = zero_digest(block_length(i, size, block_size), algorithm)
        else:
            to_read.append(i)
    batch = max(1, _READ_BYTES // block_size)
    buf = bytearray(batch * block_size)
    for first, n in _runs(to_read, batch):
        offset = first * block_size
        length = min(n * block_size, size - offset)
        view = memoryview(buf)[:length]
        client.readinto(view, offset)
        for k in range(n):
            result[first + k] = block_digest(view[k * block_size : (k + 1) * block_size], algorithm)
    return result


@contextlib.contextmanager
def open_source(
    source: Path | str, *, fmt: str = "qcow2", connections: int = 4
) -> Iterator[NBDClient]:
    """An NBD client on a local image (served read-only by ``qemu-nbd``) or on an
    ``nbd://``/``nbd+unix://`` URI, with ``base:allocation`` negotiated."""
    with contextlib.ExitStack() as stack:
        # Imported here: format 2 records are read from the files, not through NBD.
        from ..images.qemu_nbd import serve_image
        from ..nbd import NBDClient

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
    block_size: int,
    algorithm: Algorithm,
) -> dict[int, bytes]:
    """Digests of ``blocks`` (default: all) of the first ``size`` bytes (default: all) of a
    local image with its backing chain, or of an ``nbd://``/``nbd+unix://`` export."""
    with open_source(source, fmt=fmt) as client:
        return digest_client(
            client,
            client.size if size is None else size,
            blocks,
            block_size=block_size,
            algorithm=algorithm,
        )


def digest_all(
    source: Path | str,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    block_size: int,
    algorithm: Algorithm,
) -> Digests:
    """The :class:`Digests` of the first ``size`` bytes (default: all) of an image or export."""
    with open_source(source, fmt=fmt) as client:
        size = client.size if size is None else size
        found = digest_client(client, size, block_size=block_size, algorithm=algorithm)
        return Digests.from_map(block_size, size, algorithm, found)
