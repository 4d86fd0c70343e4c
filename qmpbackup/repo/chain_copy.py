"""A backup chain copied into one standalone image by this process, every block checked
against the digests of the instant on its way through.

Each file of the chain is mapped (:func:`qmpbackup.images.qcow2_reader.read_map`); each
guest cluster is read from the topmost file that holds it, where its data lies, in runs
of up to 4 MiB, on two threads; a compressed cluster is decompressed on the way. A
cluster is hashed from the bytes read, compared with its recorded digest, and written;
blocks the chain leaves as zeroes must be zero in the record. One read of the data,
nothing read back: the restore's check costs a hash.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import blake3

from ..files import pwrite_all
from ..images.qcow2_compressed import BadCompressedCluster, Compression
from ..images.qcow2_reader import (
    UNDECODABLE,
    Qcow2Map,
    Qcow2Unsupported,
    Runs,
    read_into,
    read_map,
)
from ..images.qcow2_writer import Qcow2Writer
from .digests import Digests, zero_digest

_RUN = 64  # clusters per read: 4 MiB
_THREADS = 2


@dataclass(frozen=True)
class ChainCopy:
    """What :func:`copy_chain` wrote and checked: the blocks checked, the blocks that did
    not match (sorted), and for a qcow2 image its format 2 file digest."""

    blocks_checked: int
    bad: list[int]
    file_digest: str | None


def _linked(layers: list[Qcow2Map]) -> list[Qcow2Map]:
    """The layers the top file's backing links really go through (a file made
    standalone ends them); Qcow2Unsupported where a link names another file."""
    for k in range(len(layers) - 1, -1, -1):
        name = layers[k].backing
        if name is None:
            return layers[k:]
        below = (layers[k].path.parent / name).resolve()
        if k == 0 or below != layers[k - 1].path.resolve():
            raise Qcow2Unsupported(f"{layers[k].path}: backing file {name} is not the record's")
    raise AssertionError("unreachable")


# Where a guest cluster's data lies: (layer, host offset, compressed bytes to read or 0).
Place = tuple[int, int, int]


def _resolve(layers: Sequence[Qcow2Map]) -> dict[int, Place]:
    """Guest cluster -> where the data the chain shows lies, top first."""
    found: dict[int, Place] = {}
    above: list[Runs] = []  # the zero clusters of the layers above, which hide the data
    size = layers[-1].size
    for k in range(len(layers) - 1, -1, -1):
        layer = layers[k]
        limit = -(-min(size, layer.size) // layer.cluster_size)
        held = [(g, (k, host, 0)) for g, host in layer.data.items()]
        held += [(g, (k, host, n)) for g, (host, n) in layer.compressed.items()]
        for guest, place in held:
            if guest < limit and guest not in found and not any(guest in z for z in above):
                found[guest] = place
        if layer.zero:
            above.append(layer.zero)
    return found


@dataclass(frozen=True)
class _Run:
    """Guest clusters ``first`` on, from one layer: plain ones, ``count`` of them, at
    ``host``; or compressed ones (``packed``: host offset and length of each), read
    from ``host`` in one piece of ``length`` bytes."""

    first: int
    layer: int
    host: int
    count: int
    length: int
    packed: tuple[tuple[int, int], ...] = ()


def _runs(found: dict[int, Place], cluster: int) -> Iterator[_Run]:
    """Contiguous reads of up to :data:`_RUN` clusters, plain or compressed."""
    run: _Run | None = None
    for guest in sorted(found):
        layer, host, packed = found[guest]
        if run is not None and guest == run.first + run.count and layer == run.layer:
            if not packed and not run.packed and host == run.host + run.length:
                if run.count < _RUN:
                    run = _Run(run.first, layer, run.host, run.count + 1, run.length + cluster)
                    continue
            elif packed and run.packed and run.host <= host <= run.host + run.length:
                end = max(run.host + run.length, host + packed)
                if end - run.host <= _RUN * cluster:
                    places = (*run.packed, (host, packed))
                    run = _Run(run.first, layer, run.host, run.count + 1, end - run.host, places)
                    continue
        if run is not None:
            yield run
        run = _Run(guest, layer, host, 1, packed or cluster, ((host, packed),) if packed else ())
    if run is not None:
        yield run


def _pieces(
    run: _Run, data: memoryview, layer: Qcow2Map, size: int
) -> list[memoryview | bytes | None]:
    """Each guest cluster of ``run`` as the disk holds it, from the bytes read; None for a
    compressed one that does not decode."""
    cluster = layer.cluster_size
    length = min(run.count * cluster, size - run.first * cluster)
    if not run.packed:
        if len(data) < length:
            raise Qcow2Unsupported(f"{layer.path}: data past the end of the file")
        return [data[k * cluster : min((k + 1) * cluster, length)] for k in range(run.count)]
    pieces: list[memoryview | bytes | None] = []
    for k, (host, n) in enumerate(run.packed):
        try:
            whole = layer.unpack(run.first + k, data[host - run.host : host - run.host + n])
            pieces.append(whole[: min(cluster, length - k * cluster)])
        except BadCompressedCluster:
            pieces.append(None)
    return pieces


class Sink(Protocol):
    """Where a copy goes; it takes writes from any thread. ``reads_zero``: what is not
    written reads as zeroes (else every zero range is given to :meth:`zero`)."""

    reads_zero: bool

    def write(self, offset: int, data: memoryview | bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> str | None: ...

    def abandon(self) -> None: ...


class _Output:
    """The new image, raw or qcow2 (through the writer); either takes writes from any
    thread."""

    reads_zero = True

    def __init__(
        self, dest: Path, fmt: Literal["qcow2", "raw"], size: int, compression: Compression | None
    ) -> None:
        self.writer: Qcow2Writer | None = None
        self.fd = -1
        if fmt == "qcow2":
            dest.unlink(missing_ok=True)
            self.writer = Qcow2Writer(dest, size, compression=compression)
        else:
            self.fd = os.open(dest, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            os.ftruncate(self.fd, size)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        if self.writer is None:
            pwrite_all(self.fd, data, offset)
        else:
            self.writer.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` read as zeroes (in a new raw file they do)."""
        if self.writer is not None:
            self.writer.zero(offset, length)

    def finish(self) -> str | None:
        if self.writer is None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            return None
        self.writer.finish()
        return self.writer.file_digest

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.abandon()
        elif self.fd >= 0:
            os.close(self.fd)


def _store(
    out: Sink,
    offset: int,
    pieces: list[memoryview | bytes | None],
    digests: list[bytes],
    plain: memoryview | None,
    cluster: int,
) -> None:
    """Write consecutive guest clusters from ``offset`` on, as read (``plain``: all of
    them in one buffer, when read uncompressed). Clusters of zeroes are not written: the
    new image reads them as zeroes already (as qemu-img convert keeps them sparse), and
    their digest proves it. One that did not decode is left out: its digest fails."""
    kinds = [
        "bad" if p is None else "zero" if d == zero_digest(len(p), "blake3") else "data"
        for p, d in zip(pieces, digests, strict=True)
    ]
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + (len(piece) if piece is not None else cluster))
    k = 0
    while k < len(pieces):
        j = next((i for i in range(k, len(pieces)) if kinds[i] != kinds[k]), len(pieces))
        at, length = offset + starts[k], starts[j] - starts[k]
        if kinds[k] == "zero":
            out.zero(at, length)
        elif kinds[k] == "data":
            group = [p for p in pieces[k:j] if p is not None]
            out.write(at, plain[starts[k] : starts[j]] if plain is not None else b"".join(group))
        k = j


def _holes(found: dict[int, Place], count: int) -> Iterator[tuple[int, int]]:
    """Runs ``(first, n)`` of the clusters no layer holds."""
    start = 0
    for guest in [*sorted(found), count]:
        if guest > start:
            yield start, guest - start
        start = guest + 1


def copy_chain(
    chain: Sequence[Path],
    dest: Path,
    fmt: Literal["qcow2", "raw"],
    expected: Digests,
    compression: Compression | None = None,
) -> ChainCopy:
    """Write the content of ``chain`` (base first) into ``dest`` (an existing empty file,
    replaced) as a standalone ``fmt`` image, checking every block against ``expected``;
    a qcow2 image with ``compression`` holds compressed clusters.

    Raises Qcow2Unsupported (before writing anything) for files this process does not
    read, or for digests other than BLAKE3 of 64 KiB clusters; OSError on I/O failure.
    """
    return copy_chain_into(chain, expected, lambda: _Output(dest, fmt, expected.size, compression))


def copy_chain_into(
    chain: Sequence[Path], expected: Digests, open_sink: Callable[[], Sink]
) -> ChainCopy:
    """Write the content of ``chain`` (base first) into the sink ``open_sink`` opens once
    the chain is known to be readable, checking every block against ``expected``.

    Raises what :func:`copy_chain` raises.
    """
    layers = _linked([read_map(path) for path in chain])
    cluster = layers[-1].cluster_size
    if expected.algorithm != "blake3" or expected.block_size != cluster:
        raise Qcow2Unsupported("the digests are not per-cluster BLAKE3")
    if any(layer.cluster_size != cluster for layer in layers):
        raise Qcow2Unsupported("the chain's files have different cluster sizes")
    size = expected.size
    found = _resolve(layers)
    out = open_sink()
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(layer.path, "rb", buffering=0)) for layer in layers]
        fds = [handle.fileno() for handle in files]

        local = threading.local()

        def copy(run: _Run) -> list[int]:
            # One buffer per thread, reused: a new one per read costs a page fault per
            # 4 KiB (0.3 s of system time per GiB); the write below is done before return.
            if not hasattr(local, "buffer"):
                # Page-aligned (mmap), so that a sink can write its clusters with O_DIRECT.
                local.buffer = mmap.mmap(-1, _RUN * cluster)
            data = read_into(fds[run.layer], local.buffer, run.length, run.host)
            pieces = _pieces(run, data, layers[run.layer], size)
            digests = [UNDECODABLE if p is None else blake3.blake3(p).digest() for p in pieces]
            plain = None if run.packed else data
            _store(out, run.first * cluster, pieces, digests, plain, cluster)
            return [
                run.first + k for k, d in enumerate(digests) if d != expected.get(run.first + k)
            ]

        try:
            if not out.reads_zero:
                for first, n in _holes(found, -(-size // cluster)):
                    out.zero(first * cluster, min(n * cluster, size - first * cluster))
            with ThreadPoolExecutor(_THREADS, thread_name_prefix="qmpbackup-restore") as pool:
                bad = [i for found_bad in pool.map(copy, _runs(found, cluster)) for i in found_bad]
            whole = out.finish()
        except BaseException:
            out.abandon()
            raise
    bad += [i for i in expected.indexes if i not in found]
    return ChainCopy(blocks_checked=expected.count, bad=sorted(set(bad)), file_digest=whole)
