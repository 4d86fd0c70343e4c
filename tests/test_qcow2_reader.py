"""The qcow2 reader against images QEMU made (``qemu-img``, ``qemu-io``) and images the
writer made: its map equals ``qemu-img map``, its one read gives the same file digest
as reading the file plainly and the same block digests as the raw content."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import blake3
import pytest

from qmpbackup.images.qcow2_reader import Qcow2Unsupported, Runs, read_map, scan
from qmpbackup.images.qcow2_writer import Qcow2Writer
from qmpbackup.repo.digests import file_digest

KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 64 * KiB
SIZE = 3 * MiB + 7 * 512  # the last cluster is short


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def raw_blocks(image: Path, tmp: Path) -> list[bytes]:
    raw = tmp / f"{image.name}.raw"
    run("qemu-img", "convert", "-O", "raw", str(image), str(raw))
    data = raw.read_bytes()
    return [data[i : i + CLUSTER] for i in range(0, len(data), CLUSTER)]


def clusters(runs: Runs) -> set[int]:
    return {i for first, count in runs for i in range(first, first + count)}


def qemu_map(image: Path) -> tuple[set[int], set[int]]:
    """(data clusters, zero clusters) of ``image``'s own layer, from ``qemu-img map``."""
    data: set[int] = set()
    zero: set[int] = set()
    for e in json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(image))):
        if e["depth"] != 0 or not e.get("present", True):
            continue
        clusters = set(range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER)))
        (data if e["data"] else zero).update(clusters)
    return data, zero


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    for cmd in ["write -P 0x11 0 256k", f"write -P 0x12 {SIZE - 512} 512"]:
        run("qemu-io", "-f", "qcow2", "-c", cmd, str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    for cmd in ["write -P 0x21 64k 64k", "write -z 128k 64k", "write -P 0x22 2M 4k"]:
        run("qemu-io", "-f", "qcow2", "-c", cmd, str(top))
    return base, top


def test_map_and_scan_of_images_qemu_made(chain: tuple[Path, Path], tmp_path: Path) -> None:
    base, top = chain
    blocks = raw_blocks(top, tmp_path)
    for image in (base, top):
        found = read_map(image)
        assert (set(found.data), clusters(found.zero)) == qemu_map(image)
        assert found.size == SIZE and found.cluster_size == CLUSTER
        scanned = scan(found)
        assert scanned.file_digest == file_digest(image)
        assert scanned.bytes_read == image.stat().st_size
        # A cluster the top holds reads as the top's; the base's clusters the top does not
        # cover read as the base's: both equal the chain's raw content there.
        for index, digest in scanned.blocks.items():
            if image is top or index not in {*read_map(top).data, *clusters(read_map(top).zero)}:
                assert digest == blake3.blake3(blocks[index]).digest(), (image.name, index)
    assert read_map(top).backing == base.name and read_map(base).backing is None
    assert SIZE // CLUSTER in read_map(base).data  # the short last cluster, hashed short


def test_writer_and_reader_agree(tmp_path: Path) -> None:
    """The writer's digests (taken as it writes) equal the reader's (one read later)."""
    image = tmp_path / "w.qcow2"
    writer = Qcow2Writer(image, SIZE, "base.qcow2")
    writer.write(0, os.urandom(2 * CLUSTER))
    writer.zero(4 * CLUSTER, CLUSTER)
    writer.write(SIZE // CLUSTER * CLUSTER, os.urandom(SIZE % CLUSTER))
    writer.finish()
    found = read_map(image)
    scanned = scan(found)
    assert writer.file_digest == scanned.file_digest == file_digest(image)
    assert {i: d for i, d in writer.blocks.items() if i not in found.zero} == scanned.blocks
    assert list(found.zero) == [(4, 1)]


def test_compressed_clusters_are_not_read_here(chain: tuple[Path, Path], tmp_path: Path) -> None:
    packed = tmp_path / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(chain[0]), str(packed))
    with pytest.raises(Qcow2Unsupported, match="compressed"):
        read_map(packed)


def test_a_table_of_zero_clusters_is_one_run(tmp_path: Path) -> None:
    """``write -z`` over 2 GiB of a qcow2 without backing: QEMU's L2 tables say zero for
    every cluster; the map holds one run, not 32768 entries."""
    image = tmp_path / "z.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "3G")
    writes = ["write -z 512M 1G", "write -z 1536M 1G", "write -P 7 0 64k"]
    run("qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), str(image))
    found = read_map(image)
    assert list(found.zero) == [(8192, 32768)] and set(found.data) == {0}
    assert 8192 in found.zero and 8191 not in found.zero and 40960 not in found.zero
    assert found.zero.among([0, 8191, 8192, 9000, 40959, 40960]) == [8192, 9000, 40959]
