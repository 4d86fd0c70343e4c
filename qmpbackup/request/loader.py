"""Load backup and checkpoint requests from libvirt XML, YAML or JSON.

The format is sniffed from the content: a document whose first non-blank
character is ``<`` is XML, one starting with ``{`` is tried as JSON first,
anything else is YAML.  Every failure raises :class:`~qmpbackup.errors.SpecError`
with one line naming the document, the field and the problem.

XML is libvirt's ``<domainbackup>`` and ``<domaincheckpoint>``, read by
:mod:`qmpbackup.request.xml`.

YAML and JSON take the fields of the models in :mod:`qmpbackup.request.models`.
For a disk, libvirt's nesting ``driver: {type: qcow2, shallow: on}``,
``target: {file: …}``/``{dev: …}`` and ``scratch:`` likewise (with ``encryption:``) is
accepted as well as the flat ``format``, ``shallow``, ``target``, ``scratch``, ``encryption``.

Safety: documents larger than :data:`MAX_SPEC_BYTES` are refused; XML is
parsed with defusedxml and any DOCTYPE is refused (so no entity expansion);
YAML is read with a :class:`yaml.SafeLoader` that also refuses aliases and
duplicate keys.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar
from xml.etree.ElementTree import Element

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from qmpbackup.errors import SpecError
from qmpbackup.request.models import BackupSpec, CheckpointSpec
from qmpbackup.request.problem import InvalidDocument, disk_label, shorten
from qmpbackup.request.xml import backup_from_xml, checkpoint_from_xml, parse_xml

__all__ = [
    "MAX_SPEC_BYTES",
    "load_backup_spec",
    "load_checkpoint_spec",
    "parse_backup_spec",
    "parse_checkpoint_spec",
]

MAX_SPEC_BYTES = 1 << 20
"""Largest document accepted, in bytes (a spec is a few hundred bytes)."""

_M = TypeVar("_M", bound=BaseModel)
_Data = dict[str, Any]


# --------------------------------------------------------------------------
# Public API


def load_backup_spec(source: str | Path) -> BackupSpec:
    """Load a ``<domainbackup>`` (XML, YAML or JSON) from the file ``source``."""
    return _parse(_read(source), os.fspath(source), _BACKUP)


def parse_backup_spec(text: str, origin: str = "<string>") -> BackupSpec:
    """Parse a ``<domainbackup>`` (XML, YAML or JSON); ``origin`` names it in errors."""
    return _parse(text, origin, _BACKUP)


def load_checkpoint_spec(source: str | Path) -> CheckpointSpec:
    """Load a ``<domaincheckpoint>`` (XML, YAML or JSON) from the file ``source``."""
    return _parse(_read(source), os.fspath(source), _CHECKPOINT)


def parse_checkpoint_spec(text: str, origin: str = "<string>") -> CheckpointSpec:
    """Parse a ``<domaincheckpoint>`` (XML, YAML or JSON); ``origin`` names it in errors."""
    return _parse(text, origin, _CHECKPOINT)


# --------------------------------------------------------------------------
# Reading and sniffing


def _read(source: str | Path) -> bytes:
    name = os.fspath(source)
    try:
        with open(name, "rb") as f:
            # One byte more than the limit tells "too large" without reading a huge file.
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"cannot read {name}: {err.strerror or err}") from err
    return data


class _Kind(Generic[_M]):
    """What differs between a backup and a checkpoint document."""

    def __init__(
        self,
        model: type[_M],
        root: str,
        from_xml: Callable[[Element], _Data],
        from_mapping: Callable[[_Data], _Data],
        labels: Mapping[str, str],
    ) -> None:
        self.model = model
        self.root = root
        self.from_xml = from_xml
        self.from_mapping = from_mapping
        # Top-level field -> how errors call it.
        self.labels = labels


def _parse(data: str | bytes, origin: str, kind: _Kind[_M]) -> _M:
    try:
        if len(data) > MAX_SPEC_BYTES or (
            isinstance(data, str) and len(data.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES
        ):
            raise InvalidDocument("document is larger than 1 MiB")
        is_xml, fields = _load_document(data, kind)
    except InvalidDocument as err:
        raise SpecError(f"in {origin}: {err}") from None
    try:
        return kind.model.model_validate(fields)
    except ValidationError as err:
        message = _describe(err.errors(include_url=False)[0], fields, kind, is_xml)
        raise SpecError(f"in {origin}: {message}") from None


def _load_document(data: str | bytes, kind: _Kind[Any]) -> tuple[bool, _Data]:
    """Return whether ``data`` is XML, and its fields as model input."""
    if isinstance(data, bytes):
        body = data.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        if body.startswith(b"<"):
            # Bytes keep the XML encoding declaration meaningful.
            skipped = data[: len(data) - len(body)].count(b"\n")
            return True, kind.from_xml(parse_xml(body, skipped, kind.root))
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise InvalidDocument(
                f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"
            ) from None
    else:
        text = data.removeprefix("\ufeff")
        stripped = text.lstrip(" \t\r\n")
        if stripped.startswith("<"):
            skipped = text[: len(text) - len(stripped)].count("\n")
            return True, kind.from_xml(parse_xml(stripped, skipped, kind.root))
    if not text.strip():
        raise InvalidDocument("document is empty")
    value = _parse_json_or_yaml(text)
    if value is None:
        raise InvalidDocument("document is empty")
    if not isinstance(value, dict):
        raise InvalidDocument(f"expected a mapping at the top level, got {_type_name(value)}")
    return False, kind.from_mapping(value)


# --------------------------------------------------------------------------
# JSON and YAML


def _parse_json_or_yaml(text: str) -> Any:
    json_error: str | None = None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as err:
            # A YAML flow mapping also starts with '{': give YAML its chance.
            json_error = f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        except RecursionError:
            raise InvalidDocument("document is nested too deeply") from None
        except ValueError as err:
            # e.g. an integer longer than Python converts (sys.get_int_max_str_digits)
            raise InvalidDocument(f"invalid JSON: {shorten(str(err), 80)}") from None
    try:
        return yaml.load(text, Loader=_YamlLoader)  # safe: _YamlLoader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        if json_error is not None:
            raise InvalidDocument(json_error) from None
        where = ""
        if err.problem_mark is not None:
            mark = err.problem_mark
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = err.problem or err.context
        if err.problem and err.context and not err.context.startswith("while "):
            # e.g. "expected a single document in the stream" + "but found another document"
            problem = f"{err.context}, {err.problem}"
        raise InvalidDocument(f"invalid YAML: {problem}{where}") from None
    except yaml.reader.ReaderError as err:
        problem = f"unacceptable character #x{err.character:04x} at offset {err.position}"
        raise InvalidDocument(json_error or f"invalid YAML: {problem}") from None
    except yaml.YAMLError as err:
        first_line = str(err).partition("\n")[0]
        raise InvalidDocument(json_error or f"invalid YAML: {first_line}") from None
    except RecursionError:
        raise InvalidDocument("document is nested too deeply") from None
    except InvalidDocument:
        raise
    except Exception as err:
        # SafeLoader's constructors fail with plain exceptions on bad scalars
        # (2024-13-45, !!int foo, a 5000-digit integer): still the user's input.
        raise InvalidDocument(json_error or f"invalid YAML: {shorten(str(err), 80)}") from None


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidDocument(f"key {key!r} is given twice")
        result[key] = value
    return result


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and duplicate keys."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # Aliases let a few bytes stand for an exponentially large tree.
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise InvalidDocument(f"YAML aliases are not accepted (line {mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # PyYAML keeps the last of duplicate keys; a silently dropped setting is worse.
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # A merge key would override or hide keys as silently as a duplicate.
                line = key_node.start_mark.line + 1
                raise InvalidDocument(f"YAML merge keys ('<<') are not accepted (line {line})")
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    line = key_node.start_mark.line + 1
                    raise InvalidDocument(f"key {key_node.value!r} is given twice (line {line})")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _backup_from_mapping(data: _Data) -> _Data:
    disks = data.get("disks")
    if not isinstance(disks, list):
        return data
    flat = [
        _flatten_disk(disk, i) if isinstance(disk, dict) else disk for i, disk in enumerate(disks)
    ]
    return {**data, "disks": flat}


def _flatten_disk(disk: _Data, index: int) -> _Data:
    """Turn libvirt's ``driver:``/``target:``/``scratch:`` nesting into flat fields."""
    where = disk_label(disk, index)
    out = dict(disk)
    driver = out.pop("driver", None)
    if driver is not None:
        if not isinstance(driver, dict):
            raise InvalidDocument(f"{where}: driver: expected a mapping, got {_type_name(driver)}")
        for key, value in driver.items():
            field = {"type": "format", "shallow": "shallow"}.get(str(key))
            if field is None:
                raise InvalidDocument(f"{where}: unknown field 'driver.{key}'")
            if field in out:
                raise InvalidDocument(f"{where}: both {field} and driver.{key} are given")
            out[field] = value
    for field in ("target", "scratch"):
        value = out.get(field)
        if isinstance(value, dict):
            key = "dev" if out.get("type") == "block" else "file"
            hints = {"dev": " (a block device needs type: block)", "file": f" (use {field}.dev)"}
            hints["encryption"] = " (encryption is given twice)"
            for name, item in value.items():
                if name == "encryption" and "encryption" not in out:
                    out["encryption"] = item
                elif name != key:
                    shown, hint = _show(f"{field}.{name}"), hints.get(str(name), "")
                    raise InvalidDocument(f"{where}: unknown field {shown}{hint}")
            if key not in value:
                raise InvalidDocument(f"{where}: {field}.{key} is missing")
            out[field] = value[key]
    return out


# --------------------------------------------------------------------------
# Error messages

# Model fields of a backup disk whose XML spelling differs.
_XML_DISK_LABELS = {
    "format": "driver type",
    "shallow": "driver shallow",
    "target": "target file",
    "scratch": "scratch file",
    "encryption.format": "encryption format",
    "encryption.secret": "secret",
    "encryption.secret.type": "secret type",
}


def _describe(error: ErrorDetails, fields: _Data, kind: _Kind[Any], is_xml: bool) -> str:
    """One readable line for a pydantic error, in the vocabulary of the document."""
    loc = list(error["loc"])
    prefix = ""
    label = ""
    if loc and loc[0] == "disks" and len(loc) >= 2 and isinstance(loc[1], int):
        disks = fields.get("disks")
        disk = disks[loc[1]] if isinstance(disks, list) and loc[1] < len(disks) else None
        field = ".".join(str(part) for part in loc[2:])
        if field == "name" or not isinstance(disk, dict):
            prefix = f"disk #{loc[1] + 1}: "
        else:
            prefix = disk_label(disk, loc[1]) + ": "
        if field:
            label = _XML_DISK_LABELS.get(field, field) if is_xml else field
    elif loc and loc[0] == "server" and len(loc) >= 2:
        label = f"server {loc[1]}"
    elif loc and loc[0] == "server":
        prefix = "server: "
    elif loc:
        label = kind.labels.get(str(loc[0]), str(loc[0]))
    return prefix + _problem(error, label)


def _problem(error: ErrorDetails, label: str) -> str:
    kind = error["type"]
    value = error.get("input")
    shown = f"{label} {_show(value)}" if label else _show(value)
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{shown} is not one of {', '.join(choices)}"
    if kind == "missing":
        return f"{label} is missing"
    if kind == "extra_forbidden":
        return f"unknown field {label!r}"
    if kind == "invalid_key":
        return f"key {_show(value)} is not a string"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{shown} is not an integer"
    if kind in ("bool_parsing", "bool_type"):
        return f"{shown} is not a boolean"
    if kind == "string_type" and value is None:
        return f"{label} is empty"
    if kind == "string_type" and not isinstance(value, dict | list):
        # YAML turns unquoted 2024-01-01, 0700 or yes into a date, an int or a bool.
        return f"{label}: expected a string, got {_type_name(value)} {str(value)!r} (quote it)"
    if kind in ("string_type", "tuple_type", "list_type", "model_type", "dict_type"):
        expected = {"string_type": "a string", "model_type": "a mapping", "dict_type": "a mapping"}
        where = f"{label}: " if label else ""
        return f"{where}expected {expected.get(kind, 'a list')}, got {_type_name(value)}"
    if kind in ("less_than_equal", "less_than"):
        return f"{shown} is too large (at most {ctx.get('le', ctx.get('lt'))})"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{shown} is too small (at least {ctx.get('ge', ctx.get('gt'))})"
    msg = error["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{label}: {msg}" if label and label not in ("name", "checkpoint name") else msg
    msg = msg.removeprefix("Input ")
    return f"{shown}: {msg}" if label else msg


def _show(value: Any) -> str:
    # Never repr containers: they can be huge; a scalar says enough.
    if isinstance(value, str):
        return repr(shorten(value))
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return _type_name(value)


def _type_name(value: Any) -> str:
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        datetime.date: "a date",
        datetime.datetime: "a date and time",
        bytes: "binary data",
    }
    if value is None:
        return "nothing"
    return names.get(type(value), type(value).__name__)


_BACKUP: _Kind[BackupSpec] = _Kind(
    BackupSpec, "domainbackup", backup_from_xml, _backup_from_mapping, {}
)
_CHECKPOINT: _Kind[CheckpointSpec] = _Kind(
    CheckpointSpec,
    "domaincheckpoint",
    checkpoint_from_xml,
    lambda data: data,
    {"name": "checkpoint name"},
)
