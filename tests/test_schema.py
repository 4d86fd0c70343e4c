"""Tests of qmpbackup.qapi.schema against the recorded QEMU 7.2 schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.errors import SchemaMismatchError
from qmpbackup.qapi.schema import QAPISchema

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures/qemu-7.2/query-qmp-schema.json"


@pytest.fixture(scope="module")
def reply() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def schema(reply: list[dict[str, Any]]) -> QAPISchema:
    return QAPISchema.from_introspection(reply)


def backup_action(**extra: Any) -> dict[str, Any]:
    data = {"job-id": "b-vda", "device": "vda", "target": "t-vda", "sync": "full"}
    return {"type": "blockdev-backup", "data": data | extra}


def good_transaction() -> dict[str, Any]:
    return {
        "actions": [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": "vda", "name": "cp2", "persistent": True, "granularity": 65536},
            },
            {
                "type": "block-dirty-bitmap-merge",
                "data": {
                    "node": "vda",
                    "target": "tmp",
                    "bitmaps": ["cp0", {"node": "vda", "name": "cp1"}],
                },
            },
            backup_action(sync="incremental", bitmap="tmp"),
        ],
        "properties": {"completion-mode": "grouped"},
    }


VALID: list[tuple[str, dict[str, Any]]] = [
    ("blockdev-backup", backup_action()["data"]),
    (
        "blockdev-backup",
        backup_action(sync="incremental", bitmap="cp1", speed=0, **{"auto-dismiss": False})["data"],
    ),
    (
        "blockdev-backup",
        backup_action(**{"x-perf": {"max-workers": 8, "use-copy-range": False}})["data"],
    ),
    ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "/tmp/x.qcow2"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0", "backing": None}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": True}),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "/tmp/r"}},
    ),
    ("blockdev-add", {"driver": "snapshot-access", "node-name": "sa0", "file": "cbw0"}),
    (
        "blockdev-add",
        {
            "driver": "copy-before-write",
            "node-name": "cbw0",
            "file": "vda",
            "target": "tmp0",
            "bitmap": {"node": "vda", "name": "cp1"},
            "on-cbw-error": "break-snapshot",
            "cbw-timeout": 30,
        },
    ),
    (
        "blockdev-create",
        {"job-id": "c0", "options": {"driver": "file", "filename": "/tmp/t", "size": 1 << 30}},
    ),
    (
        "blockdev-create",
        {
            "job-id": "c1",
            "options": {
                "driver": "qcow2",
                "file": "f0",
                "size": 1 << 30,
                "backing-file": "/tmp/base.qcow2",
                "backing-fmt": "qcow2",
                "cluster-size": 65536,
            },
        },
    ),
    ("transaction", good_transaction()),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}}),
    (
        "nbd-server-start",
        {"addr": {"type": "inet", "data": {"host": "::", "port": "10809"}}, "max-connections": 4},
    ),
    (
        "block-export-add",
        {
            "type": "nbd",
            "id": "e-vda",
            "node-name": "sa0",
            "name": "vda",
            "writable": False,
            "allocation-depth": True,
            "bitmaps": ["cp1", {"node": "vda", "name": "cp2"}],
        },
    ),
    ("job-dismiss", {"id": "b-vda"}),
    ("query-version", {}),
]


@pytest.mark.parametrize(("command", "arguments"), VALID, ids=[c for c, _ in VALID])
def test_valid_commands_accepted(
    schema: QAPISchema, command: str, arguments: dict[str, Any]
) -> None:
    schema.check_command(command, arguments)


def with_action(index: int, **data: Any) -> dict[str, Any]:
    args = good_transaction()
    args["actions"][index]["data"].update(data)
    return args


def without(arguments: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in arguments.items() if k != name}


BACKUP = backup_action()["data"]
QCOW2 = {"driver": "qcow2", "node-name": "q0", "file": "f0"}

# (command, arguments, member path, fragment of the message)
INVALID: list[tuple[str, Any, str, str]] = [
    ("no-such-command", {}, "", "unknown command"),
    ("blockdev-backup", BACKUP | {"syncc": "full"}, "syncc", "unknown member 'syncc'"),
    ("blockdev-backup", without(BACKUP, "target"), "target", "missing required member 'target'"),
    ("blockdev-backup", BACKUP | {"speed": "fast"}, "speed", "expected integer, got string"),
    ("blockdev-backup", BACKUP | {"speed": 1.5}, "speed", "expected integer, got number"),
    ("blockdev-backup", BACKUP | {"speed": True}, "speed", "expected integer, got boolean"),
    ("blockdev-backup", BACKUP | {"compress": 1}, "compress", "expected boolean, got integer"),
    ("blockdev-backup", BACKUP | {"job-id": None}, "job-id", "expected string, got null"),
    (
        "blockdev-backup",
        BACKUP | {"sync": "bogus"},
        "sync",
        "'bogus' is not one of top, full, none, incremental, bitmap",
    ),
    ("blockdev-backup", BACKUP | {"sync": 1}, "sync", "expected string, got integer"),
    (
        "blockdev-backup",
        BACKUP | {"x-perf": {"max-workers": "8"}},
        "x-perf.max-workers",
        "expected integer, got string",
    ),
    ("blockdev-backup", ["device", "vda"], "", "expected object, got array"),
    ("blockdev-add", {"driver": "nosuchdriver"}, "driver", "no union variant 'nosuchdriver'"),
    ("blockdev-add", {"node-name": "x"}, "driver", "missing required member 'driver'"),
    ("blockdev-add", {"driver": 7}, "driver", "expected string, got integer"),
    (
        "blockdev-add",
        {"driver": "raw", "file": "f0", "filename": "/tmp/x"},
        "filename",
        "unknown member 'filename' for driver=raw (valid for driver=file",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filenam": "/x"}},
        "file.filenam",
        "unknown member 'filenam'",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "file": {"driver": "file"}},
        "file.filename",
        "missing required member 'filename'",
    ),
    ("blockdev-add", QCOW2 | {"backing": 5}, "backing", "expected object or string or null"),
    ("blockdev-add", QCOW2 | {"file": None}, "file", "expected object or string, got null"),
    ("blockdev-add", QCOW2 | {"file": {"driver": "bogus"}}, "file.driver", "no union variant"),
    (
        "blockdev-create",
        {"job-id": "c", "options": {"driver": "qcow2", "file": "f", "size": 1, "backing-fmt": "x"}},
        "options.backing-fmt",
        "'x' is not one of",
    ),
    (
        "block-export-add",
        {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["a", 3]},
        "bitmaps[1]",
        "expected string or object, got integer",
    ),
    (
        "block-export-add",
        {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": {"node": "n", "name": "b"}},
        "bitmaps",
        "expected array, got object",
    ),
    (
        "transaction",
        with_action(2, syncc="full"),
        "actions[2].data.syncc",
        "unknown member 'syncc'",
    ),
    (
        "transaction",
        with_action(2, sync="bogus"),
        "actions[2].data.sync",
        "'bogus' is not one of top, full, none, incremental, bitmap",
    ),
    (
        "transaction",
        with_action(1, bitmaps=["cp0", {"node": "vda"}]),
        "actions[1].data.bitmaps[1].name",
        "missing required member 'name'",
    ),
    (
        "transaction",
        with_action(0, persistent="yes"),
        "actions[0].data.persistent",
        "expected boolean, got string",
    ),
    (
        "transaction",
        {"actions": [{"type": "blockdev-backupp", "data": BACKUP}]},
        "actions[0].type",
        "no union variant 'blockdev-backupp'",
    ),
    (
        "transaction",
        {"actions": [{"type": "blockdev-backup"}]},
        "actions[0].data",
        "missing required member 'data'",
    ),
    (
        "transaction",
        {"actions": [{"type": "blockdev-backup", "data": BACKUP, "sync": "full"}]},
        "actions[0].sync",
        "unknown member 'sync' for type=blockdev-backup",
    ),
    (
        "transaction",
        {"actions": [backup_action()], "properties": {"completion-mode": "all"}},
        "properties.completion-mode",
        "'all' is not one of individual, grouped",
    ),
    (
        "nbd-server-start",
        {"addr": {"type": "unix", "path": "/tmp/s"}},
        "addr.path",
        "unknown member 'path' for type=unix",
    ),
    ("job-dismiss", {}, "id", "missing required member 'id'"),
    ("query-version", {"x": 1}, "x", "unknown member 'x'"),
]


@pytest.mark.parametrize(
    ("command", "arguments", "path", "message"),
    INVALID,
    ids=[f"{c}:{p or '-'}" for c, _, p, _ in INVALID],
)
def test_invalid_commands_rejected(
    schema: QAPISchema, command: str, arguments: Any, path: str, message: str
) -> None:
    with pytest.raises(SchemaMismatchError) as info:
        schema.check_command(command, arguments)
    err = info.value
    assert (err.command, err.member) == (command, path)
    assert message in str(err)
    if path:
        assert f"schema check failed for {command}: {path}: " in str(err)


def test_tuple_arrays_accepted(schema: QAPISchema) -> None:
    schema.check_command("transaction", {"actions": (backup_action(),)})


def test_capability_paths(schema: QAPISchema) -> None:
    assert schema.has_command("blockdev-backup")
    assert not schema.has_command("blockdev-backupp")
    assert schema.has_member("blockdev-backup", "x-perf")
    assert schema.has_member("blockdev-backup", "x-perf.max-chunk")
    assert not schema.has_member("blockdev-backup", "x-perf.nope")
    assert schema.has_member("blockdev-backup", "sync=bitmap")
    assert not schema.has_member("blockdev-backup", "sync=bogus")
    assert schema.has_member("blockdev-add", "driver=snapshot-access")
    assert not schema.has_member("blockdev-add", "driver=nosuchdriver")
    assert schema.has_member("blockdev-add", "driver=copy-before-write.on-cbw-error")
    assert schema.has_member("blockdev-add", "driver=copy-before-write.bitmap.name")
    assert not schema.has_member("blockdev-add", "driver=raw.on-cbw-error")
    # Variant members need their variant selected first.
    assert not schema.has_member("blockdev-add", "filename")
    assert schema.has_member("blockdev-add", "driver=file.filename")
    assert schema.has_member("blockdev-add", "driver=raw.file.driver=file.filename")
    assert schema.has_member("transaction", "actions.type=blockdev-backup.data.x-perf")
    assert not schema.has_member("transaction", "actions.type=blockdev-backup.data.nope")
    assert schema.has_member("block-export-add", "type=nbd.bitmaps.node")
    assert schema.has_member("block-export-add", "type=nbd.allocation-depth")
    assert not schema.has_member("nosuchcommand", "x")
    assert not schema.has_member("blockdev-backup", "")


def test_command_members(schema: QAPISchema) -> None:
    assert schema.command_members("job-dismiss") == {"id": True}
    members = schema.command_members("blockdev-backup")
    assert members["target"] is True and members["sync"] is True
    assert members["bitmap"] is False
    assert "driver" in schema.command_members("blockdev-add")
    with pytest.raises(KeyError):
        schema.command_members("nosuchcommand")


def test_enum_values(schema: QAPISchema) -> None:
    assert schema.enum_values("blockdev-backup", "sync") == (
        "top",
        "full",
        "none",
        "incremental",
        "bitmap",
    )
    assert "snapshot-access" in schema.enum_values("blockdev-add", "driver")
    assert "break-snapshot" in schema.enum_values(
        "blockdev-add", "driver=copy-before-write.on-cbw-error"
    )
    assert schema.enum_values("blockdev-backup", "device") == ()
    assert schema.enum_values("blockdev-backup", "nope") == ()


def test_features(schema: QAPISchema) -> None:
    assert schema.features("drive-backup") == {"deprecated"}
    assert schema.features("blockdev-backup") == frozenset()
    assert schema.features("blockdev-backup", "x-perf") == {"unstable"}
    assert schema.features("transaction", "actions.type=drive-backup") == {"deprecated"}
    flagged = schema.flagged_members("transaction")
    assert flagged["actions.type=blockdev-backup.data.x-perf"] == {"unstable"}
    assert flagged["actions.type=drive-backup"] == {"deprecated"}
    assert all(schema.has_member("transaction", p) for p in flagged)
    assert "driver=file.x-check-cache-dropped" in schema.flagged_members("blockdev-add")


def test_enum_values_form_accepted(reply: list[dict[str, Any]]) -> None:
    # QEMU before 6.2 lists enum values only as "values".
    old = copy.deepcopy(reply)
    for entry in old:
        if entry["meta-type"] == "enum":
            entry.pop("members")
    schema = QAPISchema.from_introspection(old)
    schema.check_command("blockdev-backup", BACKUP | {"sync": "bitmap", "bitmap": "b"})
    with pytest.raises(SchemaMismatchError, match="not one of"):
        schema.check_command("blockdev-backup", BACKUP | {"sync": "bogus"})


@pytest.mark.parametrize(
    "entries",
    [
        [{"meta-type": "command", "name": "c"}],
        [{"meta-type": "command", "name": "c", "arg-type": "1", "ret-type": "0"}],
        [{"meta-type": "array", "name": "[1]", "element-type": "1"}],
        [
            {"meta-type": "enum", "name": "1", "values": ["a"]},
            {"meta-type": "object", "name": "2", "members": [], "tag": "t", "variants": []},
        ],
        "not a list of dicts",
    ],
)
def test_malformed_reply_refused(entries: Any) -> None:
    with pytest.raises(ValueError, match="malformed query-qmp-schema reply"):
        QAPISchema.from_introspection(entries)
