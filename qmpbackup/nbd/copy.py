"""Pipelined copy of ranges from an export to a sink, with a fixed pool of buffers.

The calling thread schedules: it keeps every source connection busy with reads into free
buffers, and when a read completes (reported by that connection's reader thread) it hands
the buffer to the sink. The buffer goes back to the pool when the sink says its stores
are done: an NBD sink at once (NBD does not need the data once it is on the wire), a
file sink once its threads have written it. Memory is the pool and nothing else.
"""

from __future__ import annotations

import itertools
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
    """Where copied data goes. Both methods may return before the data is stored; ``data``
    stays untouched until ``done`` is called, exactly once per call, from any thread."""

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


class _Read:
    """One read of the copy, sent in parts of at most the server's largest request (64 KiB
    on QEMU 7.2's read-splitting view); the last part in reports the whole read, so
    the scheduler handles it once, whatever the server's limit."""

    __slots__ = ("buf", "data", "error", "length", "offset", "parts", "put", "seen")

    def __init__(
        self, offset: int, length: int, parts: int, buf: memoryview, put: Callable[..., None]
    ) -> None:
        self.offset, self.length, self.parts, self.buf, self.put = offset, length, parts, buf, put
        self.data = False
        self.error: NBDError | None = None
        self.seen = itertools.count(1)  # next() is atomic: the reader threads share it

    def part_done(self, req: Request) -> None:
        """A part's reply is complete (on a reader thread)."""
        if req.error is not None and self.error is None:
            self.error = req.error
        if req.data:
            self.data = True
        if next(self.seen) == self.parts:
            self.put((self, self.buf))


# (read, buffer) from a source reader when a read is complete; (length, error, buffer)
# from the sink when a store is.
_Event = tuple[_Read, memoryview] | tuple[int, NBDError | None, memoryview]


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
        "pending",
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
        self.pending: dict[int, int] = {}  # id of a buffer -> its stores not yet done
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
            if len(event) == 2:
                read, buf = event
                read_complete(read, buf)
            else:
                length, error, buf = event
                store_complete(length, error, buf)
            # Either may have given a buffer back: another read can start.
            issue_reads()
        failure = self.failure
        if failure is not None:
            if isinstance(failure, NBDError):
                raise NBDError(str(failure))
            raise failure
        if not self.exhausted:
            raise NBDError("nbd: copy stopped before its last range")  # never, unless a bug
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
            if not self._submit(offset, length, buf):
                if len(buf) == step:
                    free.append(buf)
                return
            self.reads += 1

    def _submit(self, offset: int, length: int, buf: memoryview) -> bool:
        """Send the read of ``length`` bytes at ``offset`` into ``buf``, in parts the
        server takes; False (the failure recorded) if not one part could be sent."""
        src = self.src
        part = src.max_block - src.max_block % src.min_block
        parts = -(-length // part)
        read = _Read(offset, length, parts, buf, self.put)
        for k in range(parts):
            start = k * part
            n = min(part, length - start)
            try:
                src.read_connection().submit(
                    p.CMD_READ,
                    offset + start,
                    n,
                    flags=src.read_flags,
                    buf=buf[start : start + n],
                    callback=read.part_done,
                )
            except NBDError as exc:
                self.failure = exc
                if k == 0:
                    return False
                # The parts sent still report; count the others in as failed.
                for rest in range(k, parts):
                    lost = Request(p.CMD_READ, offset + rest * part, 0, None, 0, None)
                    lost.error = exc
                    read.part_done(lost)
                return True
        return True

    def _store_callback(self, length: int, buf: memoryview) -> Done:
        """What the sink calls when it has stored ``length`` bytes of ``buf`` (or failed)."""
        put = self.put
        return lambda error: put((length, error, buf))

    def _read_complete(self, req: _Read, buf: memoryview) -> None:
        """Hand a completed read to the sink, zero runs as ``sink.zero``; its buffer goes
        back to the pool once the sink has done with it."""
        self.reads -= 1
        if self.failure is None and req.error is not None:
            self.failure = req.error
        issued = total = 0
        if self.failure is None:
            sink, offset, stored = self.sink, req.offset, self._store_callback
            data = buf[: req.length]
            try:
                # A read made only of holes is zero without looking at it.
                runs = [(0, req.length, True)] if not req.data else _zero_runs(data, self.block)
                total = len(runs)
                self.pending[id(buf)] = total
                for start, length, zero in runs:
                    done = stored(length, buf)
                    if zero:
                        sink.zero(offset + start, length, done)
                    else:
                        sink.write(offset + start, data[start : start + length], done)
                    issued += 1
                    self.stores += 1
            except NBDError as exc:
                self.failure = exc
        # Completions are handled on this thread, after this: the count can still change.
        if not issued:
            self.pending.pop(id(buf), None)
            self._give_back(buf)
        elif issued < total:
            self.pending[id(buf)] = issued

    def _give_back(self, buf: memoryview) -> None:
        if len(buf) == self.step:
            self.free.append(buf)

    def _store_complete(self, length: int, error: NBDError | None, buf: memoryview) -> None:
        """Count a completed store and report progress, or record its error; the last
        store of a buffer gives it back."""
        self.stores -= 1
        left = self.pending[id(buf)] - 1
        if left:
            self.pending[id(buf)] = left
        else:
            del self.pending[id(buf)]
            self._give_back(buf)
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
    # A read larger than the server takes is sent in parts (see _Read).
    largest = sink.max_request
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
