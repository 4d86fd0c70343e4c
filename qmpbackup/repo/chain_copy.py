"""A backup chain copied into one standalone image by this process, every block checked
against the digests of the instant on its way through.

Each file of the chain is mapped (:func:`qmpbackup.images.qcow2_reader.read_map`); each
guest cluster is read from the topmost file that holds it, where its data lies, in runs
of up to 4 MiB, on two threads. A cluster is hashed from the bytes read, compared with
its recorded digest, and written; blocks the chain leaves as zeroes must be zero in the
record. One read of the data, nothing read back: the restore's check costs a hash.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import blake3

from ..files import pwrite_all
from ..images.qcow2_reader import Qcow2Map, Qcow2Unsupported, Runs, read_into, read_map
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


def _resolve(layers: Sequence[Qcow2Map]) -> dict[int, tuple[int, int]]:
    """Guest cluster -> (layer, host offset) of the data the chain shows, top first."""
    found: dict[int, tuple[int, int]] = {}
    above: list[Runs] = []  # the zero clusters of the layers above, which hide the data
    size = layers[-1].size
    for k in range(len(layers) - 1, -1, -1):
        layer = layers[k]
        limit = -(-min(size, layer.size) // layer.cluster_size)
        for guest, host in layer.data.items():
            if guest < limit and guest not in found and not any(guest in z for z in above):
                found[guest] = (k, host)
        if layer.zero:
            above.append(layer.zero)
    return found


def _runs(found: dict[int, tuple[int, int]], cluster: int) -> Iterator[tuple[int, int, int, int]]:
    """(first guest cluster, layer, host offset, clusters) of contiguous reads."""
    run: list[int] = []
    for guest in sorted(found):
        layer, host = found[guest]
        if run:
            first, first_layer, first_host, n = run
            if (guest, layer, host) == (first + n, first_layer, first_host + n * cluster) and (
                n < _RUN
            ):
                run[3] += 1
                continue
            yield first, first_layer, first_host, n
        run = [guest, layer, host, 1]
    if run:
        yield run[0], run[1], run[2], run[3]


class _Output:
    """The new image, raw or qcow2 (through the writer); either takes writes from any
    thread."""

    def __init__(self, dest: Path, fmt: Literal["qcow2", "raw"], size: int) -> None:
        self.writer: Qcow2Writer | None = None
        self.fd = -1
        if fmt == "qcow2":
            dest.unlink(missing_ok=True)
            self.writer = Qcow2Writer(dest, size)
        else:
            self.fd = os.open(dest, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            os.ftruncate(self.fd, size)

    def write(self, offset: int, data: memoryview) -> None:
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


def copy_chain(
    chain: Sequence[Path], dest: Path, fmt: Literal["qcow2", "raw"], expected: Digests
) -> ChainCopy:
    """Write the content of ``chain`` (base first) into ``dest`` (an existing empty file,
    replaced) as a standalone ``fmt`` image, checking every block against ``expected``.

    Raises Qcow2Unsupported (before writing anything) for files this process does not
    read, or for digests other than BLAKE3 of 64 KiB clusters; OSError on I/O failure.
    """
    layers = _linked([read_map(path) for path in chain])
    cluster = layers[-1].cluster_size
    if expected.algorithm != "blake3" or expected.block_size != cluster:
        raise Qcow2Unsupported("the digests are not per-cluster BLAKE3")
    if any(layer.cluster_size != cluster for layer in layers):
        raise Qcow2Unsupported("the chain's files have different cluster sizes")
    size = expected.size
    found = _resolve(layers)
    out = _Output(dest, fmt, size)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(layer.path, "rb", buffering=0)) for layer in layers]
        fds = [handle.fileno() for handle in files]

        local = threading.local()

        def copy(run: tuple[int, int, int, int]) -> list[int]:
            first, layer, host, n = run
            # One buffer per thread, reused: a new one per read costs a page fault per
            # 4 KiB (0.3 s of system time per GiB); the write below is done before return.
            if not hasattr(local, "buffer"):
                local.buffer = bytearray(_RUN * cluster)
            data = read_into(fds[layer], local.buffer, n * cluster, host)
            length = min(n * cluster, size - first * cluster)
            if len(data) < length:
                raise Qcow2Unsupported(f"{layers[layer].path}: data past the end of the file")
            pieces = [data[k * cluster : min((k + 1) * cluster, length)] for k in range(n)]
            digests = [blake3.blake3(piece).digest() for piece in pieces]
            # Clusters of zeroes are not written: the new image reads them as zeroes
            # already (as qemu-img convert keeps them sparse); their digest proves it.
            zero = [
                d == zero_digest(len(p), "blake3") for d, p in zip(digests, pieces, strict=True)
            ]
            k = 0
            while k < n:
                j = next((i for i in range(k, n) if zero[i] != zero[k]), n)
                piece = data[k * cluster : min(j * cluster, length)]
                if zero[k]:
                    out.zero((first + k) * cluster, len(piece))
                else:
                    out.write((first + k) * cluster, piece)
                k = j
            return [first + k for k in range(n) if digests[k] != expected.get(first + k)]

        try:
            with ThreadPoolExecutor(_THREADS, thread_name_prefix="qmpbackup-restore") as pool:
                bad = [i for found_bad in pool.map(copy, _runs(found, cluster)) for i in found_bad]
            whole = out.finish()
        except BaseException:
            out.abandon()
            raise
    bad += [i for i in expected.indexes if i not in found]
    return ChainCopy(blocks_checked=expected.count, bad=sorted(set(bad)), file_digest=whole)
