"""``recover`` against a real QEMU: an orchestrator killed at every cut point of a push
and of a pull incremental plan leaves nothing behind once ``recover`` has run, and the
next incremental is correct."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.api import VM
from qmpbackup.demo.throwaway import ThrowawayVM, images_equal
from qmpbackup.errors import DisconnectedError, LeftoversError
from qmpbackup.images.pull_copy import pull_copy
from qmpbackup.request import load_backup_spec
from qmpbackup.request.models import CheckpointSpec

from .qmp_cutter import QmpCutter
from .support import Cli, rebase
from .test_pull_backup import pull_xml, uris
from .test_push_backup import push_xml

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


async def qemu_state(vm: ThrowawayVM) -> dict[str, Any]:
    """Nodes with their bitmaps, jobs, exports and objects."""
    nodes = await vm.session.execute("query-named-block-nodes", {"flat": True})
    objects = await vm.session.execute("qom-list", {"path": "/objects"})
    return {
        "nodes": sorted(
            (n["node-name"], sorted((b["name"], b["count"]) for b in n.get("dirty-bitmaps", [])))
            for n in nodes
        ),
        "jobs": await vm.session.execute("query-jobs"),
        "exports": await vm.session.execute("query-block-exports"),
        "objects": sorted(o["name"] for o in objects),
    }


async def cut(cli: Cli, spec: Path, checkpoint: str, step: int | str) -> None:
    """Run backup-begin in a child process that dies by SIGKILL before step ``step``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.cut_runner", str(cli.vm.qmp_path), str(cli.state_dir),
        str(spec), checkpoint, str(step), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()


def state_files(state_dir: Path) -> list[str]:
    """Files in the state directory apart from checkpoint metadata and locks."""
    return sorted(
        str(p.relative_to(state_dir))
        for p in state_dir.rglob("*")
        if p.is_file() and p.parent.name != "checkpoints" and p.name not in ("lock", "nbd.sock")
    )


async def cut_everywhere(
    vm: ThrowawayVM, cli: Cli, spec: Path, steps: int, leftovers: list[Path]
) -> None:
    """Cut the plan before each of its steps and before its state is saved; recover;
    compare with the state before."""
    before = await qemu_state(vm)
    files = state_files(cli.state_dir)
    points: list[int | str] = [*range(steps), "save"]
    async with await VM.connect(str(vm.qmp_path), cli.state_dir) as api:
        checkpoints = api.checkpoints()
    for step in points:
        await cut(cli, spec, "c2", step)
        if step == steps // 2:
            refused = await cli("backup-begin", str(spec), "c2")
            assert refused.rc == 1 and "run 'qmpbackup recover' first" in refused.err
            assert "Recovered" in (await cli.ok("recover")).out
        else:
            # QEMU's monitor takes one client: connect once the cut run is dead.
            async with await VM.connect(str(vm.qmp_path), cli.state_dir) as api:
                # Even a cut before the first step leaves an open journal: begin refuses.
                with pytest.raises(LeftoversError, match="run 'qmpbackup recover' first"):
                    await api.backup_begin(load_backup_spec(spec), CheckpointSpec(name="c2"))
                assert (await api.recover()).needed, step
                assert not (await api.recover()).needed, step
                assert api.checkpoints() == checkpoints, step
        assert await qemu_state(vm) == before, f"cut before step {step}"
        assert state_files(cli.state_dir) == files, step
        assert not [p for p in leftovers if p.exists()], step
    assert "Nothing to recover" in (await cli.ok("recover")).out


async def test_push_incremental_cut_at_every_step(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    await vm.write("vda", 0x11, MiB, MiB)
    full_a, full_b = tmp_path / "full-a.qcow2", tmp_path / "full-b.qcow2"
    full = push_xml(tmp_path / "full.xml", {"vda": (full_a, "qcow2", False),
                                            "vdb": (full_b, "qcow2", False)})  # fmt: skip
    await cli.ok("backup-begin", str(full), "c1")
    await cli.finish(1)
    await vm.write("vda", 0x22, 3 * MiB, 128 * 1024)
    await vm.write("vdb", 0x23, 5 * MiB, 64 * 1024)
    inc_a, inc_b = tmp_path / "inc-a.qcow2", tmp_path / "inc-b.qcow2"
    inc = push_xml(tmp_path / "inc.xml", {"vda": (inc_a, "qcow2", False),
                                          "vdb": (inc_b, "qcow2", False)}, "c1")  # fmt: skip
    plan = json.loads((await cli.ok("plan", str(inc), "c2")).out)
    assert len(plan) >= 5

    await cut_everywhere(vm, cli, inc, len(plan), [inc_a, inc_b])

    ref_a = await vm.reference("vda", tmp_path / "a.raw")
    ref_b = await vm.reference("vdb", tmp_path / "b.raw")
    await cli.ok("backup-begin", str(inc), "c2")
    await cli.finish(1)
    rebase(inc_a, full_a)
    rebase(inc_b, full_b)
    assert images_equal(inc_a, ref_a) and images_equal(inc_b, ref_b)
    assert "c2" in (await cli.ok("checkpoint-list", "--name")).out.split()


async def pull_full_then_plan_incremental(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """A pull full of vda (checkpoint c1), a guest write, then the pull incremental from
    c1: the full's image, the incremental's spec and its plan."""
    await vm.write("vda", 0x31, MiB, MiB)
    full = pull_xml(tmp_path / "full.xml")
    begun = await cli.ok("backup-begin", str(full), "c1")
    base_a = tmp_path / "full-a.qcow2"
    pull_copy(uris(begun.out)["vda"], base_a)
    await cli.ok("backup-end", "1")
    await vm.write("vda", 0x32, 7 * MiB, 192 * 1024)
    inc = pull_xml(tmp_path / "inc.xml", incremental="c1")
    return base_a, inc, json.loads((await cli.ok("plan", str(inc), "c2")).out)


async def test_pull_incremental_cut_at_every_step(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    base_a, inc, plan = await pull_full_then_plan_incremental(vm, cli, tmp_path)
    assert any(c["execute"] == "nbd-server-start" for c in plan)

    await cut_everywhere(vm, cli, inc, len(plan), [])

    ref_a = await vm.reference("vda", tmp_path / "a.raw")
    begun = await cli.ok("backup-begin", str(inc), "c2")  # the server was stopped
    inc_a = tmp_path / "inc-a.qcow2"
    pull_copy(uris(begun.out)["vda"], inc_a, backing=base_a, bitmap="backup-vda")
    await cli.ok("backup-end", "1")
    assert images_equal(inc_a, ref_a)


async def drop_everywhere(
    vm: ThrowawayVM, cli: Cli, spec: Path, plan: list[dict[str, Any]], when: str
) -> None:
    """Drop the QMP connection at each command of ``plan`` (``before`` QEMU gets it or
    ``after`` it ran, its reply lost): one line that names ``recover``, and ``recover``
    brings back the state from before."""
    before = await qemu_state(vm)
    files = state_files(cli.state_dir)
    proxy = cli.state_dir.parent / "cut.sock"
    proxied = Cli(vm, cli.state_dir, qmp=proxy)
    for step, command in enumerate(plan):

        def match(message: dict[str, Any], command: dict[str, Any] = command) -> bool:
            return message.get("execute") == command["execute"] and message.get(
                "arguments", {}
            ) == command.get("arguments", {})

        # Steps of different disks go side by side: the error names one in flight.
        message = re.compile(
            r"lost the connection to QEMU during (?P<execute>[a-z-]+): what was done is "
            r"left in QEMU; run 'qmpbackup recover'"
        )
        async with QmpCutter(proxy, vm.qmp_path, match, when) as cutter:  # type: ignore[arg-type]
            if step == 0:  # the CLI's one line, once; in-process after that (faster)
                failed = await proxied("backup-begin", str(spec), "c2")
                assert failed.rc == 1 and failed.err.startswith("error: "), failed.err
                found = message.fullmatch(failed.err[len("error: ") :].rstrip("\n"))
            else:
                api = await VM.connect(str(proxy), cli.state_dir)
                with pytest.raises(DisconnectedError) as info:
                    await api.backup_begin(load_backup_spec(spec), CheckpointSpec(name="c2"))
                await api.close()
                found = message.fullmatch(str(info.value))
            assert found and found["execute"] in {c["execute"] for c in plan}, step
        assert cutter.cut_seen.is_set(), step
        async with await VM.connect(str(vm.qmp_path), cli.state_dir) as api:
            assert (await api.recover()).needed, step
        assert await qemu_state(vm) == before, f"cut {when} step {step}"
        assert state_files(cli.state_dir) == files, step


@pytest.mark.parametrize("when", ["before", "after"])
async def test_connection_dropped_at_every_step(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path, when: str
) -> None:
    base_a, inc, plan = await pull_full_then_plan_incremental(vm, cli, tmp_path)

    await drop_everywhere(vm, cli, inc, plan, when)

    ref_a = await vm.reference("vda", tmp_path / "a.raw")
    begun = await cli.ok("backup-begin", str(inc), "c2")
    await vm.write("vda", 0x33, 7 * MiB, MiB)
    inc_a = tmp_path / "inc-a.qcow2"
    pull_copy(uris(begun.out)["vda"], inc_a, backing=base_a, bitmap="backup-vda")
    await cli.ok("backup-end", "1")
    assert images_equal(inc_a, ref_a)
