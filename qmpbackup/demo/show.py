"""What the demo prints and checks, and disks drawn as the slides draw them.

As on the slides, one letter of a picture is one MiB of the disk: ``ABBBB---``
is ``A`` in the first MiB, ``B`` in the next four, then zeroes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..nbd import Extent, NBDClient
from .throwaway import qemu_img

MiB = 1024 * 1024
CLUSTER = 64 * 1024  # qcow2 cluster size and dirty-bitmap granularity of the slides' disks
PICTURE = 8  # the slides draw the first 8 MiB of each disk


class CheckFailed(Exception):
    """A demo check did not hold."""


def say(text: str = "") -> None:
    """Print one line of the demo's output."""
    print(text, flush=True)


def header(title: str) -> None:
    """Print a section header."""
    say()
    say(f"== {title} ==")


def check(condition: bool, what: str) -> None:
    """Print ``ok: what`` when ``condition`` holds, else raise :class:`CheckFailed`."""
    if not condition:
        raise CheckFailed(what)
    say(f"  ok: {what}")


def show_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and print it as ``$ cat`` would."""
    path.write_text(text)
    say(f"$ cat {path.name}")
    say(text.rstrip("\n"))


def mib(size: int) -> str:
    """A byte count in MiB."""
    return f"{size / MiB:g} MiB"


def size_text(clusters: set[int]) -> str:
    """A cluster count in MiB or KiB."""
    size = len(clusters) * CLUSTER
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size // 1024} KiB"


def picture(raw: Path) -> str:
    """The first MiBs of a raw image as the slides draw them: a letter per MiB, ``-`` for zeroes."""
    letters = []
    with open(raw, "rb") as handle:
        for _ in range(PICTURE):
            chunk = handle.read(MiB)
            if not chunk.strip(b"\0"):
                letters.append("-")
            elif chunk == chunk[:1] * len(chunk) and chr(chunk[0]).isprintable():
                letters.append(chr(chunk[0]))
            else:
                letters.append("?")
    return "".join(letters)


def image_info(image: Path) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of ``image``: the image first, then its backing files."""
    chain: list[dict[str, Any]] = json.loads(
        qemu_img("info", "-U", "--backing-chain", "--output=json", str(image))
    )
    return chain


def chain_text(image: Path) -> str:
    """``image``'s backing chain as the slides write it: ``Base1.img ← Active1.qcow2``."""
    return " ← ".join(Path(entry["filename"]).name for entry in reversed(image_info(image)))


def allocated_clusters(image: Path) -> set[int]:
    """Indexes of the clusters ``image`` itself holds (not its backing files)."""
    extents = json.loads(qemu_img("map", "-U", "--output=json", str(image)))
    clusters: set[int] = set()
    for extent in extents:
        if extent["depth"] == 0 and extent.get("present", extent["data"]):
            start, end = extent["start"], extent["start"] + extent["length"]
            clusters.update(range(start // CLUSTER, (end + CLUSTER - 1) // CLUSTER))
    return clusters


def rebase(image: Path, parent: Path) -> None:
    """``qemu-img rebase -u``: make ``parent`` the backing file of ``image``."""
    say(f"$ qemu-img rebase -u -f qcow2 -b {parent.name} -F qcow2 {image.name}")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(parent), "-F", "qcow2", str(image))


def dirty_extents(uri: str, context: str) -> list[Extent]:
    """The dirty extents of an export, from NBD block status on ``context``."""
    with NBDClient.connect(uri, meta_contexts=[context]) as client:
        return [extent for extent in client.extents(context) if extent.flags & 1]


def extents_picture(extents: list[Extent]) -> str:
    """The first MiBs as the slides draw a bitmap: ``!`` where an extent touches the MiB."""
    return "".join(
        "!" if any(e.offset < (i + 1) * MiB and e.end > i * MiB for e in extents) else "-"
        for i in range(PICTURE)
    )


def extent_clusters(extents: list[Extent]) -> set[int]:
    """Indexes of the clusters the extents cover."""
    clusters: set[int] = set()
    for extent in extents:
        clusters.update(range(extent.offset // CLUSTER, (extent.end + CLUSTER - 1) // CLUSTER))
    return clusters
