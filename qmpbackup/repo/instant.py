"""``restore --instant``: a thin qcow2 overlay on a backup's chain, and its marker.

The overlay is created by ``qemu-img create -u`` (nothing of the chain is read, so
it takes the same few milliseconds whatever the disk's size or encryption). Its
backing file is the backup's image by its absolute path: the overlay is what a user
moves (next to the VM's other images), while the repository stays put during the
pull, which its marker pins. Inside the repository the chain's links stay relative.

The repository is never written through the overlay: QEMU and ``qemu-img`` open
backing files read-only, and the chain's images are also made read-only here
(``chmod a-w``): nothing of the repository writes a committed image again (a backup
creates new files, prune replaces an image by renaming a new file onto it, removal
needs only the folder), so it costs the repository nothing, and it guards against a
``-blockdev`` that would open a backing file ``read-only=off`` or a ``qemu-img
commit``. It is best effort: an image this user does not own is left as it is.

A marker ``<repo>/<vm>/.instant/<backup>.<disk>.<hash>.json`` names the overlay and
the chain it reads. It is written before the overlay appears, so no overlay reads the
repository unmarked. ``prune`` refuses to remove or replace an image a marker holds;
``blockpull`` removes the marker once the overlay is standalone. A marker is stale
when its overlay is gone or no longer backed by the repository (``qemu-img info -U``
of its backing chain); ``prune --clear-stale-instant`` removes stale markers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict

from ..files import atomic_write_text
from ..images.qemu_img import ImageError, qemu_img
from .records import RepositoryError
from .repository import Repository
from .restore import check_new_file, link_into_place, select_backup, temporary_file

log = structlog.get_logger("qmpbackup.instant")

INSTANT_DIR = ".instant"


class Marker(BaseModel):
    """What one instant restore reads: the overlay, and the chain's files (base first)."""

    model_config = ConfigDict(frozen=True)

    overlay: str
    backup: str
    disk: str
    vm: str
    chain: tuple[str, ...]
    encrypted: bool = False
    created: float


@dataclass(frozen=True)
class InstantRestore:
    """What :func:`instant_restore` made: the overlay, the chain it reads, the marker."""

    marker: Marker
    marker_path: Path
    virtual_size: int
    seconds: float


@dataclass(frozen=True)
class MarkerState:
    """A marker and whether its overlay still reads the repository (``why`` says why not)."""

    marker: Marker
    path: Path
    why_stale: str | None


def marker_dir(repo: Repository) -> Path:
    """Where ``repo``'s instant-restore markers are."""
    return repo.base / INSTANT_DIR


def _marker_path(repo: Repository, backup: str, disk: str, overlay: Path) -> Path:
    digest = hashlib.sha256(str(overlay).encode()).hexdigest()[:16]
    return marker_dir(repo) / f"{backup}.{disk}.{digest}.json"


def _read_only(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode
            if mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def instant_restore(
    repo: Repository, disk: str, out: Path, backup_id: str | None = None
) -> InstantRestore:
    """Create ``out``, a new qcow2 whose backing chain is disk ``disk`` of backup
    ``backup_id`` (default: the newest complete one holding it), and its marker.
    TargetExistsError when ``out`` exists, InvalidInputError for a bad backup or disk,
    RepositoryError for a broken chain or a prune running, ImageError from qemu-img."""
    started = time.monotonic()
    out = check_new_file(out)
    # The run lock: no prune removes the chain between the check and the marker.
    with repo.exclusive():
        record, entry = select_backup(repo, disk, backup_id)
        chain = repo.chain(record.id, disk)  # refuses a broken chain
        marker = Marker(
            overlay=str(out), backup=record.id, disk=disk, vm=repo.vm,
            chain=tuple(str(p) for p in chain), encrypted=record.encryption is not None,
            created=time.time(),
        )  # fmt: skip
        path = _marker_path(repo, record.id, disk, out)
        atomic_write_text(path, marker.model_dump_json(indent=2) + "\n")
        try:
            _create_overlay(out, chain[-1], entry.virtual_size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        _read_only(chain)
    seconds = time.monotonic() - started
    log.info("instant.created", backup=record.id, disk=disk, out=str(out), seconds=seconds)
    return InstantRestore(marker, path, entry.virtual_size, seconds)


def _create_overlay(out: Path, top: Path, size: int) -> None:
    """``out``: a qcow2 of ``size`` bytes backed by ``top``, made under a temporary name
    and linked into place, so that it never replaces a file that appeared meanwhile."""
    with temporary_file(out.parent, f".{out.name}.instant-") as temp:
        # -u: the chain is not opened (an encrypted one would need the key for nothing).
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", str(top),
                 str(temp), str(size))  # fmt: skip
        link_into_place(temp, out, "meanwhile")


def _backing_files(overlay: Path) -> list[str] | None:
    """The files ``overlay``'s backing chain opens (overlay excluded), or None when
    ``qemu-img`` cannot read it."""
    try:
        proc = qemu_img("info", "-U", "--backing-chain", "--output=json", str(overlay))
    except ImageError:
        return None
    layers = json.loads(proc.stdout)
    layers = layers if isinstance(layers, list) else [layers]
    return [str(Path(layer["filename"]).resolve()) for layer in layers[1:]]


def marker_states(repo: Repository) -> list[MarkerState]:
    """Every marker of ``repo``, each with why it is stale (None: its overlay still reads
    the repository). RepositoryError for a marker that cannot be read."""
    folder = marker_dir(repo)
    if not folder.is_dir():
        return []
    found: list[MarkerState] = []
    for path in sorted(folder.glob("*.json")):
        try:
            marker = Marker.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"instant-restore marker {path}: {exc}") from None
        found.append(MarkerState(marker, path, _why_stale(marker)))
    return found


def _why_stale(marker: Marker) -> str | None:
    overlay = Path(marker.overlay)
    if not overlay.exists():
        return f"its overlay {overlay} is gone"
    backing = _backing_files(overlay)
    if backing is None:
        return f"{overlay} is no longer a qcow2 image qemu-img can read"
    chain = {str(Path(p).resolve()) for p in marker.chain}
    if not chain & set(backing):
        return f"{overlay} no longer reads the repository (its backing chain left it)"
    return None


def check_prune(
    repo: Repository, touched: Iterable[Path], clear_stale: bool, dry_run: bool
) -> list[str]:
    """Refuse a prune that would remove or replace an image of ``touched`` an instant
    restore reads (RepositoryError, naming the overlay); the lines explaining stale
    markers, which ``clear_stale`` removes (unless ``dry_run``)."""
    touched_set = {str(p.resolve()) for p in touched}
    lines: list[str] = []
    for state in marker_states(repo):
        held = touched_set & {str(Path(p).resolve()) for p in state.marker.chain}
        what = f"backup {state.marker.backup}, disk {state.marker.disk}"
        if state.why_stale is None:
            if held:
                raise RepositoryError(
                    f"{what} is read by the instant restore {state.marker.overlay}: finish it "
                    f"with 'qmpbackup --qmp SOCK blockpull {state.marker.disk} --wait' first"
                )
            continue
        if clear_stale:
            if not dry_run:
                state.path.unlink(missing_ok=True)
            done = "would be cleared" if dry_run else "cleared"
            lines.append(f"Stale instant-restore marker of {what} {done}: {state.why_stale}")
        elif held:
            raise RepositoryError(
                f"{what} has a stale instant-restore marker ({state.why_stale}): "
                "pass --clear-stale-instant to clear it"
            )
        else:
            lines.append(
                f"Stale instant-restore marker of {what}: {state.why_stale} "
                "(--clear-stale-instant clears it)"
            )
    return lines


def release_markers(overlay: str, backing: Iterable[str]) -> list[Path]:
    """Remove the markers naming ``overlay`` in the repositories its former backing files
    ``backing`` were in, once it no longer reads them; the markers removed."""
    removed: list[Path] = []
    overlay_path = str(Path(overlay).resolve())
    folders = {Path(b).resolve().parent.parent / INSTANT_DIR for b in backing}
    for folder in sorted(folders):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                marker = Marker.model_validate_json(path.read_text())
                if str(Path(marker.overlay).resolve()) == overlay_path and _why_stale(marker):
                    path.unlink()
                    removed.append(path)
                    log.info("instant.released", marker=str(path), overlay=overlay)
    return removed
