"""Copying a pull backup's exports into images with the built-in NBD client.

Full: every extent that is not known to read as zeroes is copied into a new
qcow2 (or raw) image; zero extents stay sparse.  Incremental/differential:
only the extents the export's dirty bitmap marks are written, into a qcow2
whose backing file is the previous backup; dirty extents that now read as
zeroes are written as zeroes, never dropped, so they hide the older data.
No process per extent: one reader, one writer (qemu-storage-daemon), both
over several NBD connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .nbd import Extent, NBDClient, TLSConfig
from .target_server import TargetServer, create_image

ALLOCATION = "base:allocation"
_ZERO = 2  # base:allocation: the extent reads as zeroes
_DIRTY = 1  # qemu:dirty-bitmap:*: the extent changed since the checkpoint

Progress = Callable[[int], None]


@dataclass(frozen=True)
class CopyResult:
    """What a pull copy wrote."""

    image: Path
    size: int
    data_bytes: int
    zero_bytes: int


def _intersect(extents: Iterator[Extent], start: int, end: int) -> Iterator[tuple[int, int, int]]:
    for extent in extents:
        lo, hi = max(start, extent.offset), min(end, extent.offset + extent.length)
        if lo < hi:
            yield lo, hi - lo, extent.flags


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
    for dirty in source.extents(dirty_context):
        if not dirty.flags & _DIRTY:
            continue
        end = dirty.offset + dirty.length
        allocation = source.extents(ALLOCATION, dirty.offset, dirty.length)
        for offset, length, flags in _intersect(allocation, dirty.offset, end):
            (zeros if flags & _ZERO else data).append((offset, length))
    return data, zeros


def pull_copy(
    source_uri: str,
    out: Path,
    *,
    fmt: str = "qcow2",
    backing: Path | None = None,
    bitmap: str | None = None,
    tls: TLSConfig | None = None,
    connections: int = 4,
    on_progress: Progress | None = None,
    on_start: Progress | None = None,
) -> CopyResult:
    """Copy an export into the new image ``out``.

    With ``bitmap`` (the export's dirty bitmap, e.g. ``vda``) only dirty
    extents are written and ``backing`` (the previous backup) becomes the
    backing file of ``out``, which must then be qcow2.
    """
    dirty_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
    if dirty_context is not None and (backing is None or fmt != "qcow2"):
        raise ValueError("an incremental copy needs a qcow2 image and its backing file")
    contexts = [ALLOCATION] + ([dirty_context] if dirty_context else [])
    with NBDClient.connect(
        source_uri, connections=connections, meta_contexts=contexts, tls=tls
    ) as source:
        data, zeros = _plan_ranges(source, dirty_context)
        if on_start is not None:
            on_start(sum(n for _, n in data))
        create_image(out, source.size, fmt, backing)
        try:
            with (
                TargetServer(out, fmt) as server,
                NBDClient.connect(server.uri, connections=connections) as target,
            ):
                for offset, length in zeros:
                    target.write_zeroes(offset, length, may_trim=True)
                copied = source.copy_to(
                    target, data, on_progress=on_progress, dest_is_zero=dirty_context is None
                )
                target.flush()
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return CopyResult(
        image=out,
        size=source.size,
        data_bytes=copied,
        zero_bytes=sum(n for _, n in zeros),
    )
