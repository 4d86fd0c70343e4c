"""Rendering a repository backup's events: a bar, plain lines, or JSON lines.

A progress bar on a terminal, plain lines elsewhere, JSON lines with
``--log-format json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import TextIO

from ..repo.events import BackupEvent
from .streams import emit


def human_size(value: float, digits: int = 2) -> str:
    """``value`` bytes in binary units, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def frozen_line(seconds: float) -> str:
    """What is printed after a quiesced instant."""
    return f"guest frozen for {seconds * 1e3:.0f} ms"


def describe(event: BackupEvent) -> str | None:
    """The line a person reads for an event; None for progress events."""
    if event.kind == "level":
        word = {"full": "full", "inc": "incremental", "diff": "differential"}[event.level or ""]
        return f"{event.disk}: {word} ({event.reason})"
    if event.kind == "quiesced":
        return frozen_line(event.seconds or 0.0)
    if event.kind == "skipped":
        return f"{event.disk}: not backed up ({event.reason})"
    if event.kind == "begin":
        return f"Backup {event.backup} started" + (f": {event.message}" if event.message else "")
    if event.kind == "disk-done":
        return f"{event.disk}: {human_size(event.done)} written, {event.message or 'checked'}"
    if event.kind == "committed":
        return f"Backup {event.backup} completed"
    if event.kind == "released":
        return f"Domain checkpoint {event.message} deleted: no backup needs it any more"
    if event.kind in ("compression", "adopted", "migration"):
        return event.message
    if event.kind == "pull-begin":
        return f"Pulling the backing chain of {event.disk} into {event.message}"
    if event.kind == "pull-done":
        return f"{event.disk}: {event.message} is standalone"
    if event.kind == "aborted":
        return f"Backup {event.backup or ''} aborted: {event.message}".replace("  ", " ")
    return None


class _Rate:
    """Bytes per second since the backup began (or since the first progress event)."""

    def __init__(self) -> None:
        self.start: float | None = None

    def begin(self, event: BackupEvent) -> None:
        if event.kind == "begin":
            self.start = event.time

    def __call__(self, event: BackupEvent) -> tuple[float, float | None]:
        if self.start is None:
            self.start = event.time
        elapsed = event.time - self.start
        rate = event.done / elapsed if elapsed > 0.05 else 0.0
        eta = (event.total - event.done) / rate if rate > 0 else None
        return rate, eta


class ProgressBar:
    """A one-line bar on a terminal: bytes, rate and ETA, redrawn in place."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.rate = _Rate()
        self.drawn = False

    def __call__(self, event: BackupEvent) -> None:
        self.rate.begin(event)
        if event.kind != "progress":
            self._clear()
            line = describe(event)
            if line:
                emit(line, self.stream)
            return
        rate, eta = self.rate(event)
        frac = event.done / event.total if event.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        text = (
            f"\r[{bar}] {frac:4.0%} {human_size(event.done)}/{human_size(event.total)} "
            f"{human_size(rate)}/s ETA {_clock(eta) if eta is not None else '--:--:--'}"
        )
        self.stream.write(text + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False


class PlainLines:
    """Plain lines for logs and pipes: progress at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO = sys.stdout, interval: float = 5.0) -> None:
        self.stream = stream
        self.interval = interval
        self.rate = _Rate()
        self.last = 0.0
        self.shown = -1

    def __call__(self, event: BackupEvent) -> None:
        self.rate.begin(event)
        if event.kind != "progress":
            line = describe(event)
            if line:
                emit(line, self.stream)
            return
        rate, eta = self.rate(event)
        finished = bool(event.total) and event.done >= event.total
        if event.done == self.shown or (event.time - self.last < self.interval and not finished):
            return
        self.last, self.shown = event.time, event.done
        pct = f"{event.done / event.total:.0%}" if event.total else "100%"
        eta_text = f", ETA {_clock(eta)}" if eta is not None and not finished else ""
        print(
            f"copied {human_size(event.done)} of {human_size(event.total)} ({pct}), "
            f"{human_size(rate)}/s{eta_text}",
            file=self.stream,
            flush=True,
        )


class JsonLines:
    """One JSON object per event, for machines (``--log-format json``)."""

    def __init__(self, stream: TextIO = sys.stdout, interval: float = 1.0) -> None:
        self.stream = stream
        self.interval = interval
        self.last = 0.0

    def __call__(self, event: BackupEvent) -> None:
        if event.kind == "progress":
            if event.time - self.last < self.interval and event.done < event.total:
                return
            self.last = event.time
        data = {k: v for k, v in asdict(event).items() if v is not None}
        data["event"] = f"backup.{data.pop('kind')}"
        if event.kind == "progress":
            print(json.dumps(data), file=self.stream, flush=True)
        else:
            emit(json.dumps(data), self.stream)
