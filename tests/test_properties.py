"""Property tests (hypothesis) of qmpbackup.request.loader: round trips and hostile input.

Round trips: valid BackupSpec/CheckpointSpec values rendered as libvirt XML, YAML
and JSON load back equal.  Hostile input (random bytes and text, edited
documents, entities, aliases, tags, duplicate keys, wrong types, huge or deeply
nested documents, unsafe names and paths) loads, with only safe names, or fails
with SpecError: never another exception, never a hang.

Each test runs a bounded number of examples, so the file takes a few seconds.
For a longer hunt, ``QMPBACKUP_HYPOTHESIS_EXAMPLES`` replaces every test's own
``max_examples`` (and sets the runs of tests/test_checkpoint_model.py)::

    QMPBACKUP_HYPOTHESIS_EXAMPLES=500 python -m pytest -q tests/test_properties.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from qmpbackup.errors import InvalidInputError, SpecError
from qmpbackup.request import (
    MAX_SPEC_BYTES,
    BackupSpec,
    CheckpointDiskSpec,
    CheckpointSpec,
    DiskBackupSpec,
    EncryptionSpec,
    ServerSpec,
    load_backup_spec,
    load_checkpoint_spec,
    parse_backup_spec,
    parse_checkpoint_spec,
)
from qmpbackup.request.models import CHECKPOINT_NAME_RE, NAME_RE

T = TypeVar("T")
Spec = BackupSpec | CheckpointSpec

# Seconds one parse may take before the test calls it a hang.
PARSE_LIMIT = 5.0


def examples(default: int) -> int:
    """``max_examples`` of a test: ``default``, or QMPBACKUP_HYPOTHESIS_EXAMPLES."""
    return int(os.environ.get("QMPBACKUP_HYPOTHESIS_EXAMPLES", default))


def bounded(default: int) -> Callable[[T], T]:
    """Hypothesis settings of this file: ``default`` examples, no per-example deadline."""
    return settings(
        max_examples=examples(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# The documented rule, written out on its own: the whole string, not up to a final newline.
STRICT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


# Checkpoint and bitmap names: libvirt's rule (a leading '_' or '-' too, no leading '.'),
# '+' kept, at most 200.
STRICT_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.+-]{0,199}")
CHECKPOINT_FIELDS = ("incremental", "disk.incremental", "disk.exportbitmap", "name", "disk.bitmap")


def is_name(value: str, field: str = "disk.name") -> bool:
    """True when ``value`` is a safe name for ``field`` by the documented rule."""
    rule = STRICT_CHECKPOINT_NAME if field in CHECKPOINT_FIELDS else STRICT_NAME
    return rule.fullmatch(value) is not None


def test_strict_rule_agrees_with_name_re_on_single_lines() -> None:
    """The oracles above are NAME_RE and CHECKPOINT_NAME_RE, but for what ``$`` lets through."""
    for value in ["c1", "a" * 64, "a" * 65, "a" * 200, "a" * 201, "-a", "_a", "+a", "a b", "."]:
        assert is_name(value) == bool(NAME_RE.match(value))
        assert is_name(value, "name") == bool(CHECKPOINT_NAME_RE.match(value))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"parsing took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(parse: Callable[[], Spec]) -> Spec | SpecError:
    """The model ``parse`` returns, or the SpecError it raises; anything else fails the test."""
    start = time.monotonic()
    try:
        with time_limit(PARSE_LIMIT):
            return parse()
    except SpecError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
        assert "Traceback" not in message and "pydantic" not in message
        assert err.exit_code == 2 and isinstance(err, InvalidInputError)
        return err
    finally:
        assert time.monotonic() - start < PARSE_LIMIT


def spec_names(spec: Spec) -> list[tuple[str, str]]:
    """Every name a loaded spec carries (disk, checkpoint, export, bitmap), with its field."""
    if isinstance(spec, CheckpointSpec):
        names = [] if spec.name is None else [(spec.name, "name")]
        for cdisk in spec.disks:
            names += [(cdisk.name, "disk.name")]
            names += [] if cdisk.bitmap is None else [(cdisk.bitmap, "disk.bitmap")]
        return names
    names = [] if spec.incremental is None else [(spec.incremental, "incremental")]
    for disk in spec.disks:
        names.append((disk.name, "disk.name"))
        names += [
            (n, f"disk.{field}")
            for n, field in (
                (disk.incremental, "incremental"),
                (disk.exportname, "exportname"),
                (disk.exportbitmap, "exportbitmap"),
            )
            if n is not None
        ]
    return names


def check_accepted(result: Spec | SpecError) -> None:
    """Whatever a loader accepts carries only safe names."""
    if not isinstance(result, SpecError):
        bad = [n for n, field in spec_names(result) if not is_name(n, field)]
        assert not bad, f"accepted unsafe names {bad!r} in {result!r}"


# --------------------------------------------------------------------------
# Strategies of valid specs

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", fullmatch=True)
# Text XML 1.0 can carry (as character references where needed): no C0 controls
# but tab, newline and carriage return; no surrogates; no U+FFFE/U+FFFF.
XML_CHARS = st.characters(
    codec="utf-8",
    exclude_characters=[chr(c) for c in range(32) if c not in (9, 10, 13)] + ["\ufffe", "\uffff"],
)
free_text = st.text(XML_CHARS, max_size=40)


def xml_legal(char: str) -> bool:
    """True when XML 1.0 can carry ``char`` (as itself or as a character reference)."""
    code = ord(char)
    return (
        code in (9, 10, 13) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code > 0xFFFF
    )


paths = st.one_of(
    st.builds(
        lambda parts: "/" + "/".join(parts), st.lists(st.text(XML_CHARS, min_size=1), max_size=4)
    ),
    # A relative path: the models resolve it against the current directory.
    st.text(XML_CHARS, min_size=1, max_size=40),
)


@st.composite
def servers(draw: st.DrawFn) -> ServerSpec:
    """A valid NBD server of a pull backup."""
    transport = draw(st.sampled_from(["tcp", "unix"]))
    name = draw(st.none() | free_text)
    if transport == "tcp":
        port = draw(st.none() | st.integers(1, 65535))
        return ServerSpec(transport="tcp", name=name, port=port, tls=draw(st.booleans()))
    return ServerSpec(transport="unix", name=name, socket=draw(st.none() | paths))


@st.composite
def backup_disks(draw: st.DrawFn, name: str, mode: str) -> DiskBackupSpec:
    """A valid ``<disk>`` of a backup in ``mode``: export names in pull mode only, no
    checkpoint with backupmode='full', a pull scratch qcow2 (as libvirt's schema says)."""
    path = draw(st.none() | paths)
    pull = mode == "pull"
    backupmode = draw(st.sampled_from([None, "full", "incremental"]))
    fmt = draw(st.sampled_from([None, "qcow2"] if pull else [None, "qcow2", "raw"]))
    secret = draw(
        st.sampled_from([{"uuid": "c0ffee00-0000-4000-8000-000000000001"}, {"usage": "u"}])
    )
    encryption = draw(st.none() | st.just({"secret": secret})) if fmt != "raw" else None
    return DiskBackupSpec(
        name=name,
        type="block" if path is not None and draw(st.booleans()) else "file",
        encryption=encryption,
        backup=draw(st.booleans()),
        backupmode=backupmode,
        incremental=None if backupmode == "full" else draw(st.none() | names),
        exportname=draw(st.none() | names) if pull else None,
        exportbitmap=draw(st.none() | names) if pull else None,
        target=path if mode == "push" else None,
        scratch=path if pull else None,
        format=fmt,
        shallow=draw(st.booleans()),
        reuse=draw(st.booleans()),
    )


@st.composite
def backup_specs(draw: st.DrawFn) -> BackupSpec:
    """A valid ``<domainbackup>``."""
    mode = draw(st.sampled_from(["push", "pull"]))
    disk_names = draw(st.lists(names, unique=True, max_size=4))
    return BackupSpec(
        mode=mode,
        incremental=draw(st.none() | names),
        server=draw(st.none() | servers()) if mode == "pull" else None,
        disks=tuple(draw(backup_disks(n, mode)) for n in disk_names),
    )


@st.composite
def checkpoint_specs(draw: st.DrawFn) -> CheckpointSpec:
    """A valid ``<domaincheckpoint>``."""
    disk_names = draw(st.lists(names, unique=True, max_size=4))
    kinds = [draw(st.sampled_from(["bitmap", "no"])) for _ in disk_names]
    disks = tuple(
        CheckpointDiskSpec(
            name=n,
            checkpoint="bitmap" if kind == "bitmap" else "no",
            bitmap=draw(st.none() | names) if kind == "bitmap" else None,
        )
        for n, kind in zip(disk_names, kinds, strict=True)
    )
    return CheckpointSpec(
        name=draw(st.none() | names),
        description=draw(st.none() | free_text),
        disks=disks,
        # As checkpoint-dumpxml writes them (checkpoint-create --redefine reads them).
        parent=draw(st.none() | names),
        creation_time=draw(st.none() | st.integers(0, 1 << 40)),
    )


# --------------------------------------------------------------------------
# Rendering: libvirt XML, and the mapping YAML and JSON are dumped from


def xml_text(value: str) -> str:
    """``value`` as XML character data (a carriage return kept as a reference)."""
    return escape(value, {"\r": "&#13;"})


def xml_element(
    tag: str, attrs: list[tuple[str, str]], children: list[str], rnd: random.Random
) -> str:
    """An element with shuffled attributes and children and random blanks between them."""
    rnd.shuffle(attrs)
    rnd.shuffle(children)
    head = tag + "".join(f"{rnd.choice([' ', '  ', chr(10)])}{k}={quoteattr(v)}" for k, v in attrs)
    if not children and rnd.random() < 0.5:
        return f"<{head}/>"
    blanks = [rnd.choice(["", "\n", "\n  ", " \t"]) for _ in range(len(children) + 1)]
    body = "".join(b + c for b, c in zip(blanks, children, strict=False)) + blanks[-1]
    return f"<{head}>{body}</{tag}>"


def padded(value: str, rnd: random.Random) -> str:
    """A name as element text, with the blanks the loader strips."""
    return rnd.choice(["", " ", "\n  "]) + xml_text(value) + rnd.choice(["", " ", "\n"])


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def written(rnd: random.Random, is_default: bool) -> bool:
    """Whether a field is written out: always unless it has its default, then sometimes."""
    return not is_default or rnd.random() < 0.3


def backup_xml(spec: BackupSpec, rnd: random.Random) -> str:
    """``spec`` as libvirt ``<domainbackup>`` XML; defaults are sometimes written out."""
    attrs: list[tuple[str, str]] = (
        [("mode", spec.mode)] if written(rnd, spec.mode == "push") else []
    )
    children: list[str] = []
    if spec.incremental is not None:
        children.append(f"<incremental>{padded(spec.incremental, rnd)}</incremental>")
    if spec.server is not None:
        server = spec.server
        sattrs: list[tuple[str, str]] = []
        if written(rnd, server.transport == "tcp"):
            sattrs.append(("transport", server.transport))
        sattrs += [
            (k, v) for k, v in (("name", server.name), ("socket", server.socket)) if v is not None
        ]
        if server.port is not None:
            sattrs.append(("port", str(server.port)))
        if written(rnd, not server.tls):
            sattrs.append(("tls", yes_no(server.tls)))
        children.append(xml_element("server", sattrs, [], rnd))
    if spec.disks or rnd.random() < 0.3:
        disks = [backup_disk_xml(d, spec.mode, rnd) for d in spec.disks]
        # Disk order is meaningful: not shuffled.
        children.append("<disks>" + "".join(disks) + "</disks>")
    return xml_element("domainbackup", attrs, children, rnd)


def backup_disk_xml(disk: DiskBackupSpec, mode: str, rnd: random.Random) -> str:
    attrs: list[tuple[str, str]] = [("name", disk.name)]
    if written(rnd, disk.backup):
        attrs.append(("backup", yes_no(disk.backup)))
    if written(rnd, not disk.reuse):
        attrs.append(("reuse", yes_no(disk.reuse)))
    if written(rnd, disk.type == "file"):
        attrs.append(("type", disk.type))
    for key in ("backupmode", "incremental", "exportname", "exportbitmap"):
        value = getattr(disk, key)
        if value is not None:
            attrs.append((key, value))
    children: list[str] = []
    inner = [] if disk.encryption is None else [encryption_xml(disk.encryption, rnd)]
    for tag in ("target", "scratch"):
        value = getattr(disk, tag)
        if value is not None:
            store = "dev" if disk.type == "block" else "file"
            children.append(xml_element(tag, [(store, value)], inner, rnd))
    if inner and disk.target is None and disk.scratch is None:
        # Encrypted with a default path: <target> (push) or <scratch> (pull) without one.
        children.append(xml_element("target" if mode == "push" else "scratch", [], inner, rnd))
    driver: list[tuple[str, str]] = [("type", disk.format)] if disk.format is not None else []
    if written(rnd, not disk.shallow):
        driver.append(("shallow", "on" if disk.shallow else "off"))
    if driver or rnd.random() < 0.2:
        children.append(xml_element("driver", driver, [], rnd))
    return xml_element("disk", attrs, children, rnd)


def encryption_xml(encryption: EncryptionSpec, rnd: random.Random) -> str:
    secret = encryption.secret
    sattrs = [("type", "passphrase")] + [
        (k, v) for k, v in (("uuid", secret.uuid), ("usage", secret.usage)) if v is not None
    ]
    inner = [xml_element("secret", sattrs, [], rnd)]
    return xml_element("encryption", [("format", "luks")], inner, rnd)


# The read-only part of `virsh checkpoint-dumpxml` the loader ignores.
DUMPXML_EXTRAS = [
    "<domain type='kvm'><name>f25</name><devices><disk/></devices></domain>",
]


def checkpoint_xml(spec: CheckpointSpec, rnd: random.Random) -> str:
    """``spec`` as libvirt ``<domaincheckpoint>`` XML, sometimes with dumpxml's extras."""
    children = [] if spec.name is None else [f"<name>{padded(spec.name, rnd)}</name>"]
    if spec.description is not None:
        children.append(f"<description>{xml_text(spec.description)}</description>")
    if spec.parent is not None:
        children.append(f"<parent><name>{padded(spec.parent, rnd)}</name></parent>")
    if spec.creation_time is not None:
        children.append(f"<creationTime>{spec.creation_time}</creationTime>")
    children += [extra for extra in DUMPXML_EXTRAS if rnd.random() < 0.3]
    if spec.disks or rnd.random() < 0.3:
        disks = []
        for disk in spec.disks:
            attrs = [("name", disk.name)]
            if disk.checkpoint != "bitmap" or rnd.random() < 0.5:
                attrs.append(("checkpoint", disk.checkpoint))
            if disk.bitmap is not None:
                attrs.append(("bitmap", disk.bitmap))
            if rnd.random() < 0.2:
                attrs.append(("size", str(rnd.randrange(1 << 40))))
            disks.append(xml_element("disk", attrs, [], rnd))
        children.append("<disks>" + "".join(disks) + "</disks>")
    return xml_element("domaincheckpoint", [], children, rnd)


def backup_mapping(spec: BackupSpec, rnd: random.Random) -> dict[str, Any]:
    """``spec`` as YAML/JSON fields; a disk is flat or in libvirt's nesting."""
    data = spec.model_dump(exclude_defaults=rnd.random() < 0.7, exclude_none=rnd.random() < 0.7)
    for disk in data.get("disks", []):
        if rnd.random() < 0.5:
            driver = {
                key: disk.pop(k)
                for key, k in (("type", "format"), ("shallow", "shallow"))
                if k in disk
            }
            if driver or rnd.random() < 0.3:
                disk["driver"] = driver
            for tag in ("target", "scratch"):
                if disk.get(tag) is not None:
                    store = "dev" if disk.get("type") == "block" else "file"
                    disk[tag] = {store: disk[tag]}
                    if disk.get("encryption") is not None and rnd.random() < 0.5:
                        disk[tag]["encryption"] = disk.pop("encryption")
    return data


def dump_yaml(data: dict[str, Any], rnd: random.Random) -> str:
    """``data`` as YAML, block or flow, escaped or not.

    PyYAML's emitter writes U+0085, U+2028 and U+2029 unescaped in single quotes
    with allow_unicode, where they read back as line breaks: those go escaped.
    """
    breaks = any(c in json.dumps(data, ensure_ascii=False) for c in "\x85\u2028\u2029")
    return yaml.safe_dump(
        data,
        allow_unicode=not breaks and rnd.random() < 0.5,
        default_flow_style=rnd.choice([False, True, None]),
        sort_keys=rnd.random() < 0.5,
    )


def dump_json(data: dict[str, Any], rnd: random.Random) -> str:
    return json.dumps(data, ensure_ascii=rnd.random() < 0.5, indent=rnd.choice([None, 2]))


# --------------------------------------------------------------------------
# Round trips


@bounded(80)
@given(spec=backup_specs(), rnd=st.randoms(use_true_random=False))
def test_backup_round_trip(spec: BackupSpec, rnd: random.Random) -> None:
    """A backup rendered as XML, YAML and JSON loads back as the same model."""
    mapping = backup_mapping(spec, rnd)
    loaded = {
        "xml": parse_backup_spec(backup_xml(spec, rnd)),
        "yaml": parse_backup_spec(dump_yaml(mapping, rnd)),
        "json": parse_backup_spec(dump_json(mapping, rnd)),
    }
    assert loaded == {"xml": spec, "yaml": spec, "json": spec}


@bounded(80)
@given(spec=checkpoint_specs(), rnd=st.randoms(use_true_random=False))
def test_checkpoint_round_trip(spec: CheckpointSpec, rnd: random.Random) -> None:
    """A checkpoint rendered as XML, YAML and JSON loads back as the same model."""
    mapping = spec.model_dump(exclude_defaults=rnd.random() < 0.5)
    loaded = {
        "xml": parse_checkpoint_spec(checkpoint_xml(spec, rnd)),
        "yaml": parse_checkpoint_spec(dump_yaml(mapping, rnd)),
        "json": parse_checkpoint_spec(dump_json(mapping, rnd)),
    }
    assert loaded == {"xml": spec, "yaml": spec, "json": spec}


@bounded(25)
@given(
    spec=backup_specs(),
    rnd=st.randoms(use_true_random=False),
    suffix=st.sampled_from(["xml", "yaml", "json"]),
)
def test_backup_file_round_trip(spec: BackupSpec, rnd: random.Random, suffix: str) -> None:
    """A file in any encoding its XML declaration names loads like the text."""
    if suffix == "xml":
        # Not UTF-16: its BOM hides the '<' the format is sniffed from (see the report).
        encoding = rnd.choice(["UTF-8", "ISO-8859-1", "windows-1252"])
        text = backup_xml(spec, rnd)
        if encoding != "UTF-8":
            # Characters the encoding lacks go as character references.
            text = text.encode(encoding, "xmlcharrefreplace").decode(encoding)
        data = f'<?xml version="1.0" encoding="{encoding}"?>\n{text}'.encode(encoding)
    else:
        mapping = backup_mapping(spec, rnd)
        text = dump_yaml(mapping, rnd) if suffix == "yaml" else dump_json(mapping, rnd)
        data = rnd.choice([b"", b"\xef\xbb\xbf"]) + text.encode()
    assume(len(data) <= MAX_SPEC_BYTES)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"spec.{suffix}"
        path.write_bytes(data)
        assert load_backup_spec(path) == spec


# --------------------------------------------------------------------------
# Names: whatever is accepted obeys the rule; whatever obeys the rule is accepted

TRICKY_NAMES = [
    "", ".", "..", "../vda", "a/b", "/etc/passwd", "-rf", ".hidden", "_x", "+x",
    "x" * 64, "x" * 65, "a b", "a\tb", "c1\n", "c1\r\n", "\nc1", " c1", "c1 ", "c1\x00",
    "c1\x7f", "c1\x1b[31m", "vda\u200b", "vd\u0430", "\uff56\uff44\uff41", "c\u0301",
    "\u212aelvin", "\u0663", "c1\u2028", "c1\u0085", "c1\ufeff", "\u00a0c1", "a:b", "a,b",
    "a=b", "a'b", 'a"b', "a<b>", "a&b", "a\\b", "$(id)", "`id`", "a;b", "a|b", "*", "~",
    "vda\n\n", "c1\n ", "0\n",
]  # fmt: skip


@st.composite
def mutated_names(draw: st.DrawFn) -> str:
    """A valid name with one character inserted, replaced or appended."""
    name = draw(names)
    char = draw(
        st.sampled_from(["\n", "\r", " ", "\t", "\x00", "/", ":", "\u200b", "é", "."])
        | st.characters()
    )
    at = draw(st.integers(0, len(name)))
    how = draw(st.sampled_from(["insert", "replace", "append", "prepend"]))
    if how == "insert":
        return name[:at] + char + name[at:]
    if how == "replace":
        return name[:at] + char + name[at + 1 :]
    return name + char if how == "append" else char + name


hostile_names = st.one_of(
    st.sampled_from(TRICKY_NAMES), names, mutated_names(), st.text(max_size=70)
)

# Where a name goes: (kind, field, how XML carries it).
NAME_FIELDS = [
    ("backup", "incremental", "text"),
    ("backup", "disk.name", "attr"),
    ("backup", "disk.incremental", "attr"),
    ("backup", "disk.exportname", "attr"),
    ("backup", "disk.exportbitmap", "attr"),
    ("checkpoint", "name", "text"),
    ("checkpoint", "disk.name", "attr"),
    ("checkpoint", "disk.bitmap", "attr"),
]


def name_document(kind: str, field: str, value: str, fmt: str) -> str:
    """A document valid but for ``value`` in ``field``, in ``fmt``."""
    attr = field.removeprefix("disk.")
    if fmt == "xml":
        if field in ("incremental", "name"):
            tag = "domainbackup" if kind == "backup" else "domaincheckpoint"
            mode = " mode='pull'" if kind == "backup" else ""
            return f"<{tag}{mode}><{field}>{xml_text(value)}</{field}></{tag}>"
        disk = f"<disk name={quoteattr(value)}/>"
        if attr != "name":
            disk = f"<disk name='vda' {attr}={quoteattr(value)}/>"
        if kind == "backup":
            return f"<domainbackup mode='pull'><disks>{disk}</disks></domainbackup>"
        return f"<domaincheckpoint><name>c1</name><disks>{disk}</disks></domaincheckpoint>"
    # Pull mode: export names are for pull backups only.
    data: dict[str, Any] = {"mode": "pull"} if kind == "backup" else {"name": "c1"}
    if field.startswith("disk."):
        data["disks"] = [{"name": value} if attr == "name" else {"name": "vda", attr: value}]
    else:
        data[field] = value
    return json.dumps(data) if fmt == "json" else yaml.safe_dump(data, allow_unicode=True)


def name_in(spec: Spec, field: str) -> str | None:
    """The loaded value of ``field``."""
    if field.startswith("disk."):
        value: str | None = getattr(spec.disks[0], field.removeprefix("disk."))
        return value
    value = getattr(spec, field)
    return value


@bounded(300)
@given(
    where=st.sampled_from(NAME_FIELDS),
    fmt=st.sampled_from(["xml", "yaml", "json"]),
    value=hostile_names,
)
@example(where=("checkpoint", "name", "text"), fmt="json", value="c1\n")
@example(where=("backup", "disk.name", "attr"), fmt="yaml", value="vda\n")
@example(where=("backup", "disk.exportname", "attr"), fmt="xml", value="e\n")
def test_names_obey_the_rule(where: tuple[str, str, str], fmt: str, value: str) -> None:
    """A name is accepted iff it obeys the rule; accepted, it is kept as written."""
    kind, field, carrier = where
    document = name_document(kind, field, value, fmt)
    parse = parse_backup_spec if kind == "backup" else parse_checkpoint_spec
    result = outcome(lambda: parse(document, "names"))
    # XML element text is stripped of blanks; everything else is taken verbatim.
    expected = value.strip() if fmt == "xml" and carrier == "text" else value
    if isinstance(result, SpecError):
        # XML cannot carry every character, even one that str.strip() would remove.
        unsayable = fmt == "xml" and not all(map(xml_legal, value))
        assert unsayable or not is_name(expected, field), f"{expected!r} obeys the rule: {result}"
    else:
        assert is_name(expected, field), (
            f"{value!r} in {field} ({fmt}) accepted as {name_in(result, field)!r}"
        )
        assert name_in(result, field) == expected
        check_accepted(result)


@bounded(100)
@given(
    path=st.one_of(
        paths, st.sampled_from(["", "..", "rel/x", "/a/../b", "a\x00b", " /t ", "/t\n"]), st.text()
    ),
    fmt=st.sampled_from(["xml", "yaml", "json"]),
    tag=st.sampled_from(["target", "scratch"]),
)
def test_paths_are_kept_verbatim(path: str, fmt: str, tag: str) -> None:
    """A target or scratch path is refused with SpecError or loaded exactly as written, a
    relative one joined to the current directory (never normalised); an empty one is
    refused."""
    mode = "push" if tag == "target" else "pull"
    if fmt == "xml":
        document = (
            f"<domainbackup mode='{mode}'><disks><disk name='vda'><{tag} file={quoteattr(path)}/>"
            "</disk></disks></domainbackup>"
        )
    else:
        data = {"mode": mode, "disks": [{"name": "vda", tag: path}]}
        document = json.dumps(data) if fmt == "json" else yaml.safe_dump(data)
    result = outcome(lambda: parse_backup_spec(document, "paths"))
    if not isinstance(result, SpecError):
        assert path
        expected = path if path.startswith("/") else os.path.join(os.getcwd(), path)
        assert getattr(result.disks[0], tag) == expected
    elif path:
        # Only what XML cannot carry is refused.
        assert fmt == "xml" and not all(map(xml_legal, path)), str(result)
    else:
        assert "an empty path names no file" in str(result)


# --------------------------------------------------------------------------
# Hostile documents: only SpecError, never another exception, never a hang

ENCODINGS = [
    "UTF-8", "utf-16", "UTF-32", "ISO-8859-1", "latin1", "US-ASCII", "cp1252", "koi8-r",
    "bogus", "utf-7", "shift_jis", "big5", "cp500", "rot13", "hex", "base64", "idna",
    "punycode", "undefined", "",
]  # fmt: skip


@st.composite
def xml_declarations(draw: st.DrawFn) -> bytes:
    """An XML declaration naming a known, unsupported or made-up encoding."""
    encoding = draw(st.sampled_from(ENCODINGS) | st.text(st.characters(codec="ascii"), max_size=12))
    quote = draw(st.sampled_from(['"', "'"]))
    return f"<?xml version={quote}1.0{quote} encoding={quote}{encoding}{quote}?>".encode(
        "utf-8", "replace"
    )


@bounded(200)
@given(
    prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"<", b"{", b"\n  <"]) | xml_declarations(),
    body=st.binary(max_size=300),
    root=st.sampled_from([b"", b"<domainbackup>", b"<domaincheckpoint><name>c1</name>"]),
    checkpoint=st.booleans(),
)
@example(
    prefix=b'<?xml version="1.0" encoding="bogus"?>',
    body=b"",
    root=b"<domaincheckpoint><name>c1</name>",
    checkpoint=True,
)
@example(
    prefix=b'<?xml version="1.0" encoding="utf-32"?>',
    body=b"",
    root=b"<domainbackup>",
    checkpoint=False,
)
def test_random_bytes_from_a_file(
    prefix: bytes, body: bytes, root: bytes, checkpoint: bool
) -> None:
    """Any file loads as a model with safe names or fails with SpecError."""
    closing = (
        b"</domaincheckpoint>" if b"checkpoint" in root else b"</domainbackup>" if root else b""
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec"
        path.write_bytes(prefix + root + body + closing)
        load = load_checkpoint_spec if checkpoint else load_backup_spec
        check_accepted(outcome(lambda: load(path)))


# Pieces of the three syntaxes, for text that gets past the first character.
TOKENS = [
    "<domainbackup", "<domaincheckpoint", "<disks>", "<disk", "</disk>", "</disks>", " name=",
    "'vda'", '"c1"', "/>", ">", "<name>", "</name>", "<!DOCTYPE d [", "<!ENTITY e 'x'>", "]>",
    "&e;", "&#0;", "&#x10FFFF;", "<![CDATA[", "]]>", "<!--", "-->", "<?pi x?>", "{", "}", "[",
    "]", ":", ",", '"name"', '"disks"', '"mode"', "null", "true", "1e999", "NaN", "-", "\n",
    "  ", "\t", "name: ", "disks:", "mode: ", "- ", "&a ", "*a", "!!python/object:os.system",
    "!!binary", "!!set", "!!omap", "? ", "<<: ", "---", "...", "%YAML 1.1", "%TAG ! !foo",
    "'", '"', "\\u0000", "\\ud800", "#", "|", ">-", "\x00", "\ufeff", "\ud800", "\u2028",
]  # fmt: skip

structured_text = st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=40).map("".join)


@bounded(200)
@given(text=st.text(max_size=200) | structured_text, checkpoint=st.booleans())
def test_random_text(text: str, checkpoint: bool) -> None:
    """Any text parses to a model with safe names or fails with SpecError."""
    parse = parse_checkpoint_spec if checkpoint else parse_backup_spec
    check_accepted(outcome(lambda: parse(text, "random")))


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[bool, str]:
    """A valid document in any format with a few random edits."""
    rnd = draw(st.randoms(use_true_random=False))
    if draw(st.booleans()):
        cspec = draw(checkpoint_specs())
        fmt = draw(st.sampled_from(["xml", "yaml", "json"]))
        mapping = cspec.model_dump()
        text = {"xml": lambda: checkpoint_xml(cspec, rnd), "yaml": lambda: dump_yaml(mapping, rnd),
                "json": lambda: dump_json(mapping, rnd)}[fmt]()  # fmt: skip
        checkpoint = True
    else:
        bspec = draw(backup_specs())
        fmt = draw(st.sampled_from(["xml", "yaml", "json"]))
        bmapping = backup_mapping(bspec, rnd)
        text = {"xml": lambda: backup_xml(bspec, rnd), "yaml": lambda: dump_yaml(bmapping, rnd),
                "json": lambda: dump_json(bmapping, rnd)}[fmt]()  # fmt: skip
        checkpoint = False
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        end = draw(st.integers(at, min(len(text), at + 8)))
        piece = draw(st.sampled_from(TOKENS) | st.text(max_size=3))
        text = text[:at] + piece + text[end:]
    return checkpoint, text


@bounded(100)
@given(doc=mutated_documents())
def test_mutated_documents(doc: tuple[bool, str]) -> None:
    """A valid document with random edits loads with safe names or fails with SpecError."""
    checkpoint, text = doc
    parse = parse_checkpoint_spec if checkpoint else parse_backup_spec
    check_accepted(outcome(lambda: parse(text, "mutated")))


@st.composite
def entity_documents(draw: st.DrawFn) -> str:
    """Documents with a DOCTYPE: internal, external, parameter or exponential entities."""
    ent = draw(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True))
    decls = draw(
        st.lists(
            st.sampled_from(
                [
                    f'<!ENTITY {ent} "lol">',
                    f'<!ENTITY {ent} SYSTEM "file:///etc/passwd">',
                    f'<!ENTITY {ent} SYSTEM "http://127.0.0.1:1/x">',
                    f'<!ENTITY % {ent} SYSTEM "file:///etc/hostname"> %{ent};',
                    f'<!ENTITY {ent}2 "&{ent};&{ent};&{ent};&{ent};&{ent};&{ent};&{ent};&{ent};">',
                    f'<!ENTITY {ent} PUBLIC "-//x//y" "file:///dev/zero">',
                    "<!ELEMENT domaincheckpoint ANY>",
                    '<!ATTLIST disk name CDATA "vda">',
                ]
            ),
            max_size=4,
        )
    )
    doctype = draw(
        st.sampled_from(
            [
                f"<!DOCTYPE domaincheckpoint [{''.join(decls)}]>",
                '<!DOCTYPE domaincheckpoint SYSTEM "file:///etc/passwd">',
                '<!DOCTYPE domaincheckpoint PUBLIC "-//x//y" "http://127.0.0.1:1/d.dtd">',
                "<!DOCTYPE domaincheckpoint>",
            ]
        )
    )
    use = draw(st.sampled_from([f"&{ent};", f"&{ent}2;", "c1"]))
    where = draw(st.sampled_from(["name", "description", "attr"]))
    body = {
        "name": f"<name>{use}</name>",
        "description": f"<name>c1</name><description>{use}</description>",
        "attr": f"<name>c1</name><disks><disk name='{use}'/></disks>",
    }[where]
    decl = draw(st.sampled_from(["", '<?xml version="1.0"?>\n']))
    return f"{decl}{doctype}\n<domaincheckpoint>{body}</domaincheckpoint>"


@bounded(50)
@given(text=entity_documents(), as_file=st.booleans())
def test_doctype_and_entities_are_refused(text: str, as_file: bool) -> None:
    """Any DOCTYPE, hence any entity declaration, is refused before expansion."""
    if as_file:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "e.xml"
            path.write_text(text)
            result = outcome(lambda: load_checkpoint_spec(path))
    else:
        result = outcome(lambda: parse_checkpoint_spec(text, "e.xml"))
    assert isinstance(result, SpecError)
    assert "DOCTYPE declarations are not accepted" in str(result)


@st.composite
def yaml_with_aliases(draw: st.DrawFn) -> str:
    """YAML in which an anchor is defined and later used, anywhere in the document."""
    anchor = draw(st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True))
    value = draw(st.sampled_from(["c1", "[x, x]", "{name: vda}", "vda"]))
    template = draw(
        st.sampled_from(
            [
                "name: &{a} {v}\ndescription: *{a}\n",
                "name: c1\ndisks:\n  - &{a} {{name: vda}}\n  - *{a}\n",
                "mode: &{a} push\nincremental: *{a}\n",
                "x: &{a} {v}\n<<: *{a}\n",
                "name: c1\ndescription: &{a} [{v}, {v}]\nextra: [*{a}, *{a}, *{a}]\n",
                "? &{a} name\n: c1\n? *{a}\n: c2\n",
                "{{name: &{a} c1, description: *{a}}}",
            ]
        )
    )
    return template.format(a=anchor, v=value)


@bounded(40)
@given(text=yaml_with_aliases(), checkpoint=st.booleans())
def test_yaml_aliases_are_refused(text: str, checkpoint: bool) -> None:
    """An alias is refused wherever it appears, with its line."""
    parse = parse_checkpoint_spec if checkpoint else parse_backup_spec
    result = outcome(lambda: parse(text, "a.yaml"))
    assert isinstance(result, SpecError)
    assert "YAML aliases are not accepted (line " in str(result)


TAGS = [
    "!!python/object:os.system", "!!python/object/apply:os.system", "!!python/object/new:os.system",
    "!!python/name:os.system", "!!python/module:os", "!!python/tuple", "!!python/str",
    "!!python/unicode", "!!python/bytes", "!!python/complex", "!<tag:yaml.org,2002:python/none>",
    "!!binary", "!!set", "!!omap", "!!pairs", "!!timestamp", "!!float", "!!int", "!!bool",
    "!!null", "!!str", "!!map", "!!seq", "!custom", "!", "!<!foo>",
]  # fmt: skip


@bounded(100)
@given(
    tag=st.sampled_from(TAGS),
    value=st.sampled_from(
        ["c1", "['true']", "{a: b}", "''", "2024-01-01", "YWJj", "[[a, b]]", "1"]
    ),
    where=st.sampled_from(["name", "description", "key", "disk", "top"]),
)
def test_yaml_tags_never_run_code(tag: str, value: str, where: str) -> None:
    """A tagged node yields a model with plain data or SpecError; python tags never construct."""
    text = {
        "name": f"name: {tag} {value}\n",
        "description": f"name: c1\ndescription: {tag} {value}\n",
        "key": f"name: c1\n? {tag} {value}\n: x\n",
        "disk": f"name: c1\ndisks:\n  - {{name: vda, bitmap: {tag} {value}}}\n",
        "top": f"{tag} {value}\n",
    }[where]
    result = outcome(lambda: parse_checkpoint_spec(text, "t.yaml"))
    if tag.startswith(("!!python", "!<tag:yaml.org,2002:python")):
        assert isinstance(result, SpecError), result
        assert "could not determine a constructor" in str(result)
    if not isinstance(result, SpecError):
        check_accepted(result)
        assert isinstance(result, CheckpointSpec)
        assert result.description is None or type(result.description) is str


@st.composite
def duplicate_key_documents(draw: st.DrawFn) -> str:
    """A mapping, at the top or in a disk, with one key given twice."""
    fmt = draw(st.sampled_from(["yaml", "json", "yaml-flow"]))
    in_disk = draw(st.booleans())
    keys = ["name", "bitmap", "checkpoint"] if in_disk else ["name", "description", "disks"]
    key = draw(st.sampled_from(keys))
    first, second = draw(st.sampled_from([("c1", "c2"), ("c1", "c1"), ("vda", "vdb")]))
    if fmt == "json":
        pairs = f'"{key}": "{first}", "{key}": "{second}"'
        if in_disk:
            return '{"name": "c1", "disks": [{"name": "vda", ' + pairs + "}]}"
        return "{" + pairs + "}"
    if fmt == "yaml-flow":
        pairs = f"{key}: {first}, {key}: {second}"
        return f"{{name: c1, disks: [{{name: vda, {pairs}}}]}}" if in_disk else f"{{{pairs}}}"
    indent = "    " if in_disk else ""
    spelled = draw(st.sampled_from(["plain", "single", "double", "explicit", "merge"]))
    again = {
        "plain": f"{indent}{key}: {second}",
        "single": f"{indent}'{key}': {second}",
        "double": f'{indent}"{key}": {second}',
        "explicit": f"{indent}? {key}\n{indent}: {second}",
        # A merge key brings the key in again: PyYAML keeps the first, silently.
        "merge": f"{indent}<<: {{{key}: {second}}}",
    }[spelled]
    if in_disk:
        return f"name: c1\ndisks:\n  - name: vda\n{indent}{key}: {first}\n{again}\n"
    return f"{key}: {first}\n{again}\n"


@bounded(60)
@given(doc=duplicate_key_documents())
@example(doc="name: c1\n<<: {name: c2}\n")
@example(doc="name: c1\ndisks:\n  - name: vda\n    <<: {name: vdb}\n")
def test_duplicate_keys_are_refused(doc: str) -> None:
    """A key given twice (also through a YAML merge key) is refused, never silently dropped."""
    text = doc
    result = outcome(lambda: parse_checkpoint_spec(text, "d"))
    assert isinstance(result, SpecError), f"{text!r} loaded as {result!r}"
    # A merge key may as well be refused for what it is.
    if "<<" not in text:
        assert "is given twice" in str(result)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
BACKUP_FIELDS = ["mode", "incremental", "server", "disks", "extra"]
DISK_FIELDS = [
    "name", "backup", "backupmode", "incremental", "exportname", "exportbitmap", "type",
    "target", "scratch", "format", "shallow", "reuse", "driver", "encryption",
]  # fmt: skip
SERVER_FIELDS = ["transport", "name", "port", "socket", "tls"]


@bounded(150)
@given(
    where=st.sampled_from(
        [f"top.{f}" for f in BACKUP_FIELDS]
        + [f"disk.{f}" for f in DISK_FIELDS]
        + [f"server.{f}" for f in SERVER_FIELDS]
    ),
    value=json_values,
    as_yaml=st.booleans(),
)
@example(where="server.port", value=True, as_yaml=False)
def test_wrong_types(where: str, value: Any, as_yaml: bool) -> None:
    """Any JSON value in any field loads as a typed model or fails with SpecError.

    A boolean is no port number: ``port: true`` must not become port 1.
    """
    scope, field = where.split(".")
    data: dict[str, Any] = {
        "mode": "pull",
        "server": {"name": "localhost"},
        "disks": [{"name": "vda"}],
    }
    if scope == "top":
        data[field] = value
    elif scope == "disk":
        data["disks"][0][field] = value
    else:
        data["server"][field] = value
    text = yaml.safe_dump(data) if as_yaml else json.dumps(data)
    result = outcome(lambda: parse_backup_spec(text, "types"))
    check_accepted(result)
    if where == "server.port" and isinstance(value, bool):
        assert isinstance(result, SpecError), f"port {value!r} loaded as {result!r}"
    if isinstance(result, BackupSpec):
        for disk in result.disks:
            assert type(disk.backup) is bool and type(disk.shallow) is bool
            assert disk.target is None or type(disk.target) is str
        if result.server is not None:
            port = result.server.port
            assert port is None or (type(port) is int and 1 <= port <= 65535)


@bounded(15)
@given(
    char=st.characters(codec="utf-8", exclude_characters=["\n", "\r", '"', "\\"]),
    delta=st.integers(-4, 4),
    fmt=st.sampled_from(["json", "xml"]),
)
def test_size_cap_counts_bytes(char: str, delta: int, fmt: str) -> None:
    """A document is refused iff its UTF-8 encoding is longer than MAX_SPEC_BYTES."""
    assume(ord(char) >= 0x20 if fmt == "json" else xml_legal(char) and char not in "<&")
    head, tail = (
        ('{"name": "c1", "description": "', '"}')
        if fmt == "json"
        else ("<domaincheckpoint><name>c1</name><description>", "</description></domaincheckpoint>")
    )
    width = len(char.encode())
    count = (MAX_SPEC_BYTES + delta - len(head) - len(tail)) // width
    text = head + char * count + tail
    size = len(text.encode())
    result = outcome(lambda: parse_checkpoint_spec(text, "big"))
    if size > MAX_SPEC_BYTES:
        assert isinstance(result, SpecError) and "larger than 1 MiB" in str(result)
    else:
        assert isinstance(result, CheckpointSpec), result
        assert result.description == char * count


@bounded(8)
@given(
    depth=st.integers(1, 120_000),
    shape=st.sampled_from(
        ["json-list", "json-map", "yaml-flow", "yaml-block", "yaml-map", "xml", "xml-ignored"]
    ),
)
@example(depth=120_000, shape="xml-ignored")
@example(depth=100_000, shape="yaml-block")
def test_deep_nesting(depth: int, shape: str) -> None:
    """Nesting of any depth in any syntax loads or fails with SpecError, quickly."""
    text = {
        "json-list": lambda: '{"name": "c1", "description": ' + "[" * depth + "]" * depth + "}",
        "json-map": lambda: (
            '{"name": "c1", "description": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
        ),
        "yaml-flow": lambda: "name: c1\ndescription: " + "[" * depth + "]" * depth + "\n",
        "yaml-block": lambda: "name: c1\ndescription:\n" + "- " * depth + "x\n",
        "yaml-map": lambda: "name: c1\ndescription: " + "{a: " * depth + "1" + "}" * depth + "\n",
        "xml": lambda: (
            "<domaincheckpoint><name>c1</name><description>"
            + "<a>" * depth
            + "</a>" * depth
            + "</description></domaincheckpoint>"
        ),
        "xml-ignored": lambda: (
            "<domaincheckpoint><name>c1</name><domain>"
            + "<a>" * depth
            + "</a>" * depth
            + "</domain></domaincheckpoint>"
        ),
    }[shape]()
    result = outcome(lambda: parse_checkpoint_spec(text, "deep"))
    if shape == "xml-ignored" and len(text.encode()) <= MAX_SPEC_BYTES:
        # <domain> of checkpoint-dumpxml is ignored however deep it is.
        assert result == CheckpointSpec(name="c1")
    else:
        assert isinstance(result, SpecError)
