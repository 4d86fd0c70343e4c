"""The element writer under libvirt's XML documents: :class:`XmlElement` and :func:`render_xml`.

An element a line, two spaces a level, as libvirt's documentation and its dumpxml
lay documents out; every character escaped so that the document parses back to
what was written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Quote", "XmlElement", "render_xml"]

Quote = Literal['"', "'"]
"""How attribute values are quoted: libvirt's documentation writes ``"``, its dumpxml ``'``."""


@dataclass(frozen=True)
class XmlElement:
    """An element to write: its tag, its attributes in order, and text or children.

    An attribute whose value is None is left out.  With ``children`` None the
    element is a leaf, ``<tag/>`` or ``<tag>text</tag>``; with a sequence, even
    an empty one, its start and end tags stand on lines of their own.
    """

    tag: str
    attrs: Mapping[str, str | None] = field(default_factory=dict)
    text: str | None = None
    children: Sequence[XmlElement] | None = None

    def __post_init__(self) -> None:
        if self.text is not None and self.children is not None:
            raise ValueError(f"<{self.tag}> takes text or children, not both")


def render_xml(element: XmlElement, quote: Quote = '"') -> str:
    """``element`` as a document: an element a line, two spaces a level, a final newline.

    Raises ValueError for a character that XML 1.0 cannot carry (a NUL, say).
    """
    lines: list[str] = []
    _render(element, quote, "", lines)
    return "\n".join(lines) + "\n"


def _render(element: XmlElement, quote: Quote, indent: str, lines: list[str]) -> None:
    table = _ATTR_ESCAPES[quote]
    attrs = "".join(
        f" {name}={quote}{_escape(value, table)}{quote}"
        for name, value in element.attrs.items()
        if value is not None
    )
    head = f"{indent}<{element.tag}{attrs}"
    if element.children is not None:
        lines.append(head + ">")
        for child in element.children:
            _render(child, quote, indent + "  ", lines)
        lines.append(f"{indent}</{element.tag}>")
    elif element.text is not None:
        lines.append(f"{head}>{_escape(element.text, _TEXT_ESCAPES)}</{element.tag}>")
    else:
        lines.append(head + "/>")


# A parser turns a raw carriage return into a newline, and a raw newline or
# tab in an attribute into a space: references keep them as they were.
_TEXT_ESCAPES = {ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;", ord("\r"): "&#13;"}
_DOUBLE_QUOTED = {**_TEXT_ESCAPES, ord('"'): "&quot;", ord("\n"): "&#10;", ord("\t"): "&#9;"}
_ATTR_ESCAPES: dict[Quote, dict[int, str]] = {
    '"': _DOUBLE_QUOTED,
    "'": {**_DOUBLE_QUOTED, ord("'"): "&apos;"},
}
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape(value: str, table: Mapping[int, str]) -> str:
    bad = _NOT_XML.search(value)
    if bad is not None:
        raise ValueError(f"character U+{ord(bad.group()):04X} cannot be written in XML")
    return value.translate(table)
