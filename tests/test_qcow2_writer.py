"""The qcow2 writer against QEMU's own tools: ``qemu-img check`` finds nothing wrong, and
the image (over its backing file) reads exactly what a raw model of the writes holds."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from qmpbackup.demo.throwaway import images_equal, qemu_img
from qmpbackup.images import qcow2_writer
from qmpbackup.images.qcow2_compressed import Compression
from qmpbackup.images.qcow2_reader import read_map
from qmpbackup.images.qcow2_writer import CLUSTER, Qcow2Writer

MiB = 1 << 20


def check(image: Path) -> dict[str, object]:
    """``qemu-img check`` must pass with no errors and no leaks; its JSON report."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def write_model(model: Path, offset: int, data: bytes) -> None:
    with model.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("tables_in_memory", "compression"), [(64, None), (1, None), (64, "zstd"), (1, "zlib")]
)
def test_random_writes_and_zeroes_over_a_backing_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tables_in_memory: int,
    compression: Compression | None,
) -> None:
    """Writes in random order (some clusters twice, some runs long), zeroed clusters over
    a backing file with data, a disk spanning several L2 tables and a short last cluster;
    with one table in memory, tables are written out and read back all along.  Compressed:
    half the data compresses, half does not (stored plain); rewritten and zeroed
    compressed clusters leave their references, which ``qemu-img check`` counts."""
    monkeypatch.setattr(qcow2_writer, "TABLES_IN_MEMORY", tables_in_memory)
    size = 1536 * MiB + 12288  # three L2 tables, the last cluster short
    rng = random.Random(tables_in_memory)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
    model = tmp_path / "model.raw"
    with model.open("wb") as f:
        f.truncate(size)
    for offset in (0, 600 * MiB, size - 3 * CLUSTER):
        data = rng.randbytes(3 * CLUSTER)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {offset} {len(data)}", str(base)],
            check=True,
            capture_output=True,
        )
        write_model(model, offset, bytes([0x77]) * len(data))

    top = tmp_path / "top.qcow2"
    writer = Qcow2Writer(top, size, backing="base.qcow2", compression=compression)
    last = (size - 1) // CLUSTER
    for _ in range(300):
        cluster = rng.choice([rng.randrange(last + 1), last, 0, 9200, 9201])
        count = min(rng.choice([1, 1, 2, 17]), last + 1 - cluster)
        offset = cluster * CLUSTER
        length = min(count * CLUSTER, size - offset)
        if rng.random() < 0.25:
            writer.zero(offset, length)
            write_model(model, offset, bytes(length))
        else:
            data = rng.randbytes(length)
            if rng.random() < 0.5:
                data = (rng.randbytes(512) * (length // 512 + 1))[:length]
            writer.write(offset, memoryview(data))
            write_model(model, offset, data)
    writer.zero(0, CLUSTER)  # over the backing file's data
    write_model(model, 0, bytes(CLUSTER))
    writer.finish()

    check(top)
    info = json.loads(qemu_img("info", "--output=json", str(top)))
    assert (info["format"], info["virtual-size"]) == ("qcow2", size)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.qcow2", "qcow2")
    assert images_equal(model, top, "raw")
    if compression is not None:
        assert info["format-specific"]["data"]["compression-type"] == compression
        found = read_map(top)
        assert found.compressed and found.data and found.compression == compression


def test_full_image_without_backing(tmp_path: Path) -> None:
    """No backing file: zeroes leave clusters unallocated; the file stays small."""
    size = 64 * MiB
    image = tmp_path / "full.qcow2"
    writer = Qcow2Writer(image, size)
    data = random.Random(1).randbytes(2 * MiB)
    writer.write(4 * MiB, memoryview(data))
    writer.zero(8 * MiB, MiB)
    writer.finish()
    check(image)
    model = tmp_path / "model.raw"
    with model.open("wb") as f:
        f.truncate(size)
    write_model(model, 4 * MiB, data)
    assert images_equal(model, image, "raw")
    assert image.stat().st_blocks * 512 < 3 * MiB


def test_unfinished_image_is_not_qcow2_and_abandon_removes_it(tmp_path: Path) -> None:
    image = tmp_path / "cut.qcow2"
    writer = Qcow2Writer(image, 8 * MiB)
    writer.write(0, memoryview(bytes([1]) * CLUSTER))
    info = json.loads(qemu_img("info", "--output=json", str(image)))
    assert info["format"] == "raw"  # no magic until finish()
    writer.abandon()
    assert not image.exists()


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    image = tmp_path / "mine.qcow2"
    image.write_bytes(b"the user's")
    with pytest.raises(FileExistsError):
        Qcow2Writer(image, 8 * MiB)
    assert image.read_bytes() == b"the user's"


def test_unaligned_writes_are_refused(tmp_path: Path) -> None:
    writer = Qcow2Writer(tmp_path / "x.qcow2", 8 * MiB)
    with pytest.raises(ValueError, match="cluster-aligned"):
        writer.write(512, memoryview(bytes(CLUSTER)))
    with pytest.raises(ValueError, match="ends mid-cluster"):
        writer.write(0, memoryview(bytes(4096)))
    writer.abandon()
