"""``qmpbackup demo``: the slides' flows on a throwaway QEMU, every result checked.

It builds the slides' two disks, starts QEMU, and walks Part II (full push
backup), Part III (full pull backup read by ``qemu-img`` and by the built-in
NBD client) and Part IV (checkpoint size, then the incremental chain and the
differential, in push and in pull mode) through :class:`qmpbackup.api.VM`,
printing each QMP command and checking each backup with ``qemu-img``.

This module runs the walk; the sections are in :mod:`.push` and :mod:`.pull`,
the chain they share in :mod:`.chain`, the stage they act on in :mod:`.stage`,
and what they print and check in :mod:`.show`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..api import VM
from ..errors import InvalidInputError, QmpBackupError
from . import pull, push
from .show import CheckFailed, header, say
from .stage import Demo
from .throwaway import ThrowawayVM, make_slides_images, remove_tree


def prepare_workdir(workdir: Path | None) -> Path:
    """A new temporary directory, or ``workdir`` if it is missing or empty."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="qmpbackup-demo-"))
    workdir = workdir.absolute()
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise InvalidInputError(f"work directory {workdir} is not an empty directory")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


async def walk(demo: Demo) -> None:
    """Every slide section, in order."""
    await push.setup(demo)
    await push.push_full(demo)
    await push.checkpoint_size(demo)
    await push.push_chain(demo)
    await pull.pull_full(demo)
    await pull.pull_chain(demo)


async def run_demo(workdir: Path | None, keep: bool = False, verbose: bool = False) -> int:
    """Run the demo in ``workdir`` (default: a new temporary directory); 0 when every check held."""
    workdir = prepare_workdir(workdir)
    status = 1
    try:
        header("Setup: the slides' two disks on a throwaway QEMU")
        say(f"work directory: {workdir}")
        machine = ThrowawayVM(workdir, make_slides_images(workdir), name="qmpbackup-demo")
        try:
            await machine.start()
            vm = await VM.connect(str(machine.qmp_path), workdir / "state")
            try:
                await walk(Demo(workdir, machine, vm, verbose))
                status = 0
            finally:
                await vm.close()
        except CheckFailed as failed:
            say(f"FAILED: {failed}")
        except QmpBackupError as error:
            say(f"FAILED: {error}")
        finally:
            await machine.stop()
            say()
            say("QEMU stopped")
    finally:
        if keep:
            say(f"work directory kept: {workdir}")
        else:
            remove_tree(workdir)
            say(f"work directory removed{'' if status == 0 else ' (rerun with --keep to inspect)'}")
    if status == 0:
        say("all checks passed")
    return status


__all__ = ["run_demo"]
