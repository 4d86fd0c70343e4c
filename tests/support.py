"""Helpers shared by the tests that drive a real QEMU."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.repo.repository import Repository

CLUSTER = 65536


@dataclass
class CliResult:
    """Exit status and output of one ``qmpbackup`` run."""

    rc: int
    out: str
    err: str

    def qmp_commands(self) -> list[dict[str, Any]]:
        """The QMP commands logged (needs ``-v --log-format json``)."""
        found = []
        for line in self.err.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "qmp.command":
                found.append({"execute": entry["execute"], "arguments": entry["arguments"]})
        return found


class Cli:
    """Runs the ``qmpbackup`` CLI against one VM and state directory."""

    def __init__(self, vm: ThrowawayVM, state_dir: Path, qmp: Path | None = None) -> None:
        self.vm = vm
        self.state_dir = state_dir
        self.qmp = qmp  # another socket in front of the VM's (default: the VM's own)

    async def __call__(self, *args: str, verbose: bool = False) -> CliResult:
        argv = [sys.executable, "-m", "qmpbackup", "--qmp", str(self.qmp or self.vm.qmp_path)]
        argv += ["--state-dir", str(self.state_dir)]
        if verbose:
            argv += ["-v", "--log-format", "json"]
        proc = await asyncio.create_subprocess_exec(
            *argv, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(), err.decode())

    async def ok(self, *args: str, verbose: bool = False) -> CliResult:
        """Run and require exit 0."""
        result = await self(*args, verbose=verbose)
        assert result.rc == 0, f"qmpbackup {' '.join(args)} -> {result.rc}: {result.err}"
        return result

    async def finish(self, backup_id: int = 1, timeout: float = 60) -> CliResult:
        """The slides' loop: ``backup-end`` until it no longer says still active."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = await self("backup-end", str(backup_id))
            if "still active" not in result.err:
                assert result.rc == 0, result.err
                return result
            assert loop.time() < deadline, "backup did not finish"
            await asyncio.sleep(0.1)


def _mapped_clusters(
    image: Path | str, fmt: str, keep: Callable[[dict[str, Any]], bool]
) -> set[int]:
    """Cluster indexes of the ``qemu-img map`` extents that ``keep`` accepts."""
    proc = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", "-f", fmt, str(image)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    clusters: set[int] = set()
    for extent in json.loads(proc.stdout):
        if keep(extent):
            start, end = extent["start"], extent["start"] + extent["length"]
            clusters.update(range(start // CLUSTER, (end + CLUSTER - 1) // CLUSTER))
    return clusters


def allocated_clusters(image: Path | str, fmt: str = "qcow2") -> set[int]:
    """Cluster indexes allocated in ``image``'s own top layer (data or zero flag)."""
    return _mapped_clusters(
        image, fmt, lambda e: e["depth"] == 0 and bool(e.get("present", e["data"]))
    )


def data_clusters(image: Path | str, fmt: str = "qcow2") -> set[int]:
    """Cluster indexes of ``image`` that hold data (not holes, not zero clusters)."""
    return _mapped_clusters(image, fmt, lambda e: e["data"] and not e.get("zero", False))


def clusters_of(offset: int, length: int) -> set[int]:
    """Cluster indexes covered by a write."""
    return set(range(offset // CLUSTER, (offset + length + CLUSTER - 1) // CLUSTER))


def qemu_img_info(image: Path | str) -> dict[str, Any]:
    """``qemu-img info --output=json``."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def rebase(image: Path, backing: Path) -> None:
    """``qemu-img rebase -u``: make ``backing`` the backing file of ``image``."""
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(image)],
        check=True,
    )


def repo_hashes(repo: Repository) -> dict[str, str]:
    """SHA-256 of every image and digests file of the repository (markers and locks aside)."""
    return {
        str(p.relative_to(repo.base)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.base.rglob("*"))
        if p.is_file() and p.suffix in (".qcow2", ".digests")
    }


@dataclass(frozen=True)
class Loop:
    """A loop device and the file under it."""

    device: str
    backing: Path

    def digest(self) -> str:
        return hashlib.sha256(self.backing.read_bytes()).hexdigest()

    def allocated(self) -> int:
        """Bytes of the backing file on disk (a punched hole takes none)."""
        return os.stat(self.backing).st_blocks * 512
