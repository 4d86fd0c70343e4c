"""Sealing a backup's new image: linked to its parent, checked, its digests recorded.

A pull image was hashed by this process as it wrote it (the copy's digests and file
digest come with it). A push image, written by QEMU, is read once where its data lies
(:func:`qmpbackup.images.qcow2_reader.read_own`): the same pass gives its file digest and
its data clusters' digests. An incremental records its own blocks and derives the
others from its parent's digests. Images this process cannot read itself, and a chain
whose parent has digests of another format, are read through ``qemu-nbd`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..images.qcow2_reader import Runs, read_own
from ..images.qemu_img import ImageError, check_image, set_backing_name, top_layer_extents
from .digests import (
    Algorithm,
    Digests,
    algorithm_of,
    changed_blocks,
    derive,
    file_digest,
    resized_blocks,
)
from .digests_nbd import digest_all, digest_image
from .records import BackupEntry, DiskRecord, RepositoryError
from .repository import Repository


@dataclass(frozen=True)
class Hashed:
    """A new image as hashed while it was written: its blocks' digests (zeroed blocks
    included) and its file digest."""

    blocks: Mapping[int, bytes]
    file_digest: str


@dataclass(frozen=True)
class Sealed:
    """A sealed image: its file digest, how many blocks were read to seal it, and how
    many of its blocks' digests came with it, hashed while it was written."""

    file_digest: str
    blocks_read: int
    blocks_hashed: int = 0


def _own_blocks(
    image: Path, disk: DiskRecord, algorithm: Algorithm
) -> tuple[dict[int, bytes], Runs, str] | None:
    """The digests of the image's own data clusters, its zero clusters and its file
    digest, in one read of the file; None where the file is not one :func:`scan` reads."""
    found = read_own(image, disk.digest_block_size) if algorithm == "blake3" else None
    if found is None:
        return None
    image_map, scanned = found
    if scanned.undecodable:
        first = scanned.undecodable[0]
        raise ImageError(f"{image}: compressed cluster {first} does not decode")
    return dict(scanned.blocks), image_map.zero, scanned.file_digest


def _digests(
    repo: Repository,
    disk: DiskRecord,
    image: Path,
    own: dict[int, bytes] | None,
    zero: Runs,
    fmt: int,
) -> tuple[Digests, int]:
    """The image's digests at the instant, and how many blocks were read through NBD."""
    algorithm, bs, size = algorithm_of(fmt), disk.digest_block_size, disk.virtual_size
    parent = repo.get(disk.parent) if disk.parent is not None else None
    parent_disk = None if parent is None else parent.disk(disk.name)
    if parent is None or parent_disk is None:
        if own is not None:
            return Digests.from_map(bs, size, algorithm, own), 0
        found = digest_all(image, size, block_size=bs, algorithm=algorithm)
        return found, len(found.indexes)
    if parent.format != fmt or parent_disk.digest_block_size != bs:
        # Digests of another kind cannot be derived from: read the whole chain once.
        found = digest_all(image, size, block_size=bs, algorithm=algorithm)
        return found, len(found.indexes)
    before = Digests.load(repo.digests_path(parent, disk.name))
    read = 0
    if own is None:
        wanted = changed_blocks(top_layer_extents(image), bs)
        own = digest_image(image, size, wanted, block_size=bs, algorithm=algorithm)
        read = len(wanted)
    missing = resized_blocks(before.size, size, bs) - own.keys()
    if missing:
        own.update(digest_image(image, size, missing, block_size=bs, algorithm=algorithm))
        read += len(missing)
    return derive(before, own, size, zero), read


def seal(
    repo: Repository, entry: BackupEntry, disk: str, *, link: bool, hashed: Hashed | None
) -> Sealed:
    """Seal ``disk``'s new image of ``entry``: with ``link``, write its parent's name as
    its backing file; ``qemu-img check`` it; write its digests file.

    Raises RepositoryError naming the disk and the file when a file cannot be read or
    written (a full filesystem, say), ImageError if the image is damaged, DigestError or
    NBDError if it cannot be read through NBD.
    """
    try:
        return _seal(repo, entry, disk, link=link, hashed=hashed)
    except OSError as exc:
        path = exc.filename or entry.target(disk).image
        raise RepositoryError(f"disk {disk}: cannot write {path}: {exc.strerror}") from None


def _seal(
    repo: Repository, entry: BackupEntry, disk: str, *, link: bool, hashed: Hashed | None
) -> Sealed:
    target = entry.target(disk)
    record = entry.record.disk(disk)
    assert record is not None
    if link and target.backing:
        set_backing_name(target.image, target.backing)
    check_image(target.image)
    fmt = entry.record.format
    scanned = 0
    zero = Runs()
    if hashed is not None:
        own: dict[int, bytes] | None = dict(hashed.blocks)
        whole: str | None = hashed.file_digest
    else:
        found = _own_blocks(target.image, record, algorithm_of(fmt))
        own, whole = (None, None) if found is None else (found[0], found[2])
        zero = Runs() if found is None else found[1]
        scanned = len(own or ())
    digests, read = _digests(repo, record, target.image, own, zero, fmt)
    digests.save(target.digests)
    if whole is None:
        whole = file_digest(target.image, fmt)
    return Sealed(whole, read + scanned, 0 if hashed is None else len(hashed.blocks))
