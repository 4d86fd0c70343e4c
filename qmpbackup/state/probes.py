"""What probes of a VM's QEMU found out, kept per QEMU build in the state directory.

A behaviour no schema shows (see :mod:`qmpbackup.planner.probe`) is probed once per
build (``query-version``'s version and package) and remembered here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text


class ProbeResults:
    """``<state dir>/probes.json``: per QEMU build, what each probe found."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "probes.json"

    def _all(self) -> dict[str, dict[str, bool]]:
        try:
            found: dict[str, dict[str, bool]] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return found

    def get(self, build: str, probe: str) -> bool | None:
        """What ``probe`` found on ``build``, if it ran there."""
        return self._all().get(build, {}).get(probe)

    def remember(self, build: str, probe: str, found: bool) -> None:
        """Keep what ``probe`` found on ``build`` (atomically)."""
        results = self._all()
        results.setdefault(build, {})[probe] = found
        atomic_write_text(self.path, json.dumps(results, indent=2, sort_keys=True))
