"""Who holds a repository's run lock, in the refusal a second run gets.

The run lock (``<repo>/<vm>/.run.lock``, flock(2)) lets one backup or prune of a VM run
at a time, from any host sharing the repository; the holder writes its host, pid and
start time into it, so that the second run can name the first.
"""

from __future__ import annotations

import socket
from pathlib import Path

from .records import RepositoryError


def run_lock_busy(base: Path, lock: Path, holder: str) -> RepositoryError:
    """The refusal of a second run on one VM's backups, naming the first (its host, pid
    and start time); a lock of a host that is down is explained with how to clear it."""
    if not holder:
        return RepositoryError(f"another qmpbackup run is using the repository {base}")
    here = f"host {socket.gethostname()},"
    stale = (
        ""
        if holder.startswith(here)
        else f"; if that host is down and its lock outlived it (an NFSv3 server keeps it "
        f"until the host comes back), remove {lock} to clear it"
    )
    return RepositoryError(f"another qmpbackup run is using the repository {base}: {holder}{stale}")
