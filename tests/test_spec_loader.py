"""Tests of qmpbackup.request.loader and of the XML writer: libvirt XML, YAML and JSON requests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given

from qmpbackup.errors import SpecError
from qmpbackup.request import (
    MAX_SPEC_BYTES,
    BackupSpec,
    CheckpointDiskSpec,
    CheckpointSpec,
    DiskBackupSpec,
    ServerSpec,
    backup_to_xml,
    checkpoint_to_xml,
    load_backup_spec,
    load_checkpoint_spec,
    parse_backup_spec,
    parse_checkpoint_spec,
)
from qmpbackup.request.xml import XmlElement, render_xml

from .test_properties import backup_specs, bounded, checkpoint_specs

# The slides' examples, verbatim.

SLIDE_PUSH_FULL = """\
<domainbackup mode="push">
  <disks>
    <disk name="vda" type="file">
      <target file="/home/eblake/Backup1.1.qcow2"/>
      <driver type="qcow2" shallow="on"/>
    </disk>
    <disk name="vdb" type="file">
      <target file="/home/eblake/Backup2.full.raw"/>
      <driver type="raw"/>
    </disk>
  </disks>
</domainbackup>
"""

SLIDE_PULL_FULL = """\
<domainbackup mode="pull">
  <server name="localhost" port="10809"/>
  <disks>
    <disk name="vda"/>
    <disk name="vdb" type="file">
      <scratch file="/home/eblake/scratch.qcow2"/>
    </disk>
  </disks>
</domainbackup>
"""

SLIDE_PULL_INCREMENTAL = """\
<domainbackup mode="pull">
  <incremental>check1</incremental>
  <server name="localhost" port="10809"/>
</domainbackup>
"""

SLIDE_CHECKPOINT = """\
<domaincheckpoint>
  <name>check1</name>
</domaincheckpoint>
"""

CHECKPOINT_WITH_DISKS = """\
<domaincheckpoint>
  <name>c1</name>
  <description>before the upgrade</description>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c1'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
</domaincheckpoint>
"""

# What `virsh checkpoint-dumpxml --size` prints: read-only parts included.
CHECKPOINT_DUMPXML = """\
<domaincheckpoint>
  <name>c2</name>
  <parent>
    <name>c1</name>
  </parent>
  <creationTime>1540073217</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c2' size='131072'/>
    <disk name='vdb' checkpoint='bitmap' bitmap='c2' size='0'/>
  </disks>
  <domain type='kvm'>
    <name>f25</name>
    <devices><disk type='file' device='disk'><target dev='vda'/></disk></devices>
  </domain>
</domaincheckpoint>
"""

# Every field of a backup, in each format.
ALL_FIELDS_XML = """\
<domainbackup mode='pull'>
  <incremental>c1</incremental>
  <server transport='tcp' name='backup.example' port='10809' tls='yes'/>
  <disks>
    <disk name='vda' backup='yes' backupmode='incremental' incremental='c0'
          exportname='vda-export' exportbitmap='vda-bitmap' type='file' reuse='yes'>
      <scratch file='/var/tmp/vda.scratch'/>
      <driver type='qcow2' shallow='on'/>
    </disk>
    <disk name='vdb' backup='no'/>
    <disk name='vdc' backupmode='full' reuse='no'>
      <driver type='qcow2' shallow='off'/>
    </disk>
  </disks>
</domainbackup>
"""

ALL_FIELDS_YAML = """\
mode: pull
incremental: c1
server: {transport: tcp, name: backup.example, port: 10809, tls: yes}
disks:
  - name: vda
    backup: yes
    backupmode: incremental
    incremental: c0
    exportname: vda-export
    exportbitmap: vda-bitmap
    type: file
    reuse: true
    scratch: /var/tmp/vda.scratch
    format: qcow2
    shallow: on
  - {name: vdb, backup: no}
  - {name: vdc, backupmode: full, reuse: false, format: qcow2, shallow: off}
"""

ALL_FIELDS = BackupSpec(
    mode="pull",
    incremental="c1",
    server=ServerSpec(transport="tcp", name="backup.example", port=10809, tls=True),
    disks=(
        DiskBackupSpec(
            name="vda",
            backup=True,
            backupmode="incremental",
            incremental="c0",
            exportname="vda-export",
            exportbitmap="vda-bitmap",
            type="file",
            reuse=True,
            scratch="/var/tmp/vda.scratch",
            format="qcow2",
            shallow=True,
        ),
        DiskBackupSpec(name="vdb", backup=False),
        DiskBackupSpec(name="vdc", backupmode="full", format="qcow2", shallow=False),
    ),
)


def spec_error(text: str, *, checkpoint: bool = False, origin: str = "spec") -> str:
    """The message of the SpecError that parsing ``text`` raises."""
    parse = parse_checkpoint_spec if checkpoint else parse_backup_spec
    with pytest.raises(SpecError) as info:
        parse(text, origin)
    message = str(info.value)
    assert "\n" not in message
    assert "pydantic" not in message and "http" not in message
    assert info.value.exit_code == 2
    return message


# --------------------------------------------------------------------------
# The slides


def test_slide_push_full() -> None:
    spec = parse_backup_spec(SLIDE_PUSH_FULL)
    assert spec == BackupSpec(
        mode="push",
        disks=(
            DiskBackupSpec(
                name="vda",
                type="file",
                target="/home/eblake/Backup1.1.qcow2",
                format="qcow2",
                shallow=True,
            ),
            DiskBackupSpec(
                name="vdb", type="file", target="/home/eblake/Backup2.full.raw", format="raw"
            ),
        ),
    )


def test_slide_pull_full() -> None:
    spec = parse_backup_spec(SLIDE_PULL_FULL)
    assert spec == BackupSpec(
        mode="pull",
        server=ServerSpec(name="localhost", port=10809),
        disks=(
            DiskBackupSpec(name="vda"),
            DiskBackupSpec(name="vdb", scratch="/home/eblake/scratch.qcow2"),
        ),
    )
    assert spec.server is not None and spec.server.transport == "tcp" and not spec.server.tls


def test_slide_pull_incremental() -> None:
    spec = parse_backup_spec(SLIDE_PULL_INCREMENTAL)
    assert spec == BackupSpec(
        mode="pull", incremental="check1", server=ServerSpec(name="localhost", port=10809)
    )


def test_slide_checkpoint() -> None:
    assert parse_checkpoint_spec(SLIDE_CHECKPOINT) == CheckpointSpec(name="check1")


def test_checkpoint_with_description_and_disks() -> None:
    assert parse_checkpoint_spec(CHECKPOINT_WITH_DISKS) == CheckpointSpec(
        name="c1",
        description="before the upgrade",
        disks=(
            CheckpointDiskSpec(name="vda", checkpoint="bitmap", bitmap="c1"),
            CheckpointDiskSpec(name="vdb", checkpoint="no"),
        ),
    )


def test_slide_files_load_from_disk(tmp_path: Path) -> None:
    for name, text in [
        ("backup_push_full.xml", SLIDE_PUSH_FULL),
        ("backup_pull_full.xml", SLIDE_PULL_FULL),
        ("backup_pull_inc.xml", SLIDE_PULL_INCREMENTAL),
    ]:
        (tmp_path / name).write_text(text)
        assert load_backup_spec(tmp_path / name) == parse_backup_spec(text)
        assert load_backup_spec(str(tmp_path / name)) == parse_backup_spec(text)
    (tmp_path / "check1.xml").write_text(SLIDE_CHECKPOINT)
    assert load_checkpoint_spec(tmp_path / "check1.xml") == CheckpointSpec(name="check1")


# --------------------------------------------------------------------------
# Every field, every format


def test_all_fields_xml() -> None:
    assert parse_backup_spec(ALL_FIELDS_XML) == ALL_FIELDS


def test_all_fields_yaml() -> None:
    assert parse_backup_spec(ALL_FIELDS_YAML) == ALL_FIELDS


def test_all_fields_json() -> None:
    text = json.dumps(ALL_FIELDS.model_dump(exclude_defaults=True), indent=2)
    assert text.startswith("{")
    assert parse_backup_spec(text) == ALL_FIELDS


def test_brief_json_example() -> None:
    text = (
        '{"mode": "push", "incremental": "check1", "disks": '
        '[{"name": "vda", "target": "/x.qcow2", "format": "qcow2", "shallow": true}]}'
    )
    assert parse_backup_spec(text) == BackupSpec(
        incremental="check1",
        disks=(DiskBackupSpec(name="vda", target="/x.qcow2", format="qcow2", shallow=True),),
    )


def test_defaults() -> None:
    assert parse_backup_spec("<domainbackup/>") == BackupSpec()
    assert parse_backup_spec("mode: push\n") == BackupSpec()
    assert parse_backup_spec("{}") == BackupSpec()


def test_unix_server() -> None:
    xml = "<domainbackup mode='pull'><server transport='unix' socket='/run/b.sock'/></domainbackup>"
    expected = BackupSpec(mode="pull", server=ServerSpec(transport="unix", socket="/run/b.sock"))
    assert parse_backup_spec(xml) == expected
    assert parse_backup_spec("mode: pull\nserver: {transport: unix, socket: /run/b.sock}\n") == (
        expected
    )


def test_yaml_libvirt_nesting() -> None:
    text = """\
disks:
  - name: vda
    target: {file: /b/vda.qcow2}
    driver: {type: qcow2, shallow: on}
"""
    assert parse_backup_spec(text) == parse_backup_spec(
        "disks: [{name: vda, target: /b/vda.qcow2, format: qcow2, shallow: true}]"
    )
    pull = "mode: pull\ndisks: [{name: vda, scratch: {file: /s.qcow2}}]\n"
    assert parse_backup_spec(pull).disks[0].scratch == "/s.qcow2"


def test_yaml_flow_mapping_that_is_not_json() -> None:
    assert parse_backup_spec("{mode: pull, incremental: c1}") == BackupSpec(
        mode="pull", incremental="c1"
    )


def test_checkpoint_yaml_and_json() -> None:
    expected = CheckpointSpec(
        name="c1",
        description="before the upgrade",
        disks=(
            CheckpointDiskSpec(name="vda", checkpoint="bitmap", bitmap="c1"),
            CheckpointDiskSpec(name="vdb", checkpoint="no"),
        ),
    )
    yaml_text = """\
name: c1
description: before the upgrade
disks:
  - {name: vda, checkpoint: bitmap, bitmap: c1}
  - {name: vdb, checkpoint: "no"}
"""
    assert parse_checkpoint_spec(yaml_text) == expected
    assert parse_checkpoint_spec(expected.model_dump_json()) == expected
    assert parse_checkpoint_spec('{"name": "check1", "description": "..."}') == CheckpointSpec(
        name="check1", description="..."
    )


def test_checkpoint_dumpxml_output_is_accepted() -> None:
    """Its parent and creation time are read (checkpoint-create --redefine takes them)."""
    assert parse_checkpoint_spec(CHECKPOINT_DUMPXML) == CheckpointSpec(
        name="c2",
        disks=(
            CheckpointDiskSpec(name="vda", bitmap="c2"),
            CheckpointDiskSpec(name="vdb", bitmap="c2"),
        ),
        parent="c1",
        creation_time=1540073217,
    )


def test_checkpoint_description_is_verbatim() -> None:
    text = "<domaincheckpoint><name> c1 </name><description> two  spaces </description>"
    spec = parse_checkpoint_spec(text + "</domaincheckpoint>")
    assert spec.name == "c1"
    assert spec.description == " two  spaces "


def test_xml_comments_and_declaration(tmp_path: Path) -> None:
    text = '<?xml version="1.0" encoding="UTF-8"?>\n<!-- made by hand -->\n' + SLIDE_CHECKPOINT
    assert parse_checkpoint_spec(text).name == "check1"
    # A file keeps its declared encoding: read as bytes, not as UTF-8 text.
    latin = tmp_path / "c.xml"
    latin.write_bytes(
        b'<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        b"<domaincheckpoint><name>c1</name><description>caf\xe9</description>"
        b"</domaincheckpoint>"
    )
    assert load_checkpoint_spec(latin).description == "café"


def test_byte_order_mark_and_leading_blanks(tmp_path: Path) -> None:
    for name, text in [("a.xml", "\n\n  " + SLIDE_CHECKPOINT), ("b.yaml", "name: check1\n")]:
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_checkpoint_spec(path).name == "check1"
    assert parse_checkpoint_spec("\ufeff  " + SLIDE_CHECKPOINT).name == "check1"


def test_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(ALL_FIELDS_YAML)
    (tmp_path / "b.json").write_text(ALL_FIELDS.model_dump_json())
    assert load_backup_spec(tmp_path / "b.yaml") == ALL_FIELDS
    assert load_backup_spec(tmp_path / "b.json") == ALL_FIELDS


# --------------------------------------------------------------------------
# Written back: the XML writer


def test_writer_writes_the_slides_verbatim() -> None:
    """The writer lays a document out as the slides do, quotes aside."""
    for text in (SLIDE_PUSH_FULL, SLIDE_PULL_FULL, SLIDE_PULL_INCREMENTAL):
        assert backup_to_xml(parse_backup_spec(text)) == text
    assert checkpoint_to_xml(parse_checkpoint_spec(SLIDE_CHECKPOINT)) == SLIDE_CHECKPOINT


# Between them, every field of every model, at its default and not.
WRITTEN_BACKUPS = [
    BackupSpec(),
    ALL_FIELDS,
    BackupSpec(
        mode="push",
        incremental="check-2",
        disks=(
            DiskBackupSpec(name="vda", target="/b/vda.qcow2", format="qcow2", shallow=True),
            DiskBackupSpec(name="vdb", backup=False, reuse=True),
            DiskBackupSpec(name="vdc", target="/b/vdc.raw", reuse=True, format="raw"),
            DiskBackupSpec(name="vdd", shallow=True),
        ),
    ),
    BackupSpec(mode="pull", server=ServerSpec(transport="unix", socket="/run/nbd.sock")),
    BackupSpec(mode="pull", server=ServerSpec(transport="unix", name="")),
    BackupSpec(mode="pull", server=ServerSpec(port=1, tls=False)),
    BackupSpec(
        mode="pull",
        server=ServerSpec(transport="tcp", name="::1", port=65535, tls=True),
        disks=(
            DiskBackupSpec(name="vda", backupmode="full", scratch="/s/vda.qcow2", reuse=True),
            DiskBackupSpec(name="vdb", exportname="b", exportbitmap="b.map", incremental="c0"),
        ),
    ),
    # What XML escapes, and what a parser would change unless it is escaped.
    BackupSpec(
        disks=(DiskBackupSpec(name="vda", target="/a b/&<>\"'\n\t\r x/☃.qcow2"),),
    ),
    BackupSpec(
        mode="pull",
        server=ServerSpec(transport="unix", name="n\r\n", socket=" /s p a c e s \t"),
        disks=(DiskBackupSpec(name="vda", scratch="]]>&amp;"),),
    ),
]

WRITTEN_CHECKPOINTS = [
    CheckpointSpec(name="check1"),
    CheckpointSpec(name="c1", description=""),
    CheckpointSpec(name="c1", description=" two  spaces,\n\ttab, \r\n & <b>'\"]]> ☃ "),
    CheckpointSpec(
        name="c1",
        description="before the upgrade",
        disks=(
            CheckpointDiskSpec(name="vda"),
            CheckpointDiskSpec(name="vdb", checkpoint="bitmap", bitmap="c1"),
            CheckpointDiskSpec(name="vdc", checkpoint="no"),
        ),
    ),
    CheckpointSpec(description="named after its creation time, as libvirt names it"),
]


@pytest.mark.parametrize("spec", WRITTEN_BACKUPS)
def test_written_backup_loads_back_equal(spec: BackupSpec) -> None:
    assert parse_backup_spec(backup_to_xml(spec)) == spec


@pytest.mark.parametrize("spec", WRITTEN_CHECKPOINTS)
def test_written_checkpoint_loads_back_equal(spec: CheckpointSpec) -> None:
    assert parse_checkpoint_spec(checkpoint_to_xml(spec)) == spec


def test_written_fields_are_only_those_set() -> None:
    """Defaults are left out, but a backup's mode; type="file" comes with a disk's children."""
    assert backup_to_xml(BackupSpec()) == '<domainbackup mode="push">\n</domainbackup>\n'
    assert backup_to_xml(ALL_FIELDS) == (
        '<domainbackup mode="pull">\n'
        "  <incremental>c1</incremental>\n"
        '  <server name="backup.example" port="10809" tls="yes"/>\n'
        "  <disks>\n"
        '    <disk name="vda" backupmode="incremental" incremental="c0" exportname="vda-export"'
        ' exportbitmap="vda-bitmap" type="file" reuse="yes">\n'
        '      <scratch file="/var/tmp/vda.scratch"/>\n'
        '      <driver type="qcow2" shallow="on"/>\n'
        "    </disk>\n"
        '    <disk name="vdb" backup="no"/>\n'
        '    <disk name="vdc" backupmode="full" type="file">\n'
        '      <driver type="qcow2"/>\n'
        "    </disk>\n"
        "  </disks>\n"
        "</domainbackup>\n"
    )
    assert checkpoint_to_xml(WRITTEN_CHECKPOINTS[3]) == (
        "<domaincheckpoint>\n"
        "  <name>c1</name>\n"
        "  <description>before the upgrade</description>\n"
        "  <disks>\n"
        '    <disk name="vda"/>\n'
        '    <disk name="vdb" bitmap="c1"/>\n'
        '    <disk name="vdc" checkpoint="no"/>\n'
        "  </disks>\n"
        "</domaincheckpoint>\n"
    )


@bounded(60)
@given(spec=backup_specs())
def test_any_written_backup_loads_back_equal(spec: BackupSpec) -> None:
    assert parse_backup_spec(backup_to_xml(spec)) == spec


@bounded(60)
@given(spec=checkpoint_specs())
def test_any_written_checkpoint_loads_back_equal(spec: CheckpointSpec) -> None:
    assert parse_checkpoint_spec(checkpoint_to_xml(spec)) == spec


def test_writer_refuses_what_xml_cannot_carry() -> None:
    with pytest.raises(ValueError, match="U\\+0000"):
        backup_to_xml(BackupSpec(disks=(DiskBackupSpec(name="vda", target="/a\0b"),)))
    with pytest.raises(ValueError, match="U\\+001B"):
        checkpoint_to_xml(CheckpointSpec(name="c1", description="\x1b[0m"))
    with pytest.raises(ValueError, match="text or children"):
        XmlElement("name", text="c1", children=[])


def test_render_xml_in_dumpxml_style() -> None:
    """Single quotes as libvirt's dumpxml writes them; an empty list of children still
    opens and closes the element on lines of their own."""
    document = XmlElement(
        "domaincheckpoint",
        children=[
            XmlElement("name", text="c2"),
            XmlElement("description", text="a & b\n<c>"),
            XmlElement("parent", children=[XmlElement("name", text="c1")]),
            XmlElement("disks", children=[]),
            XmlElement("disk", {"name": "vda", "bitmap": None, "size": "131072"}),
            XmlElement("domain", {"q": 'it\'s "x"'}, children=[XmlElement("name", text="f25")]),
        ],
    )
    assert render_xml(document, quote="'") == (
        "<domaincheckpoint>\n"
        "  <name>c2</name>\n"
        "  <description>a &amp; b\n&lt;c&gt;</description>\n"
        "  <parent>\n"
        "    <name>c1</name>\n"
        "  </parent>\n"
        "  <disks>\n"
        "  </disks>\n"
        "  <disk name='vda' size='131072'/>\n"
        "  <domain q='it&apos;s &quot;x&quot;'>\n"
        "    <name>f25</name>\n"
        "  </domain>\n"
        "</domaincheckpoint>\n"
    )
    assert render_xml(XmlElement("x", {"q": 'it\'s "x"'})) == '<x q="it\'s &quot;x&quot;"/>\n'


def test_size_limit_is_inclusive() -> None:
    padding = "#" * (MAX_SPEC_BYTES - len("name: c1\n") - 1) + "\n"
    text = "name: c1\n" + padding
    assert len(text.encode()) == MAX_SPEC_BYTES
    assert parse_checkpoint_spec(text).name == "c1"


# --------------------------------------------------------------------------
# Errors: one line naming the document, the field and the problem


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "<domainbackup><disks><disk name='vda'><driver type='qcow3'/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': driver type 'qcow3' is not one of qcow2, raw",
        ),
        (
            "<domainbackup mode='pull'><server name='localhost' port='abc'/></domainbackup>",
            "server port 'abc' is not an integer",
        ),
        (
            "<domainbackup mode='pull'><server port='70000'/></domainbackup>",
            "server port '70000' is too large (at most 65535)",
        ),
        ("mode: pull\nserver: {port: 0}", "server port 0 is too small (at least 1)"),
        (
            "<domainbackup><disks><disk name='vda'><driver shallow='maybe'/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': driver shallow 'maybe' is not one of on, off",
        ),
        (
            # libvirt spells this one on/off, not yes/no.
            "<domainbackup><disks><disk name='vda'><driver shallow='yes'/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': driver shallow 'yes' is not one of on, off",
        ),
        ("<domainbackup mode='sideways'/>", "mode 'sideways' is not one of push, pull"),
        (
            "<domainbackup><disks><disk name='vda' backup='maybe'/></disks></domainbackup>",
            "disk 'vda': backup 'maybe' is not one of yes, no",
        ),
        (
            "<domainbackup><disks><disk name='vda' reuse='on'/></disks></domainbackup>",
            "disk 'vda': reuse 'on' is not one of yes, no",
        ),
        (
            "<domainbackup mode='pull'><server tls='1'/></domainbackup>",
            "server tls '1' is not one of yes, no",
        ),
        (
            "<domainbackup><disks><disk name='vda' backupmode='diff'/></disks></domainbackup>",
            "disk 'vda': backupmode 'diff' is not one of full, incremental",
        ),
        (
            "<domainbackup><disks><disk name='vda' type='block'/></disks></domainbackup>",
            "disk 'vda': type='block' needs its device: <target dev='/dev/…'/> (push) or "
            "<scratch dev='/dev/…'/> (pull)",
        ),
        (
            "<domainbackup mode='pull'><server transport='rdma'/></domainbackup>",
            "server transport 'rdma' is not one of tcp, unix",
        ),
        (
            "<domainbackup mode='pull'><server transport='unix' socket='/s' port='1'/>"
            "</domainbackup>",
            "server: a unix socket server takes no port",
        ),
        (
            "<domainbackup><server name='localhost'/></domainbackup>",
            "a push backup takes no <server>",
        ),
        (
            "<domainbackup><disks><disk name='vda'><scratch file='/s'/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': <scratch> is for pull mode",
        ),
        (
            "<domainbackup><disks><disk name='vda'/><disk name='vda'/></disks></domainbackup>",
            "disk 'vda' is listed twice",
        ),
        (
            "<domainbackup><disks><disk name='../vda'/></disks></domainbackup>",
            "disk #1: invalid disk name '../vda'",
        ),
        (
            "<domainbackup><disks><disk/></disks></domainbackup>",
            "disk #1: name is missing",
        ),
        (
            "<domainbackup><incremental>a/b</incremental></domainbackup>",
            "incremental: invalid checkpoint name 'a/b'",
        ),
        (
            "<domainbackup><disks><disk name='vda' exportname='x y'/></disks></domainbackup>",
            "disk 'vda': exportname: invalid export name 'x y'",
        ),
        ("<domainbackup><incremental/></domainbackup>", "<incremental> is empty"),
        # Unknown or misplaced XML
        ("<domainbackup><foo/></domainbackup>", "unknown element <foo> in <domainbackup>"),
        ("<domainbackup id='1'/>", "unknown attribute 'id' on <domainbackup>"),
        (
            "<domainbackup><disks><disk name='vda' size='1'/></disks></domainbackup>",
            "disk 'vda': unknown attribute 'size' on <disk>",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target dev='/dev/sdb'/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': <target dev=…/> is a block device: it needs type='block'",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target file='/t'><encryption/></target>"
            "</disk></disks></domainbackup>",
            "disk 'vda': <encryption> needs format='luks'",
        ),
        (
            "<domainbackup><disks><disk name='vda'><source file='/t'/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': unknown element <source> in <disk>",
        ),
        (
            "<domainbackup><disks><vda/></disks></domainbackup>",
            "unknown element <vda> in <disks>",
        ),
        (
            "<domainbackup><server port='1'><tls/></server></domainbackup>",
            "server: unknown element <tls> in <server>",
        ),
        (
            "<domainbackup><server/><server/></domainbackup>",
            "<server> is given twice in <domainbackup>",
        ),
        (
            "<domainbackup><disks><disk name='vda'><driver/><driver/></disk></disks>"
            "</domainbackup>",
            "disk 'vda': <driver> is given twice in <disk>",
        ),
        ("<domainbackup>push</domainbackup>", "unexpected text 'push' in <domainbackup>"),
        (
            "<domainbackup><disks/>vda</domainbackup>",
            "unexpected text 'vda' in <domainbackup>",
        ),
        (
            "<domainbackup><incremental><name>c1</name></incremental></domainbackup>",
            "unexpected element <name> in <incremental>",
        ),
        (
            # libvirt's checkpoint-only elements are not silently taken in a backup.
            "<domainbackup><creationTime>1</creationTime></domainbackup>",
            "unknown element <creationTime> in <domainbackup>",
        ),
        ("<domain type='kvm'/>", "root element is <domain>, expected <domainbackup>"),
        (SLIDE_CHECKPOINT, "root element is <domaincheckpoint>, expected <domainbackup>"),
        (
            '<b:domainbackup xmlns:b="urn:x"/>',
            "root element is <{urn:x}domainbackup>, expected <domainbackup>",
        ),
        ("<domainbackup>\n<disks>\n</domainbackup>", "invalid XML: mismatched tag (line 3, "),
        ("\n\n<domainbackup", "invalid XML: unclosed token (line 3, column 1)"),
        ("<domainbackup>&nbsp;</domainbackup>", "invalid XML: undefined entity (line 1"),
        # YAML and JSON
        (
            '{"disks": [{"name": "vda", "format": "qcow3"}]}',
            "disk 'vda': format 'qcow3' is not one of qcow2, raw",
        ),
        ("disks: [{name: vda, shallow: maybe}]", "disk 'vda': shallow 'maybe' is not a boolean"),
        ("mode: pull\nserver: {port: abc}\n", "server port 'abc' is not an integer"),
        ("disks: [{name: vda, foo: 1}]", "disk 'vda': unknown field 'foo'"),
        ("modes: push", "unknown field 'modes'"),
        ("1: push", "key 1 is not a string"),
        ("disks: vda", "disks: expected a list, got a string"),
        ("disks: [vda]", "disk #1: expected a mapping, got a string"),
        (
            "disks: [{name: vda, incremental: 2024-01-01}]",
            "disk 'vda': incremental: expected a string, got a date '2024-01-01' (quote it)",
        ),
        ("mode: pull\nserver: localhost", "server: expected a mapping, got a string"),
        (
            "disks: [{name: vda, driver: {type: qcow2, cache: none}}]",
            "disk 'vda': unknown field 'driver.cache'",
        ),
        (
            "disks: [{name: vda, format: raw, driver: {type: qcow2}}]",
            "disk 'vda': both format and driver.type are given",
        ),
        ("disks: [{name: vda, driver: qcow2}]", "disk 'vda': driver: expected a mapping"),
        ("disks: [{name: vda, target: {dev: /x}}]", "disk 'vda': unknown field 'target.dev'"),
        ("disks: [{name: vda, target: {}}]", "disk 'vda': target.file is missing"),
        ("- mode: push\n", "expected a mapping at the top level, got a list"),
        ("push\n", "expected a mapping at the top level, got a string"),
        ("mode: push\nmode: pull\n", "key 'mode' is given twice (line 2)"),
        ('{"mode": "push", "mode": "pull"}', "key 'mode' is given twice"),
        ("mode: [push\n", "invalid YAML: expected ',' or ']', but got '<stream end>' (line 2"),
        (
            "mode: push\n---\nmode: pull\n",
            "invalid YAML: expected a single document in the stream, but found another document"
            " (line 2, column 1)",
        ),
        ('{"mode": "push" "x"}', "invalid JSON: Expecting ',' delimiter (line 1, column 17)"),
        ("", "document is empty"),
        (" \n\t\n", "document is empty"),
        ("# only a comment\n", "document is empty"),
        ("---\n", "document is empty"),
    ],
)
def test_backup_errors(text: str, message: str) -> None:
    got = spec_error(text, origin="backup.xml")
    assert got.startswith(f"in backup.xml: {message}"), got


def test_brief_error_example_exactly() -> None:
    xml = SLIDE_PUSH_FULL.replace('type="qcow2"', 'type="qcow3"')
    assert spec_error(xml, origin="backup.xml") == (
        "in backup.xml: disk 'vda': driver type 'qcow3' is not one of qcow2, raw"
    )


def test_default_origin() -> None:
    with pytest.raises(SpecError, match=r"^in <string>: document is empty$"):
        parse_backup_spec("")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<domaincheckpoint><name>../escape</name></domaincheckpoint>", "invalid checkpoint"),
        ("<domaincheckpoint><name>.hidden</name></domaincheckpoint>", "invalid checkpoint"),
        ("name: a/b", "invalid checkpoint name 'a/b'"),
        ('name: "a\\0b"', "invalid checkpoint name"),
        (f"name: {'c' * 201}", "invalid checkpoint name"),
        ("name: ''", "invalid checkpoint name ''"),
        ("<domaincheckpoint><name/></domaincheckpoint>", "<name> is empty"),
        ("<domaincheckpoint><name>a b</name></domaincheckpoint>", "invalid checkpoint name"),
        (
            "name: 20240101",
            "checkpoint name: expected a string, got an integer '20240101' (quote it)",
        ),
        (
            "<domaincheckpoint><name>c1</name><disks><disk name='vda' checkpoint='yes'/>"
            "</disks></domaincheckpoint>",
            "disk 'vda': checkpoint 'yes' is not one of bitmap, no",
        ),
        (
            "<domaincheckpoint><name>c1</name><disks><disk name='vda' bitmap='a:b'/>"
            "</disks></domaincheckpoint>",
            "disk 'vda': bitmap: invalid bitmap name 'a:b'",
        ),
        (
            "<domaincheckpoint><name>c1</name><disks><disk name='vda'><driver/></disk>"
            "</disks></domaincheckpoint>",
            "disk 'vda': unknown element <driver> in <disk>",
        ),
        (
            "<domaincheckpoint><name>c1</name><state>x</state></domaincheckpoint>",
            "unknown element <state> in <domaincheckpoint>",
        ),
        (
            "<domaincheckpoint><name>c1</name><description><b>x</b></description>"
            "</domaincheckpoint>",
            "unexpected element <b> in <description>",
        ),
        (
            "<domaincheckpoint><name>c1</name><name>c2</name></domaincheckpoint>",
            "<name> is given twice in <domaincheckpoint>",
        ),
        ("<domaincheckpoint id='3'/>", "unknown attribute 'id' on <domaincheckpoint>"),
        ("<domaincheckpoint><name lang='en'>c1</name></domaincheckpoint>", "unknown attribute"),
        (SLIDE_PUSH_FULL, "root element is <domainbackup>, expected <domaincheckpoint>"),
        ("name: c1\nsize: 3\n", "unknown field 'size'"),
        ("name: yes\n", "checkpoint name: expected a string, got a boolean 'True' (quote it)"),
        ("name: c1\ndescription: 2024-13-45\n", "invalid YAML: month must be in 1..12"),
        ("name: !!int c1\n", "invalid YAML: invalid literal for int() with base 10: 'c1'"),
        ("name: !!timestamp c1\n", "invalid YAML: "),
        ("name: !!binary c1\n", "invalid YAML: failed to decode base64 data"),
        ("? [a]\n: b\n", "invalid YAML: found unhashable key (line 1, column 3)"),
        ('name: "c\x00"', "invalid YAML: unacceptable character #x0000 at offset 8"),
        ("<domaincheckpoint><name>c\x00</name></domaincheckpoint>", "invalid XML: not well-formed"),
        ("<domaincheckpoint><name>c\ud800</name></domaincheckpoint>", "invalid XML: text is not"),
        ("name: 1" + "0" * 5000, "invalid YAML: Exceeds the limit (4300 digits)"),
        ('{"name": 1' + "0" * 5000 + "}", "invalid JSON: Exceeds the limit (4300 digits)"),
    ],
)
def test_checkpoint_errors(text: str, message: str) -> None:
    got = spec_error(text, checkpoint=True, origin="c.xml")
    assert got.startswith(f"in c.xml: {message}"), got


# --------------------------------------------------------------------------
# Hostile input

BILLION_LAUGHS = """\
<?xml version="1.0"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domaincheckpoint><name>c1</name><description>&lol9;</description></domaincheckpoint>
"""


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    start = time.monotonic()
    got = spec_error(BILLION_LAUGHS, checkpoint=True, origin="lol.xml")
    assert got == "in lol.xml: XML DOCTYPE declarations are not accepted"
    path = tmp_path / "lol.xml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(SpecError, match="DOCTYPE declarations are not accepted"):
        load_checkpoint_spec(path)
    assert time.monotonic() - start < 5


def test_external_entity_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("c1")
    xxe = (
        f'<!DOCTYPE d [<!ENTITY x SYSTEM "file://{secret}">]>'
        "<domaincheckpoint><name>&x;</name></domaincheckpoint>"
    )
    assert "DOCTYPE declarations are not accepted" in spec_error(xxe, checkpoint=True)


def test_plain_doctype_is_refused() -> None:
    text = "<!DOCTYPE domainbackup>" + SLIDE_PULL_INCREMENTAL
    assert "DOCTYPE declarations are not accepted" in spec_error(text)


def test_yaml_alias_bomb_is_refused() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        bomb += f"a{i}: &a{i} [{', '.join(['*a' if i == 1 else f'*a{i - 1}'] * 9)}]\n"
    assert "YAML aliases are not accepted (line 2)" in spec_error(bomb)


def test_yaml_unsafe_tags_are_refused() -> None:
    got = spec_error("mode: !!python/object/apply:os.system ['true']\n")
    assert got.startswith("in spec: invalid YAML: could not determine a constructor")


def test_deep_nesting_is_refused() -> None:
    for text in ['{"a": ' * 100_000 + "1" + "}" * 100_000, "a: " + "[" * 100_000]:
        got = spec_error(text)
        assert got.startswith("in spec: "), got


def test_too_large_text_is_refused() -> None:
    text = "name: c1\n" + "#" * MAX_SPEC_BYTES
    assert spec_error(text, checkpoint=True) == "in spec: document is larger than 1 MiB"
    # Counted in bytes, not characters.
    wide = "name: c1\n#" + "é" * (MAX_SPEC_BYTES // 2)
    assert len(wide) < MAX_SPEC_BYTES
    assert "larger than 1 MiB" in spec_error(wide, checkpoint=True)


def test_too_large_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    path.write_text(SLIDE_CHECKPOINT + "<!--" + "x" * MAX_SPEC_BYTES + "-->")
    with pytest.raises(SpecError) as info:
        load_checkpoint_spec(path)
    assert str(info.value) == f"in {path}: document is larger than 1 MiB"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.xml"
    with pytest.raises(SpecError) as info:
        load_backup_spec(path)
    assert str(info.value) == f"cannot read {path}: No such file or directory"
    assert info.value.exit_code == 2
    with pytest.raises(SpecError, match=r"^cannot read .*nope\.xml: No such file or directory$"):
        load_checkpoint_spec(str(path))


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^cannot read .*: Is a directory$"):
        load_backup_spec(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_bytes(b"")
    with pytest.raises(SpecError) as info:
        load_backup_spec(path)
    assert str(info.value) == f"in {path}: document is empty"


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_checkpoint_spec(path)
    assert str(info.value) == f"in {path}: not valid UTF-8 (byte 0xe9 at offset 9)"


def test_huge_values_are_not_echoed() -> None:
    got = spec_error("mode: " + "x" * 10_000)
    assert (
        got == "in spec: mode 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…' is not one of push, pull"
    )


# Block devices and encryption (libvirt's formatbackup: type='block', <encryption>).

BLOCK_ENCRYPTED_XML = """\
<domainbackup mode='push'>
  <disks>
    <disk name='vda' type='block'>
      <target dev='/dev/vg0/vda-backup'>
        <encryption format='luks'>
          <secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/>
        </encryption>
      </target>
      <driver type='qcow2'/>
    </disk>
    <disk name='vdb' type='file'>
      <target file='/b/vdb.qcow2'>
        <encryption format='luks'>
          <secret type='passphrase' usage='backup-key'/>
        </encryption>
      </target>
    </disk>
  </disks>
</domainbackup>
"""


def test_block_and_encrypted_targets_in_xml_yaml_json() -> None:
    from_xml = parse_backup_spec(BLOCK_ENCRYPTED_XML)
    vda, vdb = from_xml.disks
    assert (vda.type, vda.target, vda.format) == ("block", "/dev/vg0/vda-backup", "qcow2")
    assert vda.encryption is not None and vdb.encryption is not None
    assert vda.encryption.secret.name == "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
    assert (vdb.type, vdb.target, vdb.encryption.secret.usage) == (
        "file",
        "/b/vdb.qcow2",
        "backup-key",
    )
    yaml_text = """\
mode: push
disks:
  - name: vda
    type: block
    target:
      dev: /dev/vg0/vda-backup
      encryption:
        format: luks
        secret: {type: passphrase, uuid: 0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f}
    driver: {type: qcow2}
  - {name: vdb, target: /b/vdb.qcow2, encryption: {secret: {usage: backup-key}}}
"""
    assert parse_backup_spec(yaml_text) == from_xml
    assert parse_backup_spec(json.dumps(from_xml.model_dump())) == from_xml
    assert parse_backup_spec(backup_to_xml(from_xml)) == from_xml


def test_pull_block_scratch_and_default_encrypted_scratch() -> None:
    spec = parse_backup_spec(
        "<domainbackup mode='pull'><disks>"
        "<disk name='vda' type='block'><scratch dev='/dev/loop7'/></disk>"
        "<disk name='vdb'><scratch><encryption format='luks'>"
        "<secret type='passphrase' usage='k'/></encryption></scratch></disk>"
        "</disks></domainbackup>"
    )
    vda, vdb = spec.disks
    assert (vda.type, vda.scratch) == ("block", "/dev/loop7")
    assert vdb.scratch is None and vdb.encryption is not None
    assert parse_backup_spec(backup_to_xml(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "<domainbackup><disks><disk name='vda' type='block'><target file='/dev/sdb'/>"
            "</disk></disks></domainbackup>",
            "disk 'vda': type='block' names its device with <target dev=…/>",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target file='/t'><encryption format='luks'/>"
            "</target></disk></disks></domainbackup>",
            "disk 'vda': <encryption> needs a <secret type='passphrase' uuid=…/>",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target file='/t'><encryption format='qcow'>"
            "<secret type='passphrase' uuid='u'/></encryption></target></disk></disks>"
            "</domainbackup>",
            "disk 'vda': encryption format 'qcow' is not one of luks",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target file='/t'><encryption format='luks'>"
            "<secret type='volume' uuid='u'/></encryption></target></disk></disks>"
            "</domainbackup>",
            "disk 'vda': secret type 'volume' is not one of passphrase",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target file='/t'><encryption format='luks'>"
            "<secret type='passphrase' uuid='u' usage='v'/></encryption></target></disk></disks>"
            "</domainbackup>",
            "disk 'vda': secret: a <secret> names its passphrase by uuid or by usage",
        ),
        (
            "<domainbackup><disks><disk name='vda'><target file='/t'><encryption format='luks'>"
            "<secret type='passphrase' uuid='u'/></encryption></target><driver type='raw'/>"
            "</disk></disks></domainbackup>",
            "disk 'vda': <encryption> needs the qcow2 format",
        ),
        (
            "disks: [{name: vda, type: block, target: {file: /x}}]",
            "disk 'vda': unknown field 'target.file' (use target.dev)",
        ),
        (
            "disks: [{name: vda, encryption: {secret: {uuid: a}}, "
            "target: {file: /x, encryption: {secret: {uuid: a}}}}]",
            "disk 'vda': unknown field 'target.encryption' (encryption is given twice)",
        ),
        ("disks: [{name: vda, type: disk}]", "disk 'vda': type 'disk' is not one of file, block"),
    ],
)
def test_block_and_encryption_errors(text: str, message: str) -> None:
    got = spec_error(text, origin="backup.xml")
    assert got.startswith(f"in backup.xml: {message}"), got
