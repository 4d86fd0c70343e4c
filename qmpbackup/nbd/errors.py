"""The error the NBD client raises."""

from __future__ import annotations

from qmpbackup.errors import QmpBackupError


class NBDError(QmpBackupError):
    """An NBD connection, negotiation or command failed; ``str()`` is one line, ``nbd: ...``."""
