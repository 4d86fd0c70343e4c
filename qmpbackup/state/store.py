"""One JSON file per item: how the state directory keeps checkpoints and live backups.

Each save is atomic (temporary name, fsync, rename, fsync of the folder), so a
crash leaves the old item or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel

from ..files import atomic_write_text

Item = TypeVar("Item", bound=BaseModel)


class JsonStore(Generic[Item]):
    """Items of one model, each in ``<folder>/<key>.json``."""

    def __init__(self, folder: Path, model: type[Item]) -> None:
        self.directory = folder
        self._model = model

    def path(self, key: str) -> Path:
        """The file of the item called ``key``."""
        return self.directory / f"{key}.json"

    def items(self) -> list[Item]:
        """Every item, in no particular order."""
        if not self.directory.is_dir():
            return []
        return [
            self._model.model_validate_json(path.read_bytes())
            for path in self.directory.glob("*.json")
        ]

    def write(self, key: str, item: Item) -> None:
        """Write ``item`` as ``key``, atomically replacing an older one."""
        atomic_write_text(self.path(key), item.model_dump_json(indent=2))

    def remove(self, key: str) -> None:
        """Forget the item called ``key`` (nothing happens if there is none)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))
