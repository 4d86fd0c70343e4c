"""Check QMP commands against the live QEMU's introspected QAPI schema.

:class:`QAPISchema` is built from the reply to ``query-qmp-schema`` (format:
QEMU's ``qapi/introspect.json``; parsed by :mod:`qmpbackup.qapi.introspection`).
:meth:`QAPISchema.check_command` validates arguments as strictly as QEMU's QMP
input visitor does, so that a mismatch is reported, with the offending member,
before anything is sent.

Capability paths
----------------
:meth:`~QAPISchema.has_member`, :meth:`~QAPISchema.enum_values` and
:meth:`~QAPISchema.features` take a path into a command's arguments: segments
joined by ``.``.

``name``
    Member *name* of the current object.  A segment that is not the last
    descends into the member's type; arrays and alternates are looked through,
    so ``actions.type`` reaches the members of a transaction action.
``name=value``
    Member *name* accepts the string *value*: a value of its enum or, if
    *name* is the tag of a flat union, a variant.  The path stays at the same
    object, and a selected variant's members become visible to the segments
    that follow.  A union's variant members are visible only that way.

Examples: ``("blockdev-backup", "x-perf")``, ``("blockdev-backup",
"sync=bitmap")``, ``("blockdev-add", "driver=snapshot-access")``,
``("blockdev-add", "driver=copy-before-write.bitmap")``,
``("transaction", "actions.type=blockdev-backup.data.x-perf")``.

Error paths in :class:`~qmpbackup.errors.SchemaMismatchError` use ``.`` for
members and ``[i]`` for array items: ``actions[1].data.sync``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from qmpbackup.errors import SchemaMismatchError

from .introspection import (
    AlternateType,
    ArrayType,
    BuiltinType,
    EnumType,
    Member,
    ObjectType,
    SchemaCommand,
    SchemaType,
    parse_reply,
)

__all__ = ["QAPISchema"]

# The features that mark an interface as not for production use.
_FLAG_FEATURES = frozenset({"unstable", "deprecated"})

# An object as seen through a path: the union base, then each selected variant.
_View: TypeAlias = tuple[ObjectType, ...]


class _Mismatch(Exception):
    """A mismatch found below a command; check_command adds the command name."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _join(path: str, name: object) -> str:
    return f"{path}.{name}" if path else str(name)


def _value_kind(value: object) -> str:
    """Return the JSON kind of *value*, named as in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _qtype(kind: str) -> str:
    # QEMU picks an alternate's branch by QType, and integers and numbers share one.
    return "number" if kind == "integer" else kind


class QAPISchema:
    """The QAPI schema of one QEMU, as introspected over QMP."""

    def __init__(
        self, types: Mapping[str, SchemaType], commands: Mapping[str, SchemaCommand]
    ) -> None:
        """Wrap parsed entries; use :meth:`from_introspection` instead."""
        self._types = types
        self._commands = commands

    @classmethod
    def from_introspection(cls, reply: list[dict[str, Any]]) -> QAPISchema:
        """Parse a ``query-qmp-schema`` reply; raise ValueError if it is malformed."""
        return cls(*parse_reply(reply))

    def has_command(self, name: str) -> bool:
        """Return whether QEMU has command *name*."""
        return name in self._commands

    def command_members(self, name: str) -> dict[str, bool]:
        """Map each argument of command *name* to whether it is required.

        For a union argument type these are the base members only.  Raise
        KeyError for an unknown command.
        """
        arg_type = self._types[self._commands[name].arg_type]
        assert isinstance(arg_type, ObjectType)  # checked when parsed
        return {m.name: m.required for m in arg_type.members.values()}

    def has_member(self, command: str, path: str) -> bool:
        """Return whether capability *path* (see the module doc) exists in *command*."""
        return bool(self._walk(command, path))

    def enum_values(self, command: str, path: str) -> tuple[str, ...]:
        """Return the enum values the member at *path* accepts; () if none or no such member."""
        values: dict[str, None] = {}  # ordered set
        for member, _ in self._walk(command, path):
            for enum in self._enums(member.type):
                values.update(dict.fromkeys(enum.values))
        return tuple(values)

    def features(self, command: str, path: str = "") -> frozenset[str]:
        """Return the features of *command*, or of its member or enum value at *path*."""
        if not path:
            found = self._commands.get(command)
            return found.features if found else frozenset()
        result: set[str] = set()
        for member, value in self._walk(command, path):
            if value is None:
                result |= member.features
            else:
                for enum in self._enums(member.type):
                    result |= enum.features.get(value, frozenset())
        return frozenset(result)

    def flagged_members(self, command: str) -> dict[str, frozenset[str]]:
        """Map capability paths of *command* to their unstable/deprecated features.

        Covers members and enum values at any depth.  A type reachable by
        several paths is reported under the first path only.
        """
        found: dict[str, frozenset[str]] = {}
        cmd = self._commands.get(command)
        if cmd is not None:
            arg_type = self._types[cmd.arg_type]
            assert isinstance(arg_type, ObjectType)
            self._collect_flagged(arg_type, "", set(), found)
        return found

    def check_command(self, name: str, arguments: Mapping[str, Any]) -> None:
        """Raise SchemaMismatchError unless QEMU would accept *arguments* for *name*."""
        command = self._commands.get(name)
        if command is None:
            raise SchemaMismatchError(name, "", "unknown command")
        try:
            self._check(command.arg_type, arguments, "")
        except _Mismatch as exc:
            raise SchemaMismatchError(name, exc.path, exc.message) from None

    # -- checking ----------------------------------------------------------

    def _check(self, type_name: str, value: object, path: str) -> None:
        match self._types[type_name]:
            case ObjectType() as obj:
                self._check_object(obj, value, path)
            case AlternateType(branches):
                want = _qtype(_value_kind(value))
                for branch in branches:
                    if _qtype(self._kind(branch)) in (want, "any"):
                        self._check(branch, value, path)
                        return
                expected = " or ".join(self._kind(b) for b in branches)
                raise _Mismatch(path, f"expected {expected}, got {_value_kind(value)}")
            case ArrayType(element):
                if not isinstance(value, list | tuple):
                    raise _Mismatch(path, f"expected array, got {_value_kind(value)}")
                for i, item in enumerate(value):
                    self._check(element, item, f"{path}[{i}]")
            case EnumType(values):
                if not isinstance(value, str):
                    raise _Mismatch(path, f"expected string, got {_value_kind(value)}")
                if value not in values:
                    raise _Mismatch(path, f"{value!r} is not one of {', '.join(values)}")
            case BuiltinType(kind):
                got = _value_kind(value)
                if not (kind in (got, "any") or (kind == "number" and got == "integer")):
                    raise _Mismatch(path, f"expected {kind}, got {got}")

    def _check_object(self, obj: ObjectType, value: object, path: str) -> None:
        if not isinstance(value, Mapping):
            raise _Mismatch(path, f"expected object, got {_value_kind(value)}")
        members = self._variant_members(obj, value, path)
        for key in value:
            if key not in members:
                hint = self._variant_hint(obj, key, value) if obj.tag else ""
                raise _Mismatch(_join(path, key), f"unknown member {key!r}{hint}")
        for member in members.values():
            if member.name in value:
                self._check(member.type, value[member.name], _join(path, member.name))
            elif member.required:
                raise _Mismatch(
                    _join(path, member.name), f"missing required member {member.name!r}"
                )

    def _variant_members(
        self, obj: ObjectType, value: Mapping[str, Any], path: str
    ) -> dict[str, Member]:
        """Return the members *value* may have: the base plus its variant, recursively."""
        members: dict[str, Member] = {}
        layer: SchemaType = obj
        while isinstance(layer, ObjectType):
            members.update(layer.members)
            if layer.tag is None:
                break
            tag_path = _join(path, layer.tag)
            if layer.tag not in value:
                raise _Mismatch(tag_path, f"missing required member {layer.tag!r}")
            case = value[layer.tag]
            if not isinstance(case, str):
                raise _Mismatch(tag_path, f"expected string, got {_value_kind(case)}")
            tag_enum = self._types[layer.members[layer.tag].type]
            assert isinstance(tag_enum, EnumType)  # checked when parsed
            if case not in tag_enum.values:
                expected = ", ".join(tag_enum.values)
                raise _Mismatch(tag_path, f"no union variant {case!r}; expected one of {expected}")
            if case not in layer.variants:  # a branch without members of its own
                break
            layer = self._types[layer.variants[case]]
        return members

    def _variant_hint(self, obj: ObjectType, key: object, value: Mapping[str, Any]) -> str:
        """Say which variant *key* is not valid for, and which it is valid for."""
        assert obj.tag is not None
        owners = []
        for case, type_name in obj.variants.items():
            variant = self._types[type_name]
            if isinstance(variant, ObjectType) and key in variant.members:
                owners.append(case)
        hint = f" for {obj.tag}={value[obj.tag]}"
        if owners:
            more = ", ..." if len(owners) > 4 else ""
            hint += f" (valid for {obj.tag}={', '.join(owners[:4])}{more})"
        return hint

    def _kind(self, type_name: str) -> str:
        """Return the JSON kind a value of *type_name* has, named as in messages."""
        match self._types[type_name]:
            case BuiltinType(kind):
                return kind
            case EnumType():
                return "string"
            case ArrayType():
                return "array"
            case ObjectType():
                return "object"
            case _:
                return "alternate"  # QAPI allows no alternate inside an alternate

    # -- capability paths --------------------------------------------------

    def _walk(self, command: str, path: str) -> list[tuple[Member, str | None]]:
        """Return the members the last segment of *path* matched, with its ``=value``."""
        cmd = self._commands.get(command)
        if cmd is None or not path:
            return []
        views: list[_View] = [(o,) for o in self._objects(cmd.arg_type)]
        segments = path.split(".")
        matched: list[tuple[Member, str | None]] = []
        for i, segment in enumerate(segments):
            name, eq, value = segment.partition("=")
            descend = i < len(segments) - 1
            matched, next_views = [], []
            for view in views:
                member = next((lay.members[name] for lay in view if name in lay.members), None)
                if member is None:
                    continue
                if eq:
                    selected = self._select(view, member, value)
                    if selected is not None:
                        matched.append((member, value))
                        next_views.append(selected)
                else:
                    matched.append((member, None))
                    if descend:
                        next_views.extend((o,) for o in self._objects(member.type))
            views = next_views
        return matched

    def _select(self, view: _View, member: Member, value: str) -> _View | None:
        """Return *view* narrowed by ``member=value``, or None if *member* rejects *value*."""
        last = view[-1]
        if last.tag == member.name and value in last.variants:
            variant = self._types[last.variants[value]]
            assert isinstance(variant, ObjectType)  # checked when parsed
            return (*view, variant)
        if any(value in enum.values for enum in self._enums(member.type)):
            return view
        return None

    def _objects(self, type_name: str) -> list[ObjectType]:
        """Return the object types a value of *type_name* can be, through arrays/alternates."""
        match self._types[type_name]:
            case ObjectType() as obj:
                return [obj]
            case ArrayType(element):
                return self._objects(element)
            case AlternateType(branches):
                return [o for b in branches for o in self._objects(b)]
            case _:
                return []

    def _enums(self, type_name: str) -> list[EnumType]:
        """Return the enum types a value of *type_name* can be, through arrays/alternates."""
        match self._types[type_name]:
            case EnumType() as enum:
                return [enum]
            case ArrayType(element):
                return self._enums(element)
            case AlternateType(branches):
                return [e for b in branches for e in self._enums(b)]
            case _:
                return []

    def _collect_flagged(
        self, obj: ObjectType, prefix: str, seen: set[int], found: dict[str, frozenset[str]]
    ) -> None:
        # By identity: the dataclasses hold dicts and are unhashable; types recurse.
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for member in obj.members.values():
            path = _join(prefix, member.name)
            if member.features & _FLAG_FEATURES:
                found[path] = member.features & _FLAG_FEATURES
            for enum in self._enums(member.type):
                for value, features in enum.features.items():
                    if features & _FLAG_FEATURES:
                        found[f"{path}={value}"] = features & _FLAG_FEATURES
            for child in self._objects(member.type):
                self._collect_flagged(child, path, seen, found)
        for case, type_name in obj.variants.items():
            variant = self._types[type_name]
            assert isinstance(variant, ObjectType)
            self._collect_flagged(variant, _join(prefix, f"{obj.tag}={case}"), seen, found)
