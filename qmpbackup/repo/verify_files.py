"""The file checks of verify: the image file and the digests file of each disk of a backup.

An image file must exist, have the file digest its record holds, open as a qcow2 image
of the recorded size with the recorded backing link, pass ``qemu-img check`` opened
alone, and chain to a parent backup that is complete, older and holds the file it names.
A format 2 image is read once, where its data lies: that read gives its file digest and
the digests of the blocks it holds, which the content checks use without reading again. A
digests file must load and cover the recorded size in the recorded block size. What the
checks learn goes into the :class:`CheckedDisk`, for the content checks; what they find
wrong goes to a :class:`Report`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..errors import QmpBackupError, one_line
from ..images.keyed import SECRET_ID, encrypted_layers, key_file
from ..images.qcow2_reader import Runs, read_own
from ..images.qemu_img import ImageError, image_info, qemu_img
from .digests import DigestError, Digests, algorithm_of, file_digest
from .records import BackupRecord, DiskRecord

Severity = Literal["error", "warning"]
FileState = Literal["intact", "changed", "unknown", "missing"]


@dataclass(eq=False)
class CheckedDisk:
    """What verify learned of one disk of one backup."""

    record: BackupRecord
    disk: DiskRecord
    image: Path
    digests_file: Path
    parent: CheckedDisk | None = None
    state: FileState = "unknown"
    usable: bool = False  # opens, right size and backing link: a chain may go through it
    digests: Digests | None = None
    # Blocks whose content does not equal the recorded digest, or was not verified.
    unproven: set[int] | range = field(default_factory=set)
    # Read from a format 2 image: the digests of the data clusters it holds itself, and
    # its zero clusters; None when its content must be read through qemu-nbd.
    own: dict[int, bytes] | None = None
    zero: Runs = field(default_factory=Runs)
    blocks_hashed: int = 0


class Report(Protocol):
    """Where a check reports what it found wrong with ``item``, about file ``path``."""

    def __call__(
        self, item: CheckedDisk, path: Path | None, message: str, severity: Severity = "error"
    ) -> None: ...


class FileChecks:
    """The file checks of one verify run, and how many files they read."""

    def __init__(self, records: Mapping[str, BackupRecord], report: Report) -> None:
        self.records = records
        self.report = report
        self.files = 0

    def check_image(self, item: CheckedDisk) -> None:
        """Existence, whole-file digest, qemu-img info and check of one image file."""
        expected = item.disk
        if not item.image.is_file():
            item.state = "missing"
            self.report(item, item.image, "image file missing")
            return
        self.files += 1
        if expected.file_digest is not None:
            try:
                same = self._file_digest(item) == expected.file_digest
            except (OSError, QmpBackupError) as exc:
                self.report(item, item.image, f"unreadable: {one_line(exc)}")
                return
            item.state = "intact" if same else "changed"
            if not same:
                self.report(
                    item,
                    item.image,
                    "image file changed since the backup: its file digest is not the record's",
                )
        try:
            info = image_info(item.image)
        except (ImageError, ValueError) as exc:
            self.report(item, item.image, f"cannot be opened: {one_line(exc)}")
            return
        usable = self._check_info(item, info)
        self._check_qcow2(item)
        item.usable = usable and self._check_parent(item)

    @staticmethod
    def _file_digest(item: CheckedDisk) -> str:
        """The image's file digest; a format 2 image's own blocks' digests on the way."""
        fmt = item.record.format
        if algorithm_of(fmt) == "blake3":
            found = read_own(item.image, item.disk.digest_block_size)
            if found is not None:
                image_map, scanned = found
                item.own, item.zero = dict(scanned.blocks), image_map.zero
                item.blocks_hashed = len(scanned.blocks)
                return scanned.file_digest
        return file_digest(item.image, fmt)

    def _check_info(self, item: CheckedDisk, info: dict[str, Any]) -> bool:
        expected = item.disk
        found: list[str] = []
        if info.get("format") != "qcow2":
            found.append(f"format {info.get('format')}, not qcow2")
        if info.get("virtual-size") != expected.virtual_size:
            found.append(
                f"virtual size {info.get('virtual-size')}, the record says {expected.virtual_size}"
            )
        backing = info.get("backing-filename")
        if backing != expected.parent_file:
            found.append(f"backing file {backing!r}, the record says {expected.parent_file!r}")
        elif backing is not None and info.get("backing-filename-format") != "qcow2":
            found.append(f"backing format {info.get('backing-filename-format')!r}, not 'qcow2'")
        specific = info.get("format-specific", {}).get("data", {})
        if specific.get("corrupt"):
            found.append("qcow2 marks the image corrupt")
        for message in found:
            self.report(item, item.image, message)
        return not found

    def _check_qcow2(self, item: CheckedDisk) -> None:
        # Opened alone (backing null) so that a missing parent is reported once, there.
        spec: dict[str, Any] = {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(item.image)},
            "backing": None,
        }
        if key_file() is not None and encrypted_layers(item.image)[0]:
            spec["encrypt"] = {"key-secret": SECRET_ID}
        try:
            proc = qemu_img("check", "--output=json", "json:" + json.dumps(spec), ok=(0, 1, 2, 3))
        except ImageError as exc:
            self.report(item, item.image, f"qemu-img check: {exc}")
            return
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        first = next((line for line in lines if "ERROR" in line), lines[0])
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            self.report(item, item.image, f"qemu-img check could not complete: {first}")
            return
        corruptions = int(result.get("corruptions", 0))
        if corruptions:
            message = f"qemu-img check: {corruptions} corruptions in the qcow2 metadata ({first})"
            self.report(item, item.image, message)
        elif proc.returncode in (1, 2) or result.get("check-errors"):
            self.report(item, item.image, f"qemu-img check could not complete: {first}")
        leaks = int(result.get("leaks", 0))
        if leaks:
            self.report(
                item, item.image, f"qemu-img check: {leaks} leaked clusters (space only)", "warning"
            )

    def _check_parent(self, item: CheckedDisk) -> bool:
        expected = item.disk
        if expected.parent is None:
            return True
        parent = self.records.get(expected.parent)
        if parent is None:
            self.report(item, item.image, f"parent backup {expected.parent} has no readable record")
            return False
        parent_disk = parent.disk(expected.name)
        if not parent.complete:
            message = f"parent backup {parent.id} is incomplete"
        elif parent.seq >= item.record.seq:
            message = f"parent backup {parent.id} is not older than this one"
        elif parent_disk is None:
            message = f"parent backup {parent.id} has no disk {expected.name}"
        elif parent_disk.file != expected.parent_file:
            message = (
                f"the record names parent file {expected.parent_file}, "
                f"backup {parent.id} has {parent_disk.file}"
            )
        else:
            return True
        self.report(item, item.image, message)
        return False

    def check_digests(self, item: CheckedDisk) -> None:
        """Existence, format and geometry of one digests file."""
        expected = item.disk
        if not item.digests_file.is_file():
            self.report(item, item.digests_file, "digests file missing")
            return
        self.files += 1
        try:
            digests = Digests.load(item.digests_file)
        except (OSError, DigestError) as exc:
            self.report(item, item.digests_file, f"unreadable digests: {one_line(exc)}")
            return
        if (
            digests.block_size != expected.digest_block_size
            or digests.size != expected.virtual_size
        ):
            self.report(
                item,
                item.digests_file,
                f"digests of {digests.size} bytes in {digests.block_size}-byte blocks, the "
                f"record says {expected.virtual_size} in {expected.digest_block_size}",
            )
            return
        item.digests = digests
