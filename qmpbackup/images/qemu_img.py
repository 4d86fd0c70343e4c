"""``qemu-img`` on backup image files: info, check, layers, backing links."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

from ..errors import QmpBackupError
from .keyed import SECRET_ID, image_args, key_file, luks_create_options, object_args

# QEMU 7.2's PBKDF2 timing of a LUKS create fails now and then with this (a QEMU bug
# Debian 12's 7.2 carries; see qmpbackup.runner): the command is run again, after a
# pause that grows. Measured with both cores busy: 3 creates in 12 failed so, and CI
# once saw 5 in a row fail.
_LUKS_TIMING = "Unable to get accurate CPU usage"
_LUKS_TRIES = 10


class ImageError(QmpBackupError):
    """``qemu-img`` refused an image or found it damaged."""


def qemu_img(*args: str, ok: Container[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img``; ImageError with its message unless the exit code is in ``ok``.

    Under :func:`~qmpbackup.images.keyed.using_key`, the key's ``secret`` object is given."""
    argv = ["qemu-img", args[0], *object_args(), *args[1:]]
    for attempt in range(1, _LUKS_TRIES + 1):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode in ok or _LUKS_TIMING not in proc.stderr:
            break
        time.sleep(0.05 * attempt)
    if proc.returncode not in ok:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise ImageError(f"qemu-img {args[0]}: {detail}")
    return proc


def image_info(path: Path, fmt: str = "qcow2") -> dict[str, Any]:
    """``qemu-img info`` of ``path`` alone (its backing chain is not opened)."""
    proc = qemu_img("info", "-U", "-f", fmt, "--output=json", str(path))
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def check_image(path: Path, fmt: str = "qcow2") -> dict[str, Any]:
    """``qemu-img check``; ImageError naming ``path`` when it finds corruption."""
    proc = qemu_img("check", "--output=json", *image_args(path, fmt), ok=(0, 1, 2, 3))
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ImageError(f"{path}: {proc.stderr.strip() or 'qemu-img check failed'}") from None
    if proc.returncode in (1, 2) or report.get("corruptions", 0):
        raise ImageError(f"{path}: qemu-img check found {report.get('corruptions', '?')} errors")
    return report


def set_backing_name(path: Path, backing: str | None) -> None:
    """Write ``backing`` (a name relative to ``path``'s folder) into the image header only.

    Used for a push incremental: QEMU wrote exactly the changed clusters into a
    qcow2 opened without a backing chain; naming its parent makes it a link of the chain.
    """
    args = ["-b", backing, "-F", "qcow2"] if backing else ["-b", ""]
    qemu_img("rebase", "-u", *args, *image_args(path))


def top_layer_extents(path: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of what the top layer of ``path`` itself holds (data or zeroes)."""
    proc = qemu_img("map", "--output=json", *image_args(path))
    return [
        (int(e["start"]), int(e["length"]))
        for e in json.loads(proc.stdout)
        if e.get("depth") == 0 and (e.get("data") or e.get("zero")) and e.get("present", True)
    ]


def open_alone(path: Path) -> None:
    """Open the qcow2 image ``path`` without its backing chain, with the key if one is set
    (:mod:`~qmpbackup.images.keyed`): ImageError with QEMU's words if it cannot (a wrong
    key: ``Invalid password, cannot unlock any keyslot``)."""
    spec: dict[str, Any] = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(path)},
        "backing": None,
    }
    if key_file() is not None:
        spec["encrypt"] = {"key-secret": SECRET_ID}
    qemu_img("map", "--output=json", "json:" + json.dumps(spec))


def create_encrypted(path: Path, size: int, backing: str | None = None) -> None:
    """Create ``path``: a LUKS-encrypted qcow2 of ``size`` bytes keyed and stretched as
    :func:`~qmpbackup.images.keyed.luks_create_options` says, ``backing`` (a name
    relative to its folder) as its backing file if given.

    A process of its own, not QEMU's ``blockdev-create``: QEMU times PBKDF2 for about
    2.4 s of CPU before it writes a LUKS header, and a VM's QEMU doing it stops its main
    loop (and the guest's disk I/O) that long. Raises ImageError; ``path`` must not exist.
    """
    options = luks_create_options()
    # -u: the backing file is named, not opened (no key needed for it, no time spent).
    args = ["-b", backing, "-F", "qcow2", "-u"] if backing else []
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, *args, str(path), str(size))
