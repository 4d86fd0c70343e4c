"""qmpbackup: libvirt's backup API for bare QEMU, over QMP."""

from __future__ import annotations

__version__ = "0.1.0"
