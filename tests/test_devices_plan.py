"""The pure planner with block devices and encrypted images as targets and scratches.

Over the recorded slides graph (vda 64 MiB, vdb 100 MiB): which steps open and format
a block device (never create or remove it), which refusals come before anything is
sent, and how a passphrase reaches QEMU: a ``secret`` object QEMU reads from a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.errors import InvalidInputError
from qmpbackup.files import remove_created_files
from qmpbackup.planner import BackupPlan, BeginOptions, plan_backup_begin, plan_backup_end
from qmpbackup.planner.devices import qcow2_room
from qmpbackup.planner.facts import DeviceFacts, Inventory
from qmpbackup.planner.recover import plan_recover
from qmpbackup.qmp.jobs import JobState
from qmpbackup.request.models import BackupSpec, DiskBackupSpec
from qmpbackup.runner import check_plan

from .test_planner_golden import facts, graph, schema

MiB = 1 << 20
VDA = 64 * MiB
UUID = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
SECRET = {"secret": {"uuid": UUID}}
KEYFILE = "/keys/backup.key"


# vdb is left out explicitly: the plans are vda's alone.
def push(fields: dict[str, Any]) -> BackupSpec:
    disks = (DiskBackupSpec(name="vda", **fields), DiskBackupSpec(name="vdb", backup=False))
    return BackupSpec(mode="push", disks=disks)


def pull(fields: dict[str, Any]) -> BackupSpec:
    disks = (DiskBackupSpec(name="vda", **fields), DiskBackupSpec(name="vdb", backup=False))
    return BackupSpec(mode="pull", disks=disks)


def plan(
    spec: BackupSpec, devices: dict[str, DeviceFacts] | None = None, **options: Any
) -> BackupPlan:
    planned = plan_backup_begin(
        spec,
        graph("slides"),
        [],
        facts(devices=devices or {}, scratch_dir="/state/scratch", default_socket="/s/nbd.sock"),
        options=BeginOptions(**options),
    )
    check_plan(planned.plan, schema())  # QEMU 7.2's schema takes every command
    return planned


def commands(planned: BackupPlan) -> list[dict[str, Any]]:
    return [s.command.to_qmp() for s in planned.plan.steps]


def device(size: int = 128 * MiB, **extra: Any) -> DeviceFacts:
    return DeviceFacts(kind="block", size=size, **extra)


def test_push_qcow2_onto_a_block_device_is_formatted_never_created() -> None:
    planned = plan(push({"type": "block", "target": "/dev/loop7"}), {"/dev/loop7": device()})
    sent = commands(planned)
    assert sent[0]["arguments"] == {
        "driver": "host_device",
        "node-name": "qmpbackup-1-vda-target-file",
        "filename": "/dev/loop7",
    }
    create = sent[1]["arguments"]["options"]
    assert (sent[1]["execute"], create["driver"], create["file"]) == (
        "blockdev-create",
        "qcow2",
        "qmpbackup-1-vda-target-file",
    )
    assert not [c for c in sent if c["execute"] == "blockdev-create" and "filename" in str(c)]
    assert all(not s.created_files for s in planned.plan.steps)
    assert planned.record.disks[0].created_files == ()
    ended = plan_backup_end(planned.record, {}, graph("slides"), [], abort=True)
    assert ended.remove_files == ()


def test_push_reused_block_device_opens_its_qcow2_as_it_is() -> None:
    spec = push({"type": "block", "target": "/dev/loop7", "reuse": True})
    sent = commands(plan(spec, {"/dev/loop7": device()}))
    assert [c["execute"] for c in sent[:2]] == ["blockdev-add", "blockdev-add"]
    assert sent[1]["arguments"]["driver"] == "qcow2"


def test_push_raw_block_device_bigger_than_the_disk_is_shown_at_the_disk_size() -> None:
    spec = push({"type": "block", "target": "/dev/loop7", "format": "raw"})
    planned = plan(spec, {"/dev/loop7": device()})
    sent = commands(planned)
    assert sent[1]["arguments"] == {
        "driver": "raw",
        "node-name": "qmpbackup-1-vda-target",
        "file": "qmpbackup-1-vda-target-file",
        "size": VDA,
    }
    backup = sent[-1]["arguments"]["actions"][-1]["data"]
    # The device holds old data: every cluster is written, none skipped as unallocated.
    assert (backup["target"], backup["sync"]) == ("qmpbackup-1-vda-target", "full")
    same = commands(plan(spec, {"/dev/loop7": device(VDA)}))
    assert [c["execute"] for c in same] == ["blockdev-add", "transaction"]
    with pytest.raises(InvalidInputError, match=r"too small .* a raw copy of vda"):
        plan(spec, {"/dev/loop7": device(VDA - 512)})


@pytest.mark.parametrize(
    ("found", "message"),
    [
        (DeviceFacts(kind="missing"), "block device target /dev/loop7 of vda does not exist"),
        (DeviceFacts(kind="other"), "target /dev/loop7 of vda is not a block device"),
        (device(mounts=("/mnt",)), "holds a filesystem mounted at /mnt"),
        (device(holders=("dm-0",)), "is in use by dm-0"),
        (device(qemu_nodes=("vda-file",)), "is already open in QEMU \\(node vda-file\\)"),
    ],
)
def test_block_devices_in_use_or_absent_are_refused(found: DeviceFacts, message: str) -> None:
    for spec in (
        push({"type": "block", "target": "/dev/loop7"}),
        push({"type": "block", "target": "/dev/loop7", "reuse": True}),
    ):
        with pytest.raises(InvalidInputError, match=message):
            plan(spec, {"/dev/loop7": found})
    with pytest.raises(InvalidInputError, match=message.replace("target", "scratch")):
        plan(pull({"type": "block", "scratch": "/dev/loop7"}), {"/dev/loop7": found})


def test_pull_block_scratch_is_formatted_without_preallocation_and_must_hold_the_disk() -> None:
    spec = pull({"type": "block", "scratch": "/dev/loop7"})
    planned = plan(spec, {"/dev/loop7": device()}, scratch_reserve=MiB)
    sent = commands(planned)
    assert sent[0]["arguments"]["driver"] == "host_device"
    create = sent[1]["arguments"]["options"]
    assert create == {"driver": "qcow2", "file": "qmpbackup-1-vda-target-file", "size": VDA}
    assert not [c for c in sent if c["execute"] == "block-set-write-threshold"]
    assert planned.record.disks[0].created_files == ()
    assert planned.record.disks[0].reserve_file is None
    ended = plan_backup_end(planned.record, {}, graph("slides"), [], abort=False)
    assert ended.remove_files == ()
    plan(spec, {"/dev/loop7": device(qcow2_room(VDA))})
    with pytest.raises(InvalidInputError, match="too small for a scratch that may fill up"):
        plan(spec, {"/dev/loop7": device(VDA)})
    reused = commands(
        plan(
            pull({"type": "block", "scratch": "/dev/loop7", "reuse": True}),
            {"/dev/loop7": device(VDA)},
        )
    )
    assert "blockdev-create" not in [c["execute"] for c in reused]


def test_encrypted_push_target_gets_its_passphrase_from_a_file_through_a_secret() -> None:
    spec = push({"target": "/b/vda.qcow2", "encryption": SECRET})
    name = SECRET["secret"]["uuid"]
    planned = plan(spec, secrets={name: KEYFILE})
    sent = commands(planned)
    assert sent[0] == {
        "execute": "object-add",
        "arguments": {
            "qom-type": "secret",
            "id": "qmpbackup-1-vda-secret",
            "file": KEYFILE,
            "format": "raw",
        },
    }
    luks = {"format": "luks", "key-secret": "qmpbackup-1-vda-secret"}
    create = next(
        c
        for c in sent
        if c["execute"] == "blockdev-create" and c["arguments"]["options"]["driver"] == "qcow2"
    )
    assert create["arguments"]["options"]["encrypt"] == luks
    opened = next(c for c in sent if c["arguments"].get("driver") == "qcow2")
    assert opened["arguments"]["encrypt"] == luks
    assert planned.plan.steps[0].undo[0].to_qmp() == {
        "execute": "object-del",
        "arguments": {"id": "qmpbackup-1-vda-secret"},
    }
    assert planned.record.disks[0].objects == ("qmpbackup-1-vda-secret",)
    assert "data" not in sent[0]["arguments"]


def test_encrypted_pull_scratch_and_its_secret_go_when_the_backup_ends() -> None:
    spec = pull({"encryption": {"secret": {"usage": "scratch-key"}}})
    planned = plan(spec, secrets={"scratch-key": KEYFILE})
    sent = commands(planned)
    fleece = next(c for c in sent if c["arguments"].get("node-name") == "qmpbackup-1-vda-fleece")
    assert fleece["arguments"]["encrypt"]["key-secret"] == "qmpbackup-1-vda-secret"
    assert fleece["arguments"]["backing"] == "vda-fmt"
    record = planned.record
    jobs = {"qmpbackup-1-vda": JobState(id="qmpbackup-1-vda", status="running")}
    running = graph("slides")
    nodes = dict(running.nodes)
    for node in record.disks[0].target_nodes + record.disks[0].view_nodes:
        nodes[node] = running.nodes["vda-fmt"].model_copy(update={"node_name": node})
    ended = plan_backup_end(record, jobs, running.model_copy(update={"nodes": nodes}), [], False)
    names = [s.command.to_qmp() for s in ended.plan.steps]
    last_del = max(i for i, c in enumerate(names) if c["execute"] == "blockdev-del")
    secret_del = names.index(
        {"execute": "object-del", "arguments": {"id": "qmpbackup-1-vda-secret"}}
    )
    assert secret_del > last_del


def test_a_missing_secret_is_refused_naming_the_option() -> None:
    with pytest.raises(InvalidInputError) as err:
        plan(push({"target": "/b/vda.qcow2", "encryption": SECRET}), secrets={"other": KEYFILE})
    assert str(err.value) == (
        "disk 'vda' is encrypted with the secret '0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f': "
        "pass --secret 0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f=FILE"
    )


def test_recover_deletes_a_left_secret_object() -> None:
    inventory = Inventory(
        jobs={}, exports=(), nodes=(), edges=(), bitmaps=(),
        objects=("qmpbackup-3-vda-secret", "user-secret"),
    )  # fmt: skip
    planned = plan_recover(inventory, [], [], [])
    deleted = [s.command.to_qmp() for s in planned.plan.steps]
    assert deleted == [{"execute": "object-del", "arguments": {"id": "qmpbackup-3-vda-secret"}}]


def test_only_regular_files_are_ever_removed(tmp_path: Path) -> None:
    regular, fifo, link = tmp_path / "partial.qcow2", tmp_path / "fifo", tmp_path / "link"
    regular.write_bytes(b"x")
    os.mkfifo(fifo)
    link.symlink_to(regular)
    paths = [str(p) for p in (regular, fifo, link, tmp_path / "gone")]
    assert remove_created_files(paths) == [str(regular)]
    assert fifo.exists() and link.is_symlink()


async def test_a_luks_create_failing_on_qemus_cpu_time_bug_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QEMU's PBKDF2 timing fails a LUKS create job at random ("Unable to get accurate
    CPU usage"): the runner starts the job again; any other job failure stands."""
    from qmpbackup import runner
    from qmpbackup.errors import JobFailedError

    planned = plan(push({"target": "/b/vda.qcow2", "encryption": SECRET}), secrets={UUID: KEYFILE})
    create = next(s for s in planned.plan.steps if s.await_job)
    errors = ["Unable to get accurate CPU usage", "Unable to get accurate CPU usage", None]

    async def once(session: Any, step: Any) -> Any:
        error = errors.pop(0)
        if error:
            raise JobFailedError(f"could not {step.reason} (job {step.await_job}): {error}")
        return {}

    monkeypatch.setattr(runner, "_send_step_once", once)
    assert await runner._send_step(None, create) == {}  # type: ignore[arg-type]
    errors[:] = ["No space left on device"]
    with pytest.raises(JobFailedError, match="No space left"):
        await runner._send_step(None, create)  # type: ignore[arg-type]
