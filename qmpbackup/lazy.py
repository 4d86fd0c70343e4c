"""Names a package exports, loaded from their module on first use (PEP 562).

A package's ``__init__`` that imported every module up front made each command pay
for all of them: ``restore`` loaded the planner and the NBD client it never uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each exported name to
    the submodule that defines it. Raises AttributeError for any other name."""

    def getattr_(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return getattr_
