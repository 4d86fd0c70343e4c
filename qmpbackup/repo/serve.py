"""``serve``: one disk of a backup, read-only over NBD, and which backup holds each cluster.

The chain is the repository's own images, opened read-only by ``qemu-nbd``
(:mod:`qmpbackup.images.nbd_server`); nothing in the repository is written. Its
``qemu:allocation-depth`` context counts layers from the top: depth 1 is the chosen
backup's image, the last depth the full backup, 0 a cluster no layer holds (zeroes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..images.nbd_server import Listen, Serving, serving
from ..request.models import Level
from .records import BackupRecord
from .repository import Repository
from .restore import select_backup

log = structlog.get_logger("qmpbackup.serve")


@dataclass(frozen=True)
class Layer:
    """One image of the served chain: its ``qemu:allocation-depth``, backup and file."""

    depth: int
    backup_id: str
    level: Level
    image: Path


@dataclass(frozen=True)
class Served:
    """What :func:`serve` serves: the backup, the disk, its size, the layers (top first)
    and the running server."""

    record: BackupRecord
    disk: str
    virtual_size: int
    layers: tuple[Layer, ...]
    server: Serving


def layers(repo: Repository, disk: str, backup_id: str) -> tuple[Layer, ...]:
    """The chain of ``disk`` at ``backup_id``, top first, each image with the depth
    ``qemu:allocation-depth`` gives it. RepositoryError if the chain is broken."""
    images = repo.chain(backup_id, disk)[::-1]  # checks the chain's links
    found: list[Layer] = []
    current: str | None = backup_id
    for depth, image in enumerate(images, start=1):
        assert current is not None  # repo.chain walked the same parents
        entry = repo.disk_record(repo.get(current), disk)
        found.append(Layer(depth, current, entry.level, image))
        current = entry.parent
    return tuple(found)


@contextmanager
def serve(repo: Repository, disk: str, backup_id: str | None, where: Listen) -> Iterator[Served]:
    """Serve ``disk`` as it was at backup ``backup_id`` (default: the newest complete one
    holding it) read-only over NBD, export named ``disk``, until leaving. Everything is
    checked before the server starts: InvalidInputError for a missing disk or backup or
    a bad ``where``, RepositoryError for a broken chain, ImageError if qemu-nbd fails."""
    record, entry = select_backup(repo, disk, backup_id)
    chain = layers(repo, disk, record.id)
    with serving(chain[0].image, disk, where) as server:
        log.info("serve.ready", backup=record.id, disk=disk, layers=len(chain))
        yield Served(record, disk, entry.virtual_size, chain, server)
