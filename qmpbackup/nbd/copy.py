"""Pipelined copy of ranges from an export to a sink, with a fixed pool of buffers.

The calling thread schedules: it keeps every source connection busy with reads into free
buffers, and when a read completes (reported by that connection's reader thread) it hands
the buffer to the sink, which sends it and gives it back at once: NBD does not need the
data once it is on the wire, so memory is the pool and nothing else.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from . import protocol as p
from .client import NBDClient
from .connection import Request
from .errors import NBDError
from .zeroes import is_zero

Done = Callable[[NBDError | None], None]


class Sink(Protocol):
    """Where copied data goes. Both methods may return before the data is stored, but
    must not keep ``data``; ``done`` is called exactly once per call, from any thread."""

    size: int
    max_request: int
    block: int

    def write(self, offset: int, data: memoryview, done: Done) -> None:
        """Store ``data`` at ``offset``."""
        ...

    def zero(self, offset: int, length: int, done: Done) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes."""
        ...


class NBDSink:
    """Another NBD export as a sink: WRITE and WRITE_ZEROES on its write connections.

    With ``skip_zeroes`` (a new, empty image) zero blocks are not written at all. Flush
    ``dest`` after the copy.
    """

    def __init__(self, dest: NBDClient, skip_zeroes: bool = False) -> None:
        if dest.read_only:
            raise NBDError(f"nbd: export {dest.export!r} is read-only")
        self.dest = dest
        self.size = dest.size
        self.max_request = dest.max_block
        self.block = dest.min_block
        self._zeroes = bool(dest.flags & p.FLAG_SEND_WRITE_ZEROES)
        # A new image already reads as zeroes: writing them would only allocate.
        self._skip_zeroes = skip_zeroes

    def write(self, offset: int, data: memoryview, done: Done) -> None:
        self.dest.write_connection().submit(
            p.CMD_WRITE, offset, len(data), payload=data, callback=lambda r: done(r.error)
        )

    def zero(self, offset: int, length: int, done: Done) -> None:
        if self._skip_zeroes:
            done(None)
            return
        if not self._zeroes:
            self.dest.write_zeroes(offset, length)
            done(None)
            return
        self.dest.write_connection().submit(
            p.CMD_WRITE_ZEROES, offset, length, callback=lambda r: done(r.error)
        )


class NullSink:
    """Discards everything (benchmarks)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.max_request = p.DEFAULT_MAX_BLOCK
        self.block = 1

    def write(self, offset: int, data: memoryview, done: Done) -> None:
        done(None)

    def zero(self, offset: int, length: int, done: Done) -> None:
        done(None)


def _chunks(
    ranges: Iterable[tuple[int, int]], step: int, first: int, limit: int
) -> Iterator[tuple[int, int]]:
    """Requests of ``step`` bytes, except the very first, of up to ``first`` bytes."""
    size = first
    for offset, length in ranges:
        if offset < 0 or length < 0 or offset + length > limit:
            raise NBDError(f"nbd: copy range {offset}+{length} is outside the exports")
        pos, end = offset, offset + length
        while pos < end:
            n = min(size, end - pos)
            yield pos, n
            pos += n
            size = step


# Size of the first read of a copy (see copy_ranges): larger than the requests after it,
# and below glibc's 32 MiB ceiling for its mmap threshold.
_FIRST_REQUEST = 16 << 20

# Zeroes are looked for in blocks of this size, so zero clusters next to data stay sparse.
ZERO_BLOCK = 64 * 1024


def _zero_runs(data: memoryview, align: int) -> list[tuple[int, int, bool]]:
    """``data`` as runs of (start, length, all-zero), in blocks of ZERO_BLOCK."""
    if is_zero(data):
        return [(0, len(data), True)]
    size = max(ZERO_BLOCK, align)
    runs: list[tuple[int, int, bool]] = []
    for start in range(0, len(data), size):
        length = min(size, len(data) - start)
        zero = is_zero(data[start : start + length])
        if runs and runs[-1][2] == zero:
            first, previous, _ = runs[-1]
            runs[-1] = (first, previous + length, zero)
        else:
            runs.append((start, length, zero))
    return runs


def copy_ranges(
    src: NBDClient,
    sink: Sink,
    ranges: Iterable[tuple[int, int]],
    *,
    request_size: int,
    in_flight: int,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Copy ``(offset, length)`` ranges of ``src`` to the same offsets of ``sink``.

    Reads run on every connection of ``src``, ``in_flight`` requests of at most
    ``request_size`` bytes each, into ``in_flight`` buffers per connection (the only
    memory used). All-zero data goes to ``sink.zero``. ``on_progress`` gets the bytes
    copied so far after each store completes. Returns the bytes copied; nothing is flushed.
    """
    if in_flight < 1 or request_size < 1:
        raise NBDError("nbd: copy needs at least one request of at least one byte")
    block = max(src.min_block, sink.block)
    largest = min(src.max_block, sink.max_request)
    step = min(request_size, largest)
    step = max(block, step - step % block)
    # QEMU gets each request's buffer from posix_memalign, and glibc maps fresh pages for
    # every one of them (page faults on the whole buffer) until it has freed a mapping
    # larger than the request, which raises its mmap threshold. One larger first request
    # does that on both servers; it measured 2x less QEMU CPU per byte, 2x the throughput.
    first = min(largest, _FIRST_REQUEST)
    first = max(step, first - first % step)
    chunks = _chunks(ranges, step, first, min(src.size, sink.size))
    pool_size = in_flight * src.connections
    free: list[memoryview] = []
    allocated = 0
    # (request, buffer) from source readers when a read is complete; (length, error) from
    # the sink when a store is.
    events: queue.SimpleQueue[tuple[Request, memoryview] | tuple[int, NBDError | None]]
    events = queue.SimpleQueue()
    reads = stores = copied = 0
    failure: BaseException | None = None
    exhausted = False

    def read_done(buf: memoryview) -> Callable[[Request], None]:
        return lambda req: events.put((req, buf))

    def stored(length: int) -> Done:
        return lambda error: events.put((length, error))

    while True:
        while failure is None and not exhausted and (free or allocated < pool_size):
            try:
                chunk = next(chunks, None)
            except NBDError as exc:
                failure = exc
                break
            if chunk is None:
                exhausted = True
                break
            offset, length = chunk
            if length > step:
                buf = memoryview(bytearray(length))  # the first request only; not pooled
            elif free:
                buf = free.pop()
            else:
                buf = memoryview(bytearray(step))
                allocated += 1
            try:
                src.read_connection().submit(
                    p.CMD_READ,
                    offset,
                    length,
                    flags=src.read_flags,
                    buf=buf[:length],
                    callback=read_done(buf),
                )
            except NBDError as exc:
                failure = exc
                if len(buf) == step:
                    free.append(buf)
                break
            reads += 1
        if reads == 0 and stores == 0:
            break
        event = events.get()
        if isinstance(event[0], Request):
            reads -= 1
            req, buf = event
            if failure is None and req.error is not None:
                failure = req.error
            if failure is None:
                data = buf[: req.length]
                try:
                    # A read made only of holes is zero without looking at it.
                    runs = [(0, req.length, True)] if not req.data else _zero_runs(data, block)
                    for start, length, zero in runs:
                        done = stored(length)
                        if zero:
                            sink.zero(req.offset + start, length, done)
                        else:
                            sink.write(req.offset + start, data[start : start + length], done)
                        stores += 1
                except NBDError as exc:
                    failure = exc
            if len(buf) == step:
                free.append(buf)
        else:
            stores -= 1
            length, error = event
            if error is not None:
                failure = failure or error
            elif failure is None:
                copied += length
                if on_progress is not None:
                    try:
                        on_progress(copied)
                    except BaseException as exc:
                        failure = exc
    if failure is not None:
        if isinstance(failure, NBDError):
            raise NBDError(str(failure))
        raise failure
    return copied
