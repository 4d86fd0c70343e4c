"""Fixtures: a throwaway QEMU with the slides' two disks, and a CLI runner."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from qmpbackup.demo.throwaway import ThrowawayVM, make_slides_images
from qmpbackup.logconfig import configure_logging

from .support import Cli, Loop

configure_logging("console", verbose=False)


@functools.cache
def qemu_version() -> str:
    """The first line of ``qemu-system-x86_64 --version`` of the QEMU in PATH."""
    if shutil.which("qemu-system-x86_64") is None:
        return "no qemu-system-x86_64 in PATH"
    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.splitlines()[0] if out else "qemu-system-x86_64 printed no version"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The real-guest tests' counts of files verified, also when they pass."""
    from .guest import GUEST_REPORT

    if GUEST_REPORT:
        terminalreporter.section("real guest: files verified in restored images")
        for line in GUEST_REPORT:
            terminalreporter.write_line(line)


def pytest_report_header() -> str:
    """Which QEMU the suite runs on (the suite runs once per end of the supported range)."""
    return f"QEMU: {qemu_version()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """A failed test's report says which QEMU it ran on."""
    report: pytest.TestReport = yield
    if report.failed:
        report.sections.append(("QEMU", qemu_version()))
    return report


@pytest.fixture
async def vm(tmp_path: Path) -> AsyncIterator[ThrowawayVM]:
    """QEMU with the slides' disks: Base1 <- Active1.qcow2 (vda), Base2 <- Active2.qcow2 (vdb)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run the README's setup")
    disks = make_slides_images(tmp_path / "vm")
    machine = ThrowawayVM(tmp_path / "vm", disks, name="testvm")
    await machine.start()
    try:
        yield machine
    finally:
        await machine.stop()


@pytest.fixture
def cli(vm: ThrowawayVM, tmp_path: Path) -> Cli:
    """The qmpbackup CLI bound to ``vm`` and a fresh state directory."""
    return Cli(vm, tmp_path / "state")


async def block_state(vm: ThrowawayVM) -> dict[str, Any]:
    """Nodes with their bitmaps, and jobs: what must not change on refused input."""
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    return {
        "nodes": sorted(
            (
                n["node-name"],
                n["drv"],
                str(sorted((b["name"], b["count"]) for b in n.get("dirty-bitmaps", []))),
            )
            for n in nodes
        ),
        "jobs": await vm.session.execute("query-jobs"),
    }


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mounts a tmpfs of a given size under ``tmp_path``; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )
        mounts.append(path)
        return path

    try:
        yield mount
    finally:
        for path in mounts:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def debug_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog entries, with debug level let through whatever configure_logging did before."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(**saved)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[int], Loop]]:
    """Makes loop devices of a given size over files in ``tmp_path``, filled with 0xa5
    (old data a backup or a restore must overwrite); detaches them at teardown."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    made: list[Loop] = []

    def make(size: int) -> Loop:
        backing = tmp_path / f"loop{len(made)}.img"
        backing.write_bytes(b"\xa5" * size)
        proc = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            pytest.skip(f"no loop device on this machine: {proc.stderr.strip()}")
        made.append(Loop(proc.stdout.strip(), backing))
        return made[-1]

    try:
        yield make
    finally:
        for loop in made:
            subprocess.run(["losetup", "-d", loop.device], check=False)
