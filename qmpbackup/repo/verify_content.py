"""The content checks of verify: each disk's blocks against its recorded digests.

Content is checked per block without reading every point of every chain: a base is read
whole; a backup with a parent reads only the blocks its own image touches (``qemu-img
map`` depth 0), plus those whose recorded digest differs from its parent's or whose
parent did not verify. The other blocks read exactly as in the parent, so, parents being
checked first, equal recorded digests prove them too.

Where every file of a chain was read by the file checks (format 2), the content of a
block is the digest of the topmost file's own cluster, known from that read: nothing
is read again. Otherwise the blocks are read through the chain with ``qemu-nbd``.

A mismatching block is blamed on the image files that provide it (the map's depth) whose
file digest changed; when every such file is unchanged since the backup, on the digests
file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import one_line
from ..images.keyed import image_args
from ..images.qemu_img import ImageError, qemu_img
from ..nbd import NBDError
from .digests import DigestError, block_count, changed_blocks, resized_blocks
from .digests_nbd import digest_image
from .restore import describe_blocks
from .verify_files import CheckedDisk, Report


class ContentChecks:
    """The content checks of one verify run, and how many blocks they read."""

    def __init__(self, disks: Mapping[tuple[str, str], CheckedDisk], report: Report) -> None:
        self.disks = disks
        self.report = report
        self.blocks = 0
        # (path, backup owning it, disk) -> (bad blocks, backups through which they were read)
        self._bad: dict[tuple[Path, str, str], tuple[set[int], set[str]]] = defaultdict(
            lambda: (set(), set())
        )

    def _chain(self, item: CheckedDisk) -> list[CheckedDisk]:
        """``item``'s chain, base first (parents whose record is missing end it)."""
        found = [item]
        parent = item.parent
        while parent is not None and len(found) <= len(self.disks):
            found.append(parent)
            parent = parent.parent
        return found[::-1]

    def check(self, item: CheckedDisk) -> None:
        """Compare ``item``'s blocks with its recorded digests; its parent is checked first."""
        expected = item.digests
        if expected is None:
            item.unproven = range(block_count(item.disk.virtual_size, item.disk.digest_block_size))
            return
        chain = self._chain(item)
        broken = next((c for c in chain if not c.usable), None)
        if broken is None and chain[0].disk.parent is not None:
            broken = chain[0]  # the file checks reported its missing parent
        if broken is not None:
            item.unproven = range(expected.count)
            if broken is not item:
                self.report(
                    item,
                    broken.image,
                    f"content not checked: its chain goes through {broken.image.name} "
                    f"of backup {broken.record.id}, which is missing or damaged",
                )
            return
        bs = expected.block_size
        count = expected.count
        mapping: list[dict[str, Any]] = []
        parent = item.parent
        scanned = all(c.own is not None for c in chain)
        if parent is None:
            wanted = set(range(count)) if not scanned else set(expected.indexes)
            wanted |= set(item.own or ())
        elif scanned:
            mapping = _scanned_mapping(chain)
            wanted = self._blocks_to_read(item, parent, _own_scanned(item, parent))
        else:
            try:
                mapping = json.loads(
                    qemu_img("map", "--output=json", *image_args(item.image)).stdout
                )
            except (ImageError, ValueError) as exc:
                self.report(item, item.image, f"qemu-img map: {one_line(exc)}")
                item.unproven = range(count)
                return
            own = [
                (int(e["start"]), int(e["length"]))
                for e in mapping
                if e.get("depth") == 0 and e.get("present", e.get("data") or e.get("zero"))
            ]
            wanted = self._blocks_to_read(item, parent, changed_blocks(own, bs))
        if scanned:
            self.blocks += item.blocks_hashed
        if wanted:
            try:
                got = _from_scans(chain, wanted) if scanned else {}
                unread = wanted - got.keys()
                got |= digest_image(
                    item.image,
                    item.disk.virtual_size,
                    unread,
                    block_size=bs,
                    algorithm=expected.algorithm,
                ) if unread else {}  # fmt: skip
            except (DigestError, ImageError, NBDError) as exc:
                self.report(item, item.image, f"cannot read through the chain: {one_line(exc)}")
                item.unproven = range(count)
                return
            if not scanned:
                self.blocks += len(wanted)
            bad = sorted(i for i in wanted if got[i] != expected.get(i))
        else:
            bad = []
        item.unproven = set(bad)
        for index in bad:
            self._blame(item, chain, index, mapping)

    def _blocks_to_read(self, item: CheckedDisk, parent: CheckedDisk, own: set[int]) -> set[int]:
        """``item``'s blocks to check: those its own file holds (``own``), and those its
        digests do not inherit unchanged from a proven parent."""
        assert item.digests is not None
        bs = item.digests.block_size
        count = item.digests.count
        wanted = set(own)
        theirs = parent.digests
        if theirs is None or theirs.block_size != bs:
            return set(range(count))
        known = min(block_count(theirs.size, bs), count)
        wanted |= resized_blocks(theirs.size, item.disk.virtual_size, bs)
        wanted |= set(range(known, count))
        wanted |= {i for i in parent.unproven if i < count}
        wanted |= {i for i in item.digests.differing(theirs) if i < known}
        return {i for i in wanted if i < count}

    def _blame(
        self, item: CheckedDisk, chain: list[CheckedDisk], index: int, mapping: list[dict[str, Any]]
    ) -> None:
        bs = item.disk.digest_block_size
        start, end = index * bs, (index + 1) * bs
        providers = {chain[-1]}
        for entry in mapping:
            if entry["start"] < end and entry["start"] + entry["length"] > start:
                depth = int(entry.get("depth", 0))
                if entry.get("present", True) and depth < len(chain):
                    providers.add(chain[-1 - depth])
        changed = [p for p in providers if p.state == "changed"]
        unknown = [p for p in providers if p.state == "unknown"]
        for culprit in changed or unknown:
            blocks, via = self._bad[(culprit.image, culprit.record.id, culprit.disk.name)]
            blocks.add(index)
            via.add(item.record.id)
        if not changed and not unknown:
            blocks, via = self._bad[(item.digests_file, item.record.id, item.disk.name)]
            blocks.add(index)
            via.add(item.record.id)

    def report_mismatches(self) -> None:
        """Report the blocks blamed on each file, once the content of every disk is checked."""
        for (path, owner, disk), (blocks, via) in sorted(self._bad.items()):
            item = self.disks[(owner, disk)]
            text = describe_blocks(sorted(blocks), item.disk.digest_block_size)
            if path == item.digests_file:
                message = (
                    f"recorded digest of {text} does not match the content, though the image "
                    "files are unchanged since the backup: this file or the backup is wrong"
                )
            else:
                message = f"content of {text} differs from the recorded digests"
                others = sorted(via - {owner})
                if others:
                    message += f" (also seen through backups {', '.join(others)})"
            self.report(item, path, message)


def _own_scanned(item: CheckedDisk, parent: CheckedDisk) -> set[int]:
    """The blocks a scanned ``item`` holds that matter: its data clusters, and those of
    its zero clusters where its digests or its parent's say data (the others agree)."""
    said = sorted({*(item.digests.indexes if item.digests else ()),
                   *(parent.digests.indexes if parent.digests else ())})  # fmt: skip
    return set(item.own or ()) | set(item.zero.among(said))


def _scanned_mapping(chain: list[CheckedDisk]) -> list[dict[str, Any]]:
    """What ``qemu-img map`` would say of the chain's top (depth and extent of each data
    cluster a file holds itself), from the file checks' reads."""
    bs = chain[-1].disk.digest_block_size
    mapping: list[dict[str, Any]] = []
    seen: set[int] = set()
    for depth, item in enumerate(reversed(chain)):
        for index in sorted(set(item.own or ()) - seen):
            mapping.append({"start": index * bs, "length": bs, "depth": depth, "present": True})
        seen |= set(item.own or ())
    return mapping


def _from_scans(chain: list[CheckedDisk], wanted: set[int]) -> dict[int, bytes]:
    """The digests of ``wanted`` as the chain reads, from its files' own blocks; blocks
    no file holds read as zeroes. Blocks that straddle an older file's end (a resize)
    are left out: they must be read."""
    top = chain[-1]
    assert top.digests is not None
    found: dict[int, bytes] = {}
    for index in wanted:
        for item in reversed(chain):
            own = item.own or {}
            if index in own:
                found[index] = own[index]
                break
            if index in item.zero:
                found[index] = top.digests.zero(index)
                break
            if item.disk.virtual_size != top.disk.virtual_size and (
                index * top.disk.digest_block_size < item.disk.virtual_size
                and (index + 1) * top.disk.digest_block_size > item.disk.virtual_size
            ):
                break  # part of the block is past this file's end
        else:
            found[index] = top.digests.zero(index)
    return found
