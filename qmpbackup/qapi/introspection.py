"""The parsed form of a ``query-qmp-schema`` reply (format: QEMU's ``qapi/introspect.json``).

Only what checking command input needs is kept: types by name, and commands by name.
:func:`parse_reply` also checks that every reference the checker follows resolves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "AlternateType",
    "ArrayType",
    "BuiltinType",
    "EnumType",
    "Member",
    "ObjectType",
    "SchemaCommand",
    "SchemaType",
    "parse_reply",
]

# Introspection's builtin json-type -> the kind used in messages and matching.
_BUILTIN_KINDS = {
    "string": "string",
    "int": "integer",
    "number": "number",
    "boolean": "boolean",
    "null": "null",
    "value": "any",
}


@dataclass(frozen=True, slots=True)
class Member:
    """A member of an object type: its name, the name of its type, whether it is required
    (has no default), and its features."""

    name: str
    type: str
    required: bool
    features: frozenset[str]


@dataclass(frozen=True, slots=True)
class BuiltinType:
    """A builtin type, by the JSON kind of its values: string, integer, number, boolean,
    null, or any."""

    kind: str


@dataclass(frozen=True, slots=True)
class EnumType:
    """An enum type: its values, and the features of those values that have any."""

    values: tuple[str, ...]
    features: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class ArrayType:
    """An array type: the name of its element type."""

    element: str


@dataclass(frozen=True, slots=True)
class ObjectType:
    """An object type: its members and, for a flat union, the tag member and the object
    type of each tag value that has members of its own."""

    members: Mapping[str, Member]
    tag: str | None
    variants: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class AlternateType:
    """An alternate type: the names of its branch types."""

    branches: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SchemaCommand:
    """A command: the name of its argument type (an object type), and its features."""

    arg_type: str
    features: frozenset[str]


SchemaType: TypeAlias = BuiltinType | EnumType | ArrayType | ObjectType | AlternateType


def parse_reply(
    reply: list[dict[str, Any]],
) -> tuple[dict[str, SchemaType], dict[str, SchemaCommand]]:
    """Return the types and commands of a ``query-qmp-schema`` reply, by name.

    Raise ValueError if it is malformed, or refers to a type it lacks.
    """
    types: dict[str, SchemaType] = {}
    commands: dict[str, SchemaCommand] = {}
    try:
        for entry in reply:
            meta, name = entry["meta-type"], entry["name"]
            if meta == "command":
                features = frozenset(entry.get("features", ()))
                commands[name] = SchemaCommand(entry["arg-type"], features)
            elif meta == "object":
                types[name] = _parse_object(entry)
            elif meta == "enum":
                types[name] = _parse_enum(entry)
            elif meta == "array":
                types[name] = ArrayType(entry["element-type"])
            elif meta == "alternate":
                types[name] = AlternateType(tuple(m["type"] for m in entry["members"]))
            elif meta == "builtin":
                types[name] = BuiltinType(_BUILTIN_KINDS[entry["json-type"]])
            # Events, and meta-types newer than this code, describe no command input.
    except (KeyError, TypeError) as exc:
        raise _malformed(repr(exc)) from exc
    _verify(types, commands)
    return types, commands


def _parse_object(entry: Mapping[str, Any]) -> ObjectType:
    return ObjectType(
        {
            m["name"]: Member(
                m["name"],
                m["type"],
                "default" not in m,
                frozenset(m.get("features", ())),
            )
            for m in entry["members"]
        },
        entry.get("tag"),
        {v["case"]: v["type"] for v in entry.get("variants", ())},
    )


def _parse_enum(entry: Mapping[str, Any]) -> EnumType:
    # "members" (with per-value features) is QEMU 6.2+; "values" is the older form.
    if "members" in entry:
        values = tuple(m["name"] for m in entry["members"])
        features = {
            m["name"]: frozenset(m["features"]) for m in entry["members"] if m.get("features")
        }
        return EnumType(values, features)
    return EnumType(tuple(entry["values"]), {})


def _verify(types: Mapping[str, SchemaType], commands: Mapping[str, SchemaCommand]) -> None:
    """Raise ValueError unless every reference the checker follows resolves."""

    def need(type_name: str, where: str, *kinds: type) -> None:
        found = types.get(type_name)
        if found is None or (kinds and not isinstance(found, kinds)):
            raise _malformed(f"{where} refers to missing or unfit type {type_name!r}")

    for name, command in commands.items():
        need(command.arg_type, f"command {name}", ObjectType)
    for name, t in types.items():
        match t:
            case ArrayType(element):
                need(element, f"array {name}")
            case AlternateType(branches):
                for branch in branches:
                    need(branch, f"alternate {name}")
            case ObjectType(members, tag, variants):
                for member in members.values():
                    need(member.type, f"object {name}")
                if tag is not None:
                    if tag not in members:
                        raise _malformed(f"object {name} has no tag member {tag!r}")
                    need(members[tag].type, f"tag of object {name}", EnumType)
                for case in variants.values():
                    need(case, f"variant of object {name}", ObjectType)


def _malformed(detail: str) -> ValueError:
    return ValueError(f"malformed query-qmp-schema reply: {detail}")
