"""A repository filesystem that fills up during a one-shot backup: at the copy, at the
seal of a disk, at the commit; push and pull, full and incremental. Each gives one
line naming the file (and the disk where there is one), and leaves the repository's
files and the VM's checkpoints and bitmaps as they were; the next run works."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.errors import QmpBackupError
from qmpbackup.repo.backup import backup_to_repository
from qmpbackup.repo.events import BackupEvent
from qmpbackup.repo.repository import Repository
from qmpbackup.repo.verify import verify

from .support import Cli

MiB = 1 << 20


def fill(folder: Path, leave: int = 0) -> Path:
    """Take all the free space of ``folder``'s filesystem but ``leave`` bytes."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as handle:
        stat = os.statvfs(folder)
        room = stat.f_bavail * stat.f_frsize - leave
        if room > 0:
            os.posix_fallocate(handle.fileno(), os.fstat(handle.fileno()).st_size, room)
        if not leave:
            with contextlib.suppress(OSError):
                while True:
                    os.write(handle.fileno(), bytes(4096))
    return filler


def files_of(root: Path) -> dict[str, str]:
    """Every file of the repository (lock files and the filler aside) and its hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in {".lock", ".run.lock", "filler"}
    }


async def qemu_bitmaps(vm: ThrowawayVM) -> list[tuple[str, str]]:
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    found = [(n["node-name"], b.get("name", "")) for n in nodes for b in n.get("dirty-bitmaps", [])]
    return sorted(found)


async def state_of(vm: ThrowawayVM, api: VM, root: Path) -> tuple[Any, ...]:
    jobs = await vm.session.execute("query-jobs")
    return files_of(root), [c.name for c in api.checkpoints()], await qemu_bitmaps(vm), jobs


# Where the filesystem fills: the event after which no byte is left, and what must be
# named. "copy" fills it before the run (the data cannot fit); "seal" once vda is
# sealed (vdb's digests file cannot be written); "commit" once both are (the record).
POINTS = {"copy": None, "seal": ("disk-done", "vda"), "commit": ("disk-done", "vdb")}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("level", ["full", "inc"])
@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_a_full_repository_changes_nothing(
    vm: ThrowawayVM,
    tmp_path: Path,
    tmpfs: Callable[[str, str], Path],
    mode: str,
    level: str,
    point: str,
) -> None:
    root = tmpfs("repo", "24M")
    repo = Repository(root, "testvm")
    async with await VM.connect(str(vm.qmp_path), tmp_path / "state") as api:
        if level == "inc":
            await backup_to_repository(api, root, level="full", mode=mode)  # type: ignore[arg-type]
            # More than the room left below, so that an incremental copy cannot fit.
            await vm.write("vda", 0x5C, 20 * MiB, 4 * MiB)
        before = await state_of(vm, api, root)
        filler = fill(root, leave=MiB) if point == "copy" else None
        when = POINTS[point]

        def on_event(event: BackupEvent) -> None:
            if when is not None and (event.kind, event.disk) == when:
                fill(root)

        with pytest.raises(QmpBackupError) as info:
            await backup_to_repository(
                api,
                root,
                level=level,  # type: ignore[arg-type]
                mode=mode,  # type: ignore[arg-type]
                on_event=on_event,
            )
        message = str(info.value)
        assert "\n" not in message and os.strerror(errno.ENOSPC) in message, message
        if point == "seal":
            assert "disk vdb: cannot write " in message and f"{root}/testvm/vdb/" in message
        elif point == "commit":
            assert f"cannot write {root}/testvm/backups/" in message, message
        else:
            assert "vda" in message and f"{root}/testvm/vda/" in message, message
        (filler or root / "filler").unlink()
        assert await state_of(vm, api, root) == before
        # With room again, the next run works and chains as it would have.
        done = await backup_to_repository(api, root, mode=mode)  # type: ignore[arg-type]
        assert {d.level for d in done.decisions} == ({"full"} if level == "full" else {"inc"})
    assert verify(repo).problems == []


async def test_the_cli_says_it_in_one_line(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, tmpfs: Callable[[str, str], Path]
) -> None:
    root = tmpfs("repo", "2M")  # vda's 5 MiB of data cannot fit
    for mode in ("push", "pull"):
        failed = await cli("backup", "--repo", str(root), "--mode", mode)
        lines = failed.err.strip().splitlines()
        assert failed.rc == 1 and len(lines) == 1, failed.err
        assert lines[0].startswith("error: ") and "vda" in lines[0], lines
        assert os.strerror(errno.ENOSPC) in lines[0], lines
        assert files_of(root) == {}
