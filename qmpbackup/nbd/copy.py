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


# (request, buffer) from a source reader when a read is complete; (length, error) from the
# sink when a store is.
_Event = tuple[Request, memoryview] | tuple[int, NBDError | None]


class _Copy:
    """One run of copy_ranges: the buffer pool, the reads and stores in flight, the bytes
    copied and the first failure.

    After a failure no more reads are issued; what is in flight is drained, then the
    failure is raised. This is the hot path of pull backups: the methods keep in locals
    what they look up more than once.
    """

    __slots__ = (
        "allocated",
        "block",
        "chunks",
        "copied",
        "events",
        "exhausted",
        "failure",
        "free",
        "on_progress",
        "pool_size",
        "put",
        "reads",
        "sink",
        "src",
        "step",
        "stores",
    )

    def __init__(
        self,
        src: NBDClient,
        sink: Sink,
        chunks: Iterator[tuple[int, int]],
        step: int,
        block: int,
        pool_size: int,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.src = src
        self.sink = sink
        self.chunks = chunks
        self.step = step  # the size of a pooled buffer
        self.block = block
        self.pool_size = pool_size
        self.on_progress = on_progress
        self.free: list[memoryview] = []
        self.allocated = 0
        self.reads = self.stores = self.copied = 0
        self.failure: BaseException | None = None
        self.exhausted = False
        self.events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self.put = self.events.put

    def run(self) -> int:
        """Issue reads and handle completions until nothing is in flight; return the bytes
        copied, or raise the first failure."""
        get = self.events.get
        issue_reads, read_complete = self._issue_reads, self._read_complete
        store_complete = self._store_complete
        issue_reads()
        while self.reads or self.stores:
            event = get()
            if isinstance(event[0], Request):
                req, buf = event
                read_complete(req, buf)
                # Only a completed read frees a buffer, so only now can another read start.
                issue_reads()
            else:
                length, error = event
                store_complete(length, error)
        failure = self.failure
        if failure is not None:
            if isinstance(failure, NBDError):
                raise NBDError(str(failure))
            raise failure
        return self.copied

    def _issue_reads(self) -> None:
        """Keep the source connections busy: a read for every free buffer, and for every
        one the pool may still allocate, until the ranges run out or something failed."""
        free, step = self.free, self.step
        while (
            self.failure is None
            and not self.exhausted
            and (free or self.allocated < self.pool_size)
        ):
            try:
                chunk = next(self.chunks, None)
            except NBDError as exc:
                self.failure = exc
                return
            if chunk is None:
                self.exhausted = True
                return
            offset, length = chunk
            if length > step:
                buf = memoryview(bytearray(length))  # the first request only; not pooled
            elif free:
                buf = free.pop()
            else:
                buf = memoryview(bytearray(step))
                self.allocated += 1
            src = self.src
            try:
                src.read_connection().submit(
                    p.CMD_READ,
                    offset,
                    length,
                    flags=src.read_flags,
                    buf=buf[:length],
                    callback=self._read_callback(buf),
                )
            except NBDError as exc:
                self.failure = exc
                if len(buf) == step:
                    free.append(buf)
                return
            self.reads += 1

    def _read_callback(self, buf: memoryview) -> Callable[[Request], None]:
        """What a source reader calls when the read into ``buf`` is complete."""
        put = self.put
        return lambda req: put((req, buf))

    def _store_callback(self, length: int) -> Done:
        """What the sink calls when it has stored ``length`` bytes (or failed to)."""
        put = self.put
        return lambda error: put((length, error))

    def _read_complete(self, req: Request, buf: memoryview) -> None:
        """Hand a completed read to the sink, zero runs as ``sink.zero``, and give its
        buffer back to the pool (the sink does not keep the data)."""
        self.reads -= 1
        if self.failure is None and req.error is not None:
            self.failure = req.error
        if self.failure is None:
            sink, offset, stored = self.sink, req.offset, self._store_callback
            data = buf[: req.length]
            try:
                # A read made only of holes is zero without looking at it.
                runs = [(0, req.length, True)] if not req.data else _zero_runs(data, self.block)
                for start, length, zero in runs:
                    done = stored(length)
                    if zero:
                        sink.zero(offset + start, length, done)
                    else:
                        sink.write(offset + start, data[start : start + length], done)
                    self.stores += 1
            except NBDError as exc:
                self.failure = exc
        if len(buf) == self.step:
            self.free.append(buf)

    def _store_complete(self, length: int, error: NBDError | None) -> None:
        """Count a completed store and report progress, or record its error."""
        self.stores -= 1
        if error is not None:
            self.failure = self.failure or error
        elif self.failure is None:
            self.copied += length
            if self.on_progress is not None:
                try:
                    self.on_progress(self.copied)
                except BaseException as exc:
                    self.failure = exc


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
    return _Copy(src, sink, chunks, step, block, in_flight * src.connections, on_progress).run()
