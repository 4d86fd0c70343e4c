"""A problem found in a request document, and how its one-line message names things.

Shared by the XML reader (:mod:`qmpbackup.request.xml`) and the loader
(:mod:`qmpbackup.request.loader`), which adds the document's origin and raises
:class:`~qmpbackup.errors.SpecError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class InvalidDocument(Exception):
    """A problem with the document; the message lacks only the origin."""


def disk_label(disk: Mapping[str, Any], index: int) -> str:
    """How a message names the disk ``disk`` at ``index``: by its name, else its position."""
    name = disk.get("name")
    return f"disk {name!r}" if isinstance(name, str) and name else f"disk #{index + 1}"


def shorten(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
