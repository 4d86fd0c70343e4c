"""Restore one disk of a backup into a standalone image, checked against its digests.

The image is built into a hidden temporary file next to ``out``: by this process from
the chain's files, each block checked against the digests recorded at backup time on
its way through (:mod:`qmpbackup.repo.chain_copy`); or, for a format 1 record or files
it does not read, by ``qemu-img convert`` from the chain top, read back and compared.
It is flushed, and only then linked to ``out`` with a primitive that never replaces
an existing file. ``out`` therefore either does not exist
or holds the whole checked image; a failure or an interrupt removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import structlog

from ..errors import InvalidInputError, QmpBackupError, TargetExistsError
from ..files import fsync_dir, fsync_file
from ..images.keyed import image_args, luks_create_options
from ..images.qcow2_compressed import Compression
from ..images.qcow2_reader import Qcow2Unsupported
from ..images.qemu_img import image_info, qemu_img
from .chain_copy import copy_chain
from .digests import Digests, compare
from .digests_nbd import digest_all
from .records import BackupRecord, DiskRecord, RepositoryError
from .repository import Repository

log = structlog.get_logger("qmpbackup.restore")

Format = Literal["qcow2", "raw"]


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore` wrote: which backup and disk, where, and what was checked."""

    backup_id: str
    disk: str
    out: Path
    fmt: Format
    virtual_size: int
    blocks_checked: int


@contextlib.contextmanager
def temporary_file(folder: Path, prefix: str) -> Iterator[Path]:
    """A new hidden file in ``folder``, removed on leaving unless renamed away."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def check_new_file(out: Path) -> Path:
    """``out``, absolute, once it is known not to exist in a folder this process can
    write to; TargetExistsError or InvalidInputError otherwise."""
    out = Path(out).absolute()
    if os.path.lexists(out):
        raise TargetExistsError(f"{out} exists: refusing to overwrite it")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{out.parent} is not a folder this process can write to")
    return out


def link_into_place(temp: Path, out: Path, when: str) -> None:
    """Give the finished ``temp`` its name ``out`` and make that durable.
    TargetExistsError if ``out`` appeared ``when`` (say, "during the restore"),
    QmpBackupError if it cannot be made."""
    try:
        # link(2) fails when out exists: unlike rename it never replaces a file that
        # appeared since the check.
        os.link(temp, out)
    except FileExistsError:
        raise TargetExistsError(f"{out} appeared {when}: left alone") from None
    except OSError as exc:
        raise QmpBackupError(f"cannot create {out}: {exc.strerror}") from None
    temp.unlink()
    fsync_dir(out.parent)


def recorded_digests(repo: Repository, record: BackupRecord, disk: DiskRecord) -> Digests:
    """The digests recorded for ``disk`` of ``record``, checked against its geometry."""
    path = repo.digests_path(record, disk.name)
    try:
        digests = Digests.load(path)
    except OSError as exc:
        raise RepositoryError(
            f"backup {record.id}, disk {disk.name}: cannot read {path}: {exc.strerror}"
        ) from None
    if digests.size != disk.virtual_size or digests.block_size != disk.digest_block_size:
        raise RepositoryError(
            f"backup {record.id}, disk {disk.name}: {path} covers {digests.size} bytes in "
            f"{digests.block_size}-byte blocks, the record says {disk.virtual_size} in "
            f"{disk.digest_block_size}"
        )
    return digests


def describe_blocks(blocks: list[int], block_size: int) -> str:
    """``block 3 (bytes 3145728-4194303)``, and how many more there are."""
    first = blocks[0]
    text = f"block {first} (bytes {first * block_size}-{(first + 1) * block_size - 1})"
    if len(blocks) > 1:
        shown = ", ".join(str(i) for i in blocks[:8]) + (", ..." if len(blocks) > 8 else "")
        text += f"; {len(blocks)} blocks differ: {shown}"
    return text


def check_standalone(path: Path, fmt: Format, expected: Digests, what: str) -> int:
    """Check that ``path`` has no backing file, ``expected``'s size and every block equal
    to ``expected``; the number of blocks checked."""
    info = image_info(path, fmt)
    if info.get("virtual-size") != expected.size:
        raise RepositoryError(
            f"{what}: the image has {info.get('virtual-size')} bytes, "
            f"the backup recorded {expected.size}"
        )
    if info.get("backing-filename") is not None:
        raise RepositoryError(f"{what}: the image still has a backing file")
    actual = digest_all(path, fmt=fmt, block_size=expected.block_size, algorithm=expected.algorithm)
    _refuse_bad(compare(expected, actual), expected, what)
    return actual.count


def _refuse_bad(bad: list[int], expected: Digests, what: str) -> None:
    if bad:
        raise RepositoryError(
            f"{what}: {describe_blocks(bad, expected.block_size)} differs from the recorded digests"
        )


def build_checked(
    chain: list[Path],
    dest: Path,
    fmt: Format,
    expected: Digests,
    what: str,
    encrypt: bool = False,
    compression: Compression | None = None,
) -> tuple[int, str | None]:
    """Write the content of ``chain`` (base first) as a standalone ``fmt`` image at
    ``dest`` (which is overwritten), every block checked against ``expected``, flushed;
    the number of blocks checked and, for a qcow2 image this process wrote, its format 2
    file digest. RepositoryError names the first block that differs. ``encrypt``: the
    image is LUKS-encrypted qcow2 with the key of :mod:`~qmpbackup.images.keyed`
    (a prune's flattened base in an encrypted repository); ``compression``: a qcow2
    image holds compressed clusters (a prune's flattened base in a compressed one)."""
    try:
        copied = copy_chain(chain, dest, fmt, expected, compression)
    except Qcow2Unsupported as exc:
        log.info("restore.through-qemu-img", image=str(chain[-1]), reason=str(exc))
        # -S (default 4 KiB) keeps zeroes sparse; without -B a qcow2 result has no backing.
        options = []
        if compression is not None and fmt == "qcow2":
            options = ["-c", "-o", f"compression_type={compression}"]
        if encrypt:
            options = ["-o", luks_create_options()]
        qemu_img("convert", "-q", *image_args(chain[-1]), "-O", fmt, *options, str(dest))
        blocks = check_standalone(dest, fmt, expected, what)
        fsync_file(dest)
        return blocks, None
    _refuse_bad(copied.bad, expected, what)
    return copied.blocks_checked, copied.file_digest


def select_backup(
    repo: Repository, disk: str, backup_id: str | None
) -> tuple[BackupRecord, DiskRecord]:
    """The backup ``backup_id`` (default: the newest complete one holding ``disk``) and
    its record of ``disk``; InvalidInputError if there is none, or it is not complete."""
    if backup_id is None:
        record = repo.latest(disk)
        if record is None:
            raise InvalidInputError(f"no complete backup of disk {disk} in {repo.base}")
    else:
        record = repo.get(backup_id)
        if not record.complete:
            raise InvalidInputError(f"backup {backup_id} is not complete: it cannot be restored")
    found = record.disk(disk)
    if found is None:
        held = ", ".join(d.name for d in record.disks)
        raise InvalidInputError(f"backup {record.id} has no disk {disk} (it has {held})")
    return record, found


def restore(
    repo: Repository,
    disk: str,
    out: Path,
    backup_id: str | None = None,
    fmt: Format = "qcow2",
) -> RestoreResult:
    """Write disk ``disk`` as it was at backup ``backup_id`` (default: the newest complete
    backup holding it) to the new standalone image ``out``, checked against the digests
    recorded at backup time; an existing ``out`` is never touched."""
    if fmt not in get_args(Format):
        raise InvalidInputError(f"unknown image format {fmt!r}: use qcow2 or raw")
    out = check_new_file(out)
    record, disk_record = select_backup(repo, disk, backup_id)
    what = f"backup {record.id}, disk {disk}"
    expected = recorded_digests(repo, record, disk_record)
    chain = repo.chain(record.id, disk)
    log.info("restore.begin", backup=record.id, disk=disk, out=str(out), fmt=fmt)
    with temporary_file(out.parent, f".{out.name}.restore-") as temp:
        blocks, _ = build_checked(chain, temp, fmt, expected, what)
        link_into_place(temp, out, "during the restore")
    log.info("restore.done", backup=record.id, disk=disk, out=str(out), blocks=blocks)
    return RestoreResult(
        backup_id=record.id,
        disk=disk,
        out=out,
        fmt=fmt,
        virtual_size=disk_record.virtual_size,
        blocks_checked=blocks,
    )
