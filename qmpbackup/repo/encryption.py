"""Whether a backup may go into a VM's repository as asked: encrypted or in the clear.

The first backup of a VM decides (``--encrypt-key``, recorded in each record's
``encryption``); a later run must ask the same, and its key must open the newest image
of the repository, checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidInputError
from ..images.keyed import using_key
from ..images.qemu_img import ImageError, open_alone
from .records import RepositoryError
from .repository import Repository


def check_encryption(repo: Repository, key: Path | None) -> None:
    """Refuse a backup into ``repo`` that would not be encrypted as its backups are, or a
    key that does not open the newest image.

    Raises InvalidInputError or RepositoryError with one line; writes nothing.
    """
    check_key_file(key)
    done = [r for r in repo.backups() if r.complete]
    if not done:
        return
    newest = max(done, key=lambda r: r.seq)
    encrypted = newest.encryption is not None
    if encrypted and key is None:
        raise RepositoryError(
            f"the repository of {repo.vm} is encrypted: give its --encrypt-key FILE"
        )
    if not encrypted and key is not None:
        raise RepositoryError(
            f"the repository of {repo.vm} is not encrypted: its chains cannot take "
            "encrypted images (back up into a new repository with --encrypt-key)"
        )
    if key is None:
        return
    disk = newest.disks[0]
    image = repo.image_path(newest, disk.name)
    with using_key(key):
        try:
            open_alone(image)
        except ImageError as exc:
            raise RepositoryError(f"--encrypt-key {key} does not open {image}: {exc}") from None


def check_key_file(key: Path | None) -> None:
    """Refuse a key file QEMU cannot use as a LUKS passphrase: missing, empty, or not
    UTF-8 (QEMU's secrets are text). Raises InvalidInputError with one line."""
    if key is None:
        return
    try:
        data = key.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"--encrypt-key {key}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problem = "not UTF-8 text (QEMU's secrets are text)"
    else:
        problem = "" if text.strip() else "empty"
    if problem:
        raise InvalidInputError(
            f"--encrypt-key {key}: {problem}; make a key with 'openssl rand -base64 32 > FILE'"
        )


def require_key(repo: Repository, key: Path | None) -> None:
    """Refuse to read an encrypted repository without its key (one line)."""
    check_key_file(key)
    if key is None and any(r.encryption is not None for r in repo.backups(complete_only=False)):
        raise RepositoryError(
            f"the repository of {repo.vm} is encrypted: give its --encrypt-key FILE"
        )
