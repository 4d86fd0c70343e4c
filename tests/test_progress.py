"""Rendering of repository backup events: bar, plain lines, JSON lines."""

from __future__ import annotations

import io
import json

from qmpbackup.cli.progress import JsonLines, PlainLines, ProgressBar, human_size
from qmpbackup.repo.events import BackupEvent

MiB = 1 << 20


def run(sink: object, events: list[BackupEvent]) -> None:
    for event in events:
        sink(event)  # type: ignore[operator]


def events() -> list[BackupEvent]:
    return [
        BackupEvent("level", disk="vda", level="inc", reason="changes since backup-x", time=0.0),
        BackupEvent("level", disk="vdb", level="full", reason="vdb was resized", time=0.0),
        BackupEvent("begin", backup="20261126T000000Z-2", message="checkpoint c", time=10.0),
        BackupEvent("progress", done=0, total=100 * MiB, time=10.0),
        BackupEvent("progress", done=50 * MiB, total=100 * MiB, time=11.0),
        BackupEvent("progress", done=100 * MiB, total=100 * MiB, time=12.0),
        BackupEvent("committed", backup="20261126T000000Z-2", time=12.5),
    ]


def test_bar_shows_bytes_rate_and_eta_in_place() -> None:
    stream = io.StringIO()
    run(ProgressBar(stream, width=10), events())
    text = stream.getvalue()
    assert "vda: incremental (changes since backup-x)\n" in text
    assert "vdb: full (vdb was resized)\n" in text
    assert "\r[#####-----]  50% 50.00 MiB/100.00 MiB 50.00 MiB/s ETA 0:00:01" in text
    # The bar is cleared before the next line is printed.
    assert text.endswith("\r\x1b[KBackup 20261126T000000Z-2 completed\n")


def test_plain_lines_are_throttled_and_end_with_the_total() -> None:
    stream = io.StringIO()
    run(PlainLines(stream, interval=5.0), events())
    lines = stream.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("copied")]
    # 0 bytes at t=10 is shown, 50 MiB one second later is not, the end always is.
    assert progress == [
        "copied 0 B of 100.00 MiB (0%), 0 B/s",
        "copied 100.00 MiB of 100.00 MiB (100%), 50.00 MiB/s",
    ]
    assert "\r" not in stream.getvalue() and lines[-1] == "Backup 20261126T000000Z-2 completed"


def test_json_lines_carry_every_event() -> None:
    stream = io.StringIO()
    run(JsonLines(stream, interval=1.0), events())
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    kinds = [p["event"] for p in parsed]
    assert kinds[:3] == ["backup.level", "backup.level", "backup.begin"]
    assert kinds[-1] == "backup.committed"
    assert parsed[1] == {
        "event": "backup.level",
        "disk": "vdb",
        "level": "full",
        "reason": "vdb was resized",
        "done": 0,
        "total": 0,
        "time": 0.0,
    }
    assert [p["done"] for p in parsed if p["event"] == "backup.progress"] == [
        0,
        50 * MiB,
        100 * MiB,
    ]


def test_human_size() -> None:
    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.50 KiB"
    assert human_size(3 * (1 << 30), digits=3) == "3.000 GiB"
