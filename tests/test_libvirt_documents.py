"""libvirt's own backup and checkpoint documents, read and planned as libvirt would.

The documents are libvirt's (``fixtures/libvirt/``, origin in its README): the
``*xml2xmlin`` test inputs, the ``*xml2xmlout`` outputs (fed back as requests, as a
user who saved ``virsh backup-dumpxml`` output would), and the examples of
``formatbackup.rst``/``formatcheckpoint.rst``.  Each is planned, without QEMU,
against a block graph recorded from QEMU 7.2 and 10.0 whose disks carry the names the
documents use (``fixtures/qemu-*/graphs/libvirt-domain*.json``: hda, vda … vdf,
vdextradisk, each ``/srv/vm/<disk>.qcow2``; the ``-checkpoints`` graph holds the
checkpoints 1525889631, blah and bleh as bitmaps on every disk).

:data:`BACKUPS` and :data:`CHECKPOINTS_TABLE` say, per document, what libvirt makes of
it (read in libvirt's ``backup_conf.c``, ``checkpoint_conf.c`` and ``qemu_backup.c``):
the disks backed up, how, into which file, under which export name and bitmap; or the
one line that refuses it.  :func:`test_table_agrees_with_libvirts_output` checks the
table against libvirt's own xml2xmlout documents.

Documents with block-device destinations (``type='block'``, ``dev=``) are planned
with the facts the observe layer would report for a free block device, and those
with ``<encryption>`` with a ``--secret`` file for each secret they name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml

from qmpbackup.errors import QmpBackupError, SpecError
from qmpbackup.planner import BackupFacts, BeginOptions, plan_backup_begin, plan_checkpoint_create
from qmpbackup.planner.facts import DeviceFacts
from qmpbackup.qapi.capabilities import Capabilities
from qmpbackup.qapi.schema import QAPISchema
from qmpbackup.qmp.graph import BlockGraph, graph_from_replies
from qmpbackup.request import (
    load_backup_spec,
    load_checkpoint_spec,
    parse_backup_spec,
    parse_checkpoint_spec,
)
from qmpbackup.request.models import BackupSpec
from qmpbackup.runner import check_plan
from qmpbackup.state.checkpoints import Checkpoint, CheckpointDisk

ROOT = Path(__file__).resolve().parent.parent
LIBVIRT = ROOT / "fixtures" / "libvirt"
QEMUS = ("qemu-7.2", "qemu-10.0")
NOW = 1_700_000_000  # the backups' time: the suffix of default push targets
CHECKPOINT_NOW = 1525889631  # the checkpoints' creation time, as in libvirt's outputs
DISKS = ("hda", "vda", "vdb", "vdc", "vdd", "vde", "vdf", "vdextradisk")
SECRETS = {  # --secret NAME=FILE for the secrets libvirt's documents name
    "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f": "/etc/qmpbackup/vda.key",
    "/storage/backup/vdb": "/etc/qmpbackup/vdb.key",
    "/storage/backup/vdc": "/etc/qmpbackup/vdc.key",
}


# -- what libvirt makes of each document ------------------------------------------


@dataclass(frozen=True)
class Disk:
    """One disk of a backup as libvirt plans it: the checkpoint it copies the changes
    since (None: full), its target or scratch, and in pull mode its export and bitmap."""

    incremental: str | None
    path: str
    fmt: str = "qcow2"
    export: str | None = None
    bitmap: str | None = None


@dataclass(frozen=True)
class Backup:
    """A document's outcome: refused on loading (``refused``), refused by the planner
    (``plan_refused``), or planned as ``disks``; ``unique`` re-plans it with each disk's
    scratch or target suffixed by its name (libvirt's tests give several disks one
    file, which QEMU could not create twice: libvirt, too, fails at that point)."""

    refused: str | None = None
    plan_refused: str | None = None
    disks: dict[str, Disk] = field(default_factory=dict)
    server: str | None = None
    unique: bool = False


def default_target(disk: str) -> str:
    """libvirt's default push target: the disk's image and the time as suffix."""
    return f"/srv/vm/{disk}.qcow2.{NOW}"


def pulled(
    incremental: str | None, path: str, disk: str, export: str = "", bitmap: str = ""
) -> Disk:
    """A pull disk: exported under ``export`` (default its name), its bitmap under
    ``bitmap`` (default libvirt's backup-<disk>) when incremental."""
    return Disk(
        incremental,
        path,
        export=export or disk,
        bitmap=(bitmap or f"backup-{disk}") if incremental else None,
    )


INC = "1525889631"
PULL_DISKS = {  # backup-pull.xml, backup-pull-unix.xml and their outputs
    "vda": pulled(INC, "/path/to/file.vda", "vda"),
    "vdc": pulled(None, "/path/to/file.vdc", "vdc"),
    "vdd": pulled(INC, "/path/to/file.vdd", "vdd"),
    "vde": pulled("blah", "/path/to/file.vde", "vde"),
    "vdf": pulled("bleh", "/path/to/file.vdf", "vdf"),
}
PUSH_DISKS = {  # backup-push.xml and its output
    "vda": Disk(INC, "/path/to/file", "raw"),
    "vdb": Disk(None, default_target("vdb")),
    "vdc": Disk(INC, default_target("vdc")),
    "vdd": Disk(INC, default_target("vdd")),
}
SAME_FILE = "two disks would use the same target /path/to/file"

BACKUPS: dict[str, Backup] = {
    "domainbackupxml2xmlin/backup-pull-encrypted.xml": Backup(plan_refused=SAME_FILE),
    "domainbackupxml2xmlin/backup-pull-fd.xml": Backup(
        refused="server fdgroup needs libvirt's fd passing (virDomainFDAssociate)"
    ),
    "domainbackupxml2xmlin/backup-pull-internal-invalid.xml": Backup(
        refused="<privateData> is libvirt's internal status XML, not a request"
    ),
    "domainbackupxml2xmlin/backup-pull-seclabel.xml": Backup(
        disks={
            "vda": pulled(INC, "/path/to/file", "vda", export="test-vda", bitmap="blah"),
            "vdb": pulled(INC, "/dev/block", "vdb"),
        },
        server="tcp:localhost:10809",
    ),
    "domainbackupxml2xmlin/backup-pull-unix.xml": Backup(
        plan_refused=SAME_FILE, disks=PULL_DISKS, server="unix:/path/to/server", unique=True
    ),
    "domainbackupxml2xmlin/backup-pull.xml": Backup(
        plan_refused=SAME_FILE, disks=PULL_DISKS, server="tcp:localhost:10809", unique=True
    ),
    "domainbackupxml2xmlin/backup-push-encrypted.xml": Backup(
        refused="disk 'vdb': <encryption> needs the qcow2 format"
    ),
    "domainbackupxml2xmlin/backup-push-seclabel.xml": Backup(
        disks={"vda": Disk(INC, "/path/to/file", "raw"), "vdb": Disk(INC, "/dev/block")}
    ),
    "domainbackupxml2xmlin/backup-push.xml": Backup(disks=PUSH_DISKS),
    "domainbackupxml2xmlin/empty.xml": Backup(
        disks={d: Disk(None, default_target(d)) for d in DISKS}
    ),
    "domainbackupxml2xmlout/backup-pull-encrypted.xml": Backup(plan_refused=SAME_FILE),
    "domainbackupxml2xmlout/backup-pull-fd.xml": Backup(
        refused="server fdgroup needs libvirt's fd passing (virDomainFDAssociate)"
    ),
    "domainbackupxml2xmlout/backup-pull-internal-invalid.xml": Backup(
        refused="<privateData> is libvirt's internal status XML, not a request"
    ),
    "domainbackupxml2xmlout/backup-pull-seclabel.xml": Backup(
        disks={
            "vda": pulled(INC, "/path/to/file", "vda", export="test-vda", bitmap="blah"),
            "vdb": pulled(INC, "/dev/block", "vdb"),
        },
        server="tcp:localhost:10809",
    ),
    "domainbackupxml2xmlout/backup-pull-unix.xml": Backup(
        plan_refused=SAME_FILE, disks=PULL_DISKS, server="unix:/path/to/server", unique=True
    ),
    "domainbackupxml2xmlout/backup-pull.xml": Backup(
        plan_refused=SAME_FILE, disks=PULL_DISKS, server="tcp:localhost:10809", unique=True
    ),
    "domainbackupxml2xmlout/backup-push-encrypted.xml": Backup(
        refused="disk 'vdb': <encryption> needs the qcow2 format"
    ),
    "domainbackupxml2xmlout/backup-push-seclabel.xml": Backup(
        disks={"vda": Disk(INC, "/path/to/file", "raw"), "vdb": Disk(INC, "/dev/block")}
    ),
    # libvirt's output names its generated targets /fake/<disk>.qcow2.SUFFIX: fed back,
    # they are the targets asked for.
    "domainbackupxml2xmlout/backup-push.xml": Backup(
        disks={
            "vda": Disk(INC, "/path/to/file", "raw"),
            "vdb": Disk(None, "/fake/vdb.qcow2.SUFFIX"),
            "vdc": Disk(INC, "/fake/vdc.qcow2.SUFFIX"),
            "vdd": Disk(INC, "/fake/vdd.qcow2.SUFFIX"),
        }
    ),
    "domainbackupxml2xmlout/empty.xml": Backup(
        disks={"vdextradisk": Disk(None, "/fake/vdextradisk.qcow2.SUFFIX")}
    ),
    "docs/formatbackup-push-full.xml": Backup(
        disks={
            "vda": Disk(None, default_target("vda")),
            "vdb": Disk(None, "/path/to/vdb.backup", "raw"),
        }
    ),
    "docs/formatbackup-pull-incremental.xml": Backup(
        disks={"vda": pulled(INC, "/path/to/file1.scratch", "vda")},
        server="unix:/path/to/server",
    ),
}


@dataclass(frozen=True)
class CheckpointOutcome:
    """A checkpoint document's outcome: refused on loading, refused by the planner, or
    its name and the bitmap on each disk (None: checkpoint='no')."""

    refused: str | None = None
    plan_refused: str | None = None
    name: str | None = None
    bitmaps: dict[str, str | None] = field(default_factory=dict)


def covering(name: str, *disks: str) -> dict[str, str | None]:
    """Bitmap ``name`` on ``disks`` (every disk if none given), no bitmap on the others."""
    return {d: name if d in (disks or DISKS) else None for d in DISKS}


CHECKPOINTS_TABLE: dict[str, CheckpointOutcome] = {
    "qemudomaincheckpointxml2xmlin/disk-default.xml": CheckpointOutcome(
        name=INC, bitmaps=covering(INC, "vda")
    ),
    "qemudomaincheckpointxml2xmlin/disk-invalid.xml": CheckpointOutcome(
        refused="disk #1: name is missing"
    ),
    "qemudomaincheckpointxml2xmlin/empty.xml": CheckpointOutcome(name=INC, bitmaps=covering(INC)),
    "qemudomaincheckpointxml2xmlin/name-invalid.xml": CheckpointOutcome(
        refused="invalid checkpoint name '../escape'"
    ),
    "qemudomaincheckpointxml2xmlin/sample.xml": CheckpointOutcome(
        name=INC, bitmaps=covering(INC, "vda")
    ),
    "qemudomaincheckpointxml2xmlin/size.xml": CheckpointOutcome(name="c2", bitmaps=covering("c2")),
    "qemudomaincheckpointxml2xmlout/disk-default.xml": CheckpointOutcome(
        name=INC, bitmaps=covering(INC, "vda")
    ),
    "qemudomaincheckpointxml2xmlout/empty.xml": CheckpointOutcome(
        name=INC, bitmaps=covering(INC, "vda")
    ),
    "qemudomaincheckpointxml2xmlout/internal-active-invalid.xml": CheckpointOutcome(
        refused="<active> is libvirt's internal status XML, not a request"
    ),
    "qemudomaincheckpointxml2xmlout/internal-inactive-invalid.xml": CheckpointOutcome(
        refused="<active> is libvirt's internal status XML, not a request"
    ),
    # Its domain has a CD-ROM hdc, which this VM has not: libvirt says the same.
    "qemudomaincheckpointxml2xmlout/redefine.xml": CheckpointOutcome(
        plan_refused="unknown disk 'hdc'"
    ),
    "qemudomaincheckpointxml2xmlout/sample.xml": CheckpointOutcome(
        name=INC, bitmaps=covering(INC, "vda")
    ),
    "qemudomaincheckpointxml2xmlout/size.xml": CheckpointOutcome(
        name="c2", bitmaps=covering("c2", "vda")
    ),
    "docs/formatcheckpoint-create.xml": CheckpointOutcome(name=INC, bitmaps=covering(INC, "vda")),
    "docs/formatcheckpoint-dumpxml.xml": CheckpointOutcome(name=INC, bitmaps=covering(INC, "vda")),
}


# -- inputs ---------------------------------------------------------------------------


@cache
def graph(qemu: str, scenario: str) -> BlockGraph:
    path = ROOT / "fixtures" / qemu / "graphs" / f"{scenario}.json"
    return graph_from_replies(json.loads(path.read_text(encoding="utf-8")))


@cache
def schema(qemu: str) -> QAPISchema:
    reply = json.loads((ROOT / "fixtures" / qemu / "query-qmp-schema.json").read_text())
    return QAPISchema.from_introspection(reply)


def facts(qemu: str) -> BackupFacts:
    version = json.loads((ROOT / "fixtures" / qemu / "query-version.json").read_text())
    return BackupFacts(
        backup_id=1,
        now=NOW,
        capabilities=Capabilities.from_schema(schema(qemu), version),
        scratch_dir="/state/scratch",
        default_socket="/state/nbd.sock",
        devices={"/dev/block": DeviceFacts(kind="block", size=1 << 40)},
    )


# The checkpoints libvirt's backup documents name, as qmpbackup's metadata.
EXISTING = [
    Checkpoint(
        name=name,
        creation_time=CHECKPOINT_NOW - 100 + seq,
        seq=seq,
        disks=tuple(CheckpointDisk(name=d, bitmap=name) for d in DISKS),
    )
    for seq, name in enumerate((INC, "blah", "bleh"), start=1)
]


def unique_files(spec: BackupSpec) -> BackupSpec:
    """``spec`` with each disk's scratch or target suffixed by the disk's name."""
    disks = tuple(
        d.model_copy(
            update={
                "scratch": f"{d.scratch}.{d.name}" if d.scratch else None,
                "target": f"{d.target}.{d.name}" if d.target else None,
            }
        )
        for d in spec.disks
    )
    return spec.model_copy(update={"disks": disks})


def planned_disks(spec: BackupSpec, qemu: str) -> tuple[dict[str, Disk], str | None]:
    """What the planner makes of ``spec``: its disks and server, the plan schema-checked."""
    options = BeginOptions(tls_dir="/etc/pki/qemu", secrets=SECRETS)
    planned = plan_backup_begin(
        spec, graph(qemu, "libvirt-domain-checkpoints"), EXISTING, facts(qemu), None, options
    )
    check_plan(planned.plan, schema(qemu))
    disks = {
        job.disk: Disk(
            job.incremental, job.target or "", job.format or "", job.export, job.export_bitmap
        )
        for job in planned.record.disks
    }
    server = planned.record.server
    where = None
    if server is not None:
        where = (
            f"unix:{server.socket}"
            if server.transport == "unix"
            else f"tcp:{server.host}:{server.port}"
        )
    return disks, where


# -- the documents ----------------------------------------------------------------------


def test_every_document_is_in_a_table() -> None:
    found = {str(p.relative_to(LIBVIRT)) for p in LIBVIRT.rglob("*.xml")}
    assert found == set(BACKUPS) | set(CHECKPOINTS_TABLE)


@pytest.mark.parametrize("qemu", QEMUS)
@pytest.mark.parametrize("document", sorted(BACKUPS))
def test_backup_document(document: str, qemu: str) -> None:
    expected = BACKUPS[document]
    path = LIBVIRT / document
    if expected.refused is not None:
        with pytest.raises(SpecError) as refused:
            load_backup_spec(path)
        message = str(refused.value)
        assert expected.refused in message and "\n" not in message, message
        return
    spec = load_backup_spec(path)
    if expected.plan_refused is not None:
        with pytest.raises(QmpBackupError, match=expected.plan_refused):
            planned_disks(spec, qemu)
    if expected.unique:
        spec = unique_files(spec)
    elif expected.plan_refused is not None:
        return
    disks, server = planned_disks(spec, qemu)
    assert disks == expected.disks
    assert server == (expected.server if spec.mode == "pull" else None)


@pytest.mark.parametrize("qemu", QEMUS)
@pytest.mark.parametrize("document", sorted(CHECKPOINTS_TABLE))
def test_checkpoint_document(document: str, qemu: str) -> None:
    expected = CHECKPOINTS_TABLE[document]
    path = LIBVIRT / document
    if expected.refused is not None:
        with pytest.raises(SpecError) as refused:
            load_checkpoint_spec(path)
        assert expected.refused in str(refused.value)
        return
    spec = load_checkpoint_spec(path)
    if expected.plan_refused is not None:
        with pytest.raises(QmpBackupError, match=expected.plan_refused):
            plan_checkpoint_create(spec, graph(qemu, "libvirt-domain"), [], CHECKPOINT_NOW)
        return
    plan, made = plan_checkpoint_create(spec, graph(qemu, "libvirt-domain"), [], CHECKPOINT_NOW)
    check_plan(plan, schema(qemu))
    assert made.name == expected.name
    assert {d.name: d.bitmap if d.checkpoint == "bitmap" else None for d in made.disks} == (
        expected.bitmaps
    )
    added = [a["data"] for a in plan.commands()[0]["arguments"]["actions"]]
    assert {(a["node"], a["name"]) for a in added} == {
        (f"{d}-fmt", b) for d, b in expected.bitmaps.items() if b is not None
    }


# -- the table against libvirt's own output ------------------------------------------------


def libvirt_output(document: str) -> dict[str, dict[str, Any]]:
    """The disks of libvirt's xml2xmlout document for ``document``: attributes and file."""
    out = LIBVIRT / "domainbackupxml2xmlout" / Path(document).name
    disks: dict[str, dict[str, Any]] = {}
    for disk in ElementTree.parse(out).getroot().iter("disk"):
        entry: dict[str, Any] = dict(disk.attrib)
        for tag in ("target", "scratch"):
            element = disk.find(tag)
            if element is not None:
                entry["file"] = element.get("file") or element.get("dev")
        driver = disk.find("driver")
        entry["format"] = driver.get("type") if driver is not None else "qcow2"
        disks[entry.pop("name")] = entry
    return disks


@pytest.mark.parametrize(
    "document",
    sorted(
        d
        for d, b in BACKUPS.items()
        # (backup-pull-encrypted gives two disks one scratch and one export name:
        # refused before a plan, as libvirt fails at that point too)
        if d.startswith("domainbackupxml2xmlin/") and b.disks and "empty" not in d
    ),
)
def test_table_agrees_with_libvirts_output(document: str) -> None:
    """Which disks, full or incremental from which checkpoint, into which file and format,
    under which export name: as libvirt's xml2xmlout says (its generated targets
    /fake/<disk>.qcow2.SUFFIX are, here, the disk's image and the time)."""
    expected = BACKUPS[document]
    output = libvirt_output(document)
    backed_up = {name for name, d in output.items() if d["backup"] == "yes"}
    assert backed_up == set(expected.disks)
    for name, disk in expected.disks.items():
        said = output[name]
        assert disk.incremental == (
            said.get("incremental") if said.get("backupmode") == "incremental" else None
        )
        file = said["file"].replace("/fake/", "/srv/vm/").replace("SUFFIX", str(NOW))
        assert disk.path == (f"{file}.{name}" if expected.unique else file)
        assert disk.fmt == said["format"]
        if disk.export is not None:
            assert disk.export == said.get("exportname", name)
            assert disk.bitmap == said.get(
                "exportbitmap", f"backup-{name}" if disk.incremental else None
            )


# -- what libvirt refuses, or means, where qmpbackup used to ignore ----------------------

PULL = "<domainbackup mode='pull'><disks>{}</disks></domainbackup>"
PUSH = "<domainbackup mode='push'><disks>{}</disks></domainbackup>"

REFUSALS = {
    # libvirt's schema: a pull scratch's driver is qcow2 only (qemu_backup.c: "pull mode
    # backup for disk … requires qcow2 driver").
    "pull raw scratch": (
        PULL.format("<disk name='vda' type='file'><driver type='raw'/></disk>"),
        {"mode": "pull", "disks": [{"name": "vda", "driver": {"type": "raw"}}]},
        "disk 'vda': a pull backup's scratch is always qcow2 (driver type 'raw')",
    ),
    # The schema makes backupmode='full' and incremental= exclusive.
    "full with incremental": (
        PUSH.format("<disk name='vda' backupmode='full' incremental='c1'/>"),
        {"disks": [{"name": "vda", "backupmode": "full", "incremental": "c1"}]},
        "backupmode='full' and incremental='c1' contradict each other",
    ),
    # exportname and exportbitmap exist in the pull schema only.
    "exportname in push": (
        PUSH.format("<disk name='vda' exportname='e'/>"),
        {"disks": [{"name": "vda", "exportname": "e"}]},
        "disk 'vda': exportname is for pull mode",
    ),
    "exportbitmap in push": (
        PUSH.format("<disk name='vda' exportbitmap='b'/>"),
        {"disks": [{"name": "vda", "exportbitmap": "b"}]},
        "disk 'vda': exportbitmap is for pull mode",
    ),
    # absFilePath: an empty file names nothing.
    "empty target file": (
        PUSH.format("<disk name='vda' type='file'><target file=''/></disk>"),
        {"disks": [{"name": "vda", "target": {"file": ""}}]},
        "disk 'vda': target",
    ),
    "empty scratch file": (
        PULL.format("<disk name='vda' type='file'><scratch file=''/></disk>"),
        {"mode": "pull", "disks": [{"name": "vda", "scratch": ""}]},
        "an empty path names no file",
    ),
    # libvirt-only: the reason is said.
    "fd transport": (
        "<domainbackup mode='pull'><server transport='fd'/></domainbackup>",
        {"mode": "pull", "server": {"transport": "fd"}},
        "server transport: 'fd' needs libvirt's fd passing",
    ),
}


@pytest.mark.parametrize("fmt", ["xml", "yaml", "json"])
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_with_its_reason(case: str, fmt: str) -> None:
    xml, mapping, reason = REFUSALS[case]
    texts = {"xml": xml, "json": json.dumps(mapping), "yaml": yaml.safe_dump(mapping)}
    text = texts[fmt]
    with pytest.raises(SpecError) as refused:
        parse_backup_spec(text)
    message = str(refused.value)
    assert reason in message and "\n" not in message, message
    assert refused.value.exit_code == 2


def test_checkpoint_no_with_bitmap_is_refused() -> None:
    for text in (
        "<domaincheckpoint><disks><disk name='vda' checkpoint='no' bitmap='b'/></disks>"
        "</domaincheckpoint>",
        json.dumps({"disks": [{"name": "vda", "checkpoint": "no", "bitmap": "b"}]}),
    ):
        with pytest.raises(SpecError, match=r"disk 'vda': checkpoint='no' takes no bitmap"):
            parse_checkpoint_spec(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "<domainbackup mode='pull'><server transport='fd' fdgroup='nbdfd'/></domainbackup>",
            "server fdgroup needs libvirt's fd passing",
        ),
        (
            "<domainbackup><privateData><objects/></privateData></domainbackup>",
            "<privateData> is libvirt's internal status XML, not a request",
        ),
        (
            "<domainbackup><disks><disk name='vda' state='running'/></disks></domainbackup>",
            "disk 'vda': attribute 'state' is libvirt's internal status XML, not a request",
        ),
        (
            "<domainbackup><disks><disk name='vda' index='3'/></disks></domainbackup>",
            "disk 'vda': attribute 'index' is libvirt's internal status XML, not a request",
        ),
    ],
)
def test_libvirt_only_parts_say_why(text: str, reason: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_backup_spec(text)
    assert reason in str(refused.value)


def test_active_in_a_checkpoint_says_why() -> None:
    with pytest.raises(SpecError, match=r"<active> is libvirt's internal status XML"):
        parse_checkpoint_spec(
            "<domaincheckpoint><name>c</name><active>1</active></domaincheckpoint>"
        )


def test_seclabel_is_accepted_and_ignored() -> None:
    """<seclabel> asks libvirt's security driver to (not) relabel: nothing to do here."""
    label = (
        "<seclabel model='dac' relabel='no'/><seclabel model='selinux'><label>x</label></seclabel>"
    )
    push = parse_backup_spec(
        PUSH.format(f"<disk name='vda' type='file'><target file='/b/vda'>{label}</target></disk>")
    )
    assert push == parse_backup_spec(
        PUSH.format("<disk name='vda' type='file'><target file='/b/vda'/></disk>")
    )
    pull = parse_backup_spec(
        PULL.format(f"<disk name='vda' type='file'><scratch file='/s/vda'>{label}</scratch></disk>")
    )
    assert pull.disks[0].scratch == "/s/vda"


@pytest.mark.parametrize("name", ["_underscore", "-dash", "a.b+c", "1525889631", "x" * 200])
def test_checkpoint_names_libvirt_allows(name: str) -> None:
    spec = parse_checkpoint_spec(f"<domaincheckpoint><name>{name}</name></domaincheckpoint>")
    plan, made = plan_checkpoint_create(spec, graph("qemu-7.2", "libvirt-domain"), [], NOW)
    assert made.name == name
    check_plan(plan, schema("qemu-7.2"))


@pytest.mark.parametrize(
    "name", ["../escape", ".hidden", "a/b", "a b", "+plus", "x" * 201, "a\u00e9"]
)
def test_checkpoint_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="invalid checkpoint name"):
        parse_checkpoint_spec(json.dumps({"name": name}))


def test_unnamed_checkpoint_is_named_after_its_creation_time() -> None:
    """libvirt's default name; with a backup too, where it also suffixes default targets."""
    spec = parse_checkpoint_spec("<domaincheckpoint/>")
    assert spec.name is None
    _, made = plan_checkpoint_create(spec, graph("qemu-7.2", "libvirt-domain"), [], NOW)
    assert made.name == str(NOW)
    backup = parse_backup_spec(PUSH.format("<disk name='vda'/>"))
    planned = plan_backup_begin(
        backup, graph("qemu-7.2", "libvirt-domain"), [], facts("qemu-7.2"), spec
    )
    assert planned.checkpoint is not None and planned.checkpoint.name == str(NOW)
    assert planned.record.disks[0].target == f"/srv/vm/vda.qcow2.{NOW}"
