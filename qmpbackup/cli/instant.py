"""What ``restore --instant`` prints: the overlay, the QEMU options that open it, and
how to finish with ``blockpull``."""

from __future__ import annotations

from pathlib import Path

from ..images.keyed import SECRET_ID
from ..repo.instant import InstantRestore
from .progress import human_size


def _opt(value: str) -> str:
    """``value`` as a QEMU option value: commas doubled."""
    return value.replace(",", ",,")


def qemu_options(made: InstantRestore, key_file: Path | None) -> list[str]:
    """The ``-object``/``-blockdev``/``-device`` options (one per line) attaching the
    overlay as disk ``made.marker.disk``. A plain chain is opened by QEMU from the
    overlay's header, read-only below it; an encrypted one is spelled out layer by layer,
    each naming the key's ``secret`` object (``encrypt.key-secret``)."""
    marker = made.marker
    disk = marker.disk
    lines: list[str] = []
    backing = ""
    if marker.encrypted:
        key = Path(key_file or "KEY").absolute()
        lines.append(f"-object secret,id={SECRET_ID},file={_opt(str(key))}")
        for level, image in enumerate(marker.chain):
            node = f"{disk}-backing{level}"
            lines.append(
                f"-blockdev driver=file,node-name={node}-file,filename={_opt(image)},read-only=on"
            )
            below = f",backing={disk}-backing{level - 1}" if level else ""
            lines.append(
                f"-blockdev driver=qcow2,node-name={node},file={node}-file{below},"
                f"read-only=on,encrypt.format=luks,encrypt.key-secret={SECRET_ID}"
            )
        backing = f",backing={disk}-backing{len(marker.chain) - 1}"
    lines.append(f"-blockdev driver=file,node-name={disk}-file,filename={_opt(marker.overlay)}")
    lines.append(f"-blockdev driver=qcow2,node-name={disk},file={disk}-file{backing}")
    lines.append(f"-device virtio-blk,drive={disk},id={disk}")
    return lines


def instant_text(made: InstantRestore, key_file: Path | None) -> list[str]:
    """Every line ``restore --instant`` prints."""
    marker = made.marker
    layers = len(marker.chain)
    lines = [
        f"Disk {marker.disk} of backup {marker.backup} instantly restored to {marker.overlay} "
        f"({human_size(made.virtual_size)}, backed read-only by {layers} "
        f"image{'s' if layers > 1 else ''} of the repository, in {made.seconds * 1e3:.0f} ms)",
        "Start QEMU on it with:",
    ]
    lines += [f"  {line}" for line in qemu_options(made, key_file)]
    lines += [
        "then, while the guest runs, copy the rest into it and drop the repository from its "
        "backing chain with:",
        f"  qmpbackup --qmp SOCK blockpull {marker.disk} --wait",
        "until then the repository keeps the backups it reads (prune refuses to remove them)",
    ]
    return lines
