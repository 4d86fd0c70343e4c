"""The qcow2 reader against images QEMU made (``qemu-img``, ``qemu-io``, ``qemu-img
convert -c`` with zstd and zlib) and images the writer made: its map equals ``qemu-img
map``, its one read gives the same file digest as reading the file plainly and the same
block digests as the raw content, compressed clusters decoded."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import blake3
import pytest
import zstandard

from qmpbackup.images.qcow2_compressed import BadCompressedCluster, Compression, decompress
from qmpbackup.images.qcow2_reader import Runs, read_map, scan
from qmpbackup.images.qcow2_writer import Qcow2Writer
from qmpbackup.repo.chain_copy import copy_chain
from qmpbackup.repo.digests import Digests, file_digest

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


@pytest.mark.parametrize("compression", [None, "zstd", "zlib"])
def test_writer_and_reader_agree(tmp_path: Path, compression: Compression | None) -> None:
    """The writer's digests (taken as it writes) equal the reader's (one read later)."""
    image = tmp_path / "w.qcow2"
    writer = Qcow2Writer(image, SIZE, "base.qcow2", compression=compression)
    writer.write(0, os.urandom(2 * CLUSTER))
    writer.write(2 * CLUSTER, os.urandom(64) * (2 * CLUSTER // 64))
    writer.zero(4 * CLUSTER, CLUSTER)
    writer.write(SIZE // CLUSTER * CLUSTER, bytes(range(7)) * (SIZE % CLUSTER // 7))
    writer.finish()
    found = read_map(image)
    assert len(found.compressed) == (0 if compression is None else 3)
    scanned = scan(found)
    assert writer.file_digest == scanned.file_digest == file_digest(image)
    assert {i: d for i, d in writer.blocks.items() if i not in found.zero} == scanned.blocks
    assert list(found.zero) == [(4, 1)]


def mixed_raw(path: Path) -> bytes:
    """A raw disk of SIZE bytes: text that compresses, random bytes that do not (QEMU
    stores those plain), a hole, and text in the short last cluster."""
    text = b"".join(b"line %d of a log that compresses well\n" % i for i in range(40000))
    data = bytearray(SIZE)
    data[:MiB] = text[:MiB]
    data[MiB : MiB + 256 * KiB] = os.urandom(256 * KiB)
    data[2 * MiB + 5 * CLUSTER : SIZE] = text[: SIZE - 2 * MiB - 5 * CLUSTER]
    path.write_bytes(data)
    return bytes(data)


@pytest.mark.parametrize("compression", ["zstd", "zlib"])
def test_clusters_qemu_img_compressed(tmp_path: Path, compression: str) -> None:
    """``qemu-img convert -c``: the map has QEMU's compressed and plain clusters, the
    scan's file digest is the plain read's, every block's digest is the raw content's,
    and the chain copy restores the raw disk."""
    raw = tmp_path / "disk.raw"
    content = mixed_raw(raw)
    packed = tmp_path / "packed.qcow2"
    options = f"compression_type={compression}"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", options, str(raw), str(packed))
    found = read_map(packed)
    assert found.compression == compression
    assert set(found.data) == set(range(16, 20))  # the random clusters: plain
    assert len(found.compressed) == 16 + (SIZE - 2 * MiB - 5 * CLUSTER + CLUSTER - 1) // CLUSTER
    assert SIZE // CLUSTER in found.compressed  # the short last cluster too
    scanned = scan(found)
    assert scanned.file_digest == file_digest(packed) and not scanned.undecodable
    for index, digest in scanned.blocks.items():
        assert digest == blake3.blake3(content[index * CLUSTER : (index + 1) * CLUSTER]).digest()
    assert set(scanned.blocks) == set(found.data) | set(found.compressed)
    expected = Digests.from_map(CLUSTER, SIZE, "blake3", scanned.blocks)
    out = tmp_path / "out.raw"
    out.touch()
    copied = copy_chain([packed], out, "raw", expected)
    assert not copied.bad and out.read_bytes() == content


def test_a_flipped_byte_of_a_compressed_cluster(tmp_path: Path) -> None:
    """A damaged compressed cluster changes that block's digest (or does not decode,
    which is said) and the file digest, and no other block's."""
    raw = tmp_path / "disk.raw"
    mixed_raw(raw)
    packed = tmp_path / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw),
        str(packed))  # fmt: skip
    before = scan(read_map(packed))
    offset, _ = read_map(packed).compressed[3]
    with open(packed, "r+b") as handle:
        byte = os.pread(handle.fileno(), 1, offset + 40)
        os.pwrite(handle.fileno(), bytes([byte[0] ^ 0x55]), offset + 40)
    after = scan(read_map(packed))
    assert after.file_digest != before.file_digest
    changed = {i for i in before.blocks if after.blocks[i] != before.blocks[i]}
    assert changed == {3}
    assert after.undecodable in ((), (3,))


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


def test_a_zstd_frame_without_its_size_is_read_to_one_cluster_only() -> None:
    """A frame that does not declare its size (QEMU's and ours do) decodes if it holds
    one cluster, trailing bytes ignored; one that would expand further is refused."""
    packer = zstandard.ZstdCompressor(write_content_size=False)
    cluster = bytes(range(256)) * 256
    assert decompress(packer.compress(cluster) + bytes(300), "zstd", len(cluster)) == cluster
    with pytest.raises(BadCompressedCluster):
        decompress(packer.compress(bytes(1 << 24)), "zstd", len(cluster))
