"""Per-block digests against real images made with qemu-img and qemu-io."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from qmpbackup.images.qemu_nbd import serve_image
from qmpbackup.nbd import NBDClient
from qmpbackup.repo.digests import (
    Algorithm,
    DigestError,
    Digests,
    changed_blocks,
    compare,
    derive,
    resized_blocks,
    zero_digest,
)
from qmpbackup.repo.digests_nbd import digest_all as nbd_digest_all
from qmpbackup.repo.digests_nbd import digest_image as nbd_digest_image

MiB = 1 << 20
SIZE = 6 * MiB + 300 * 1024  # the last block is short
# Format 1's geometry: these tests read through qemu-nbd, as format 1 records are.
ALGORITHM: Algorithm = "blake2b"


def digest_all(source: Path | str, block_size: int = MiB) -> Digests:
    return nbd_digest_all(source, block_size=block_size, algorithm=ALGORITHM)


def digest_image(
    source: Path | str, blocks: object = None, block_size: int = MiB
) -> dict[int, bytes]:
    return nbd_digest_image(
        source,
        None,
        blocks,
        block_size=block_size,
        algorithm=ALGORITHM,  # type: ignore[arg-type]
    )


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def create(path: Path, size: int = SIZE, backing: Path | None = None) -> Path:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
    qemu_img("create", "-q", "-f", "qcow2", *extra, str(path), str(size))
    return path


def write(path: Path, pattern: int, offset: int, length: int) -> None:
    cmd = f"write -P {pattern} {offset} {length}"
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, capture_output=True
    )


def raw_digests(image: Path, tmp: Path, block_size: int = MiB) -> list[bytes]:
    """BLAKE2b per block over ``qemu-img convert -O raw`` output."""
    raw = tmp / f"{image.name}.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    data = raw.read_bytes()
    return [
        hashlib.blake2b(data[i : i + block_size], digest_size=32).digest()
        for i in range(0, len(data), block_size)
    ]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    image = create(tmp_path / "base.qcow2")
    write(image, 0x11, 0, 64 * 1024)
    write(image, 0x22, 2 * MiB + 4096, 1500 * 1024)  # spans blocks 2 and 3
    write(image, 0x33, SIZE - 4096, 4096)  # the short last block
    return image


def test_digests_equal_hashlib_over_raw(base: Path, tmp_path: Path) -> None:
    digests = digest_all(base)
    assert digests.size == SIZE and digests.block_size == MiB
    assert [digests.get(i) for i in range(digests.count)] == raw_digests(base, tmp_path)
    assert digests.get(1) == zero_digest(MiB, ALGORITHM)
    assert list(digests.indexes) == [0, 2, 3, 6]  # zero blocks are not held


def test_small_block_size_and_subset(base: Path, tmp_path: Path) -> None:
    expected = raw_digests(base, tmp_path, 256 * 1024)
    found = digest_image(base, blocks=[0, 9, 10, len(expected) - 1], block_size=256 * 1024)
    assert found == {i: expected[i] for i in (0, 9, 10, len(expected) - 1)}


def test_pull_uri_directly(base: Path, tmp_path: Path) -> None:
    with serve_image(base) as uri:
        assert uri.startswith("nbd+unix://")
        found = digest_all(uri)
        assert [found.get(i) for i in range(found.count)] == raw_digests(base, tmp_path)


def test_zero_blocks_are_not_read(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    original = NBDClient.readinto

    def counting(self: NBDClient, buf: memoryview | bytearray, offset: int) -> None:
        reads.append((offset, len(buf)))
        original(self, buf, offset)

    monkeypatch.setattr(NBDClient, "readinto", counting)
    digests = digest_all(base)
    read_blocks = changed_blocks(reads, MiB)
    assert read_blocks == {0, 2, 3, 6}
    assert all(digests.get(i) == zero_digest(MiB, ALGORITHM) for i in (1, 4, 5))


def test_derive_incremental_equals_full_recompute(base: Path, tmp_path: Path) -> None:
    parent = digest_all(base)
    top = create(tmp_path / "top.qcow2", backing=base)
    writes = [(0x44, 5 * MiB - 512, 1024), (0x55, 100, 10)]  # blocks 4, 5 and 0
    for pattern, offset, length in writes:
        write(top, pattern, offset, length)
    dirty = changed_blocks([(o, n) for _, o, n in writes], MiB)
    assert dirty == {0, 4, 5}
    derived = derive(parent, digest_image(top, blocks=dirty), SIZE)
    assert derived == digest_all(top)
    assert compare(parent, derived) == [0, 4, 5]


def test_derive_over_a_resize(base: Path, tmp_path: Path) -> None:
    parent = digest_all(base)
    top = create(tmp_path / "top.qcow2", backing=base)
    new_size = 9 * MiB
    qemu_img("resize", "-q", str(top), str(new_size))
    write(top, 0x66, 8 * MiB, 4096)
    dirty = changed_blocks([(8 * MiB, 4096)], MiB) | resized_blocks(SIZE, new_size, MiB)
    assert dirty == {6, 8}
    with pytest.raises(DigestError, match="must be read"):
        derive(parent, digest_image(top, blocks={8}), new_size)
    derived = derive(parent, digest_image(top, blocks=dirty), new_size)
    assert derived == digest_all(top)
    assert [derived.get(i) for i in range(derived.count)] == raw_digests(top, tmp_path)


def test_flipped_byte_in_a_data_cluster_changes_exactly_that_block(
    base: Path, tmp_path: Path
) -> None:
    before = digest_all(base)
    guest = 3 * MiB + 100  # inside the 0x22 write, block 3
    mapping = json.loads(qemu_img("map", "--output=json", str(base)))
    entry = next(e for e in mapping if e["data"] and e["start"] <= guest < e["start"] + e["length"])
    host = entry["offset"] + guest - entry["start"]
    with base.open("r+b") as handle:
        handle.seek(host)
        byte = handle.read(1)
        handle.seek(host)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert compare(before, digest_all(base)) == [3]


def test_save_load_round_trip(base: Path, tmp_path: Path) -> None:
    digests = digest_all(base)
    path = tmp_path / "d" / "x.digests"
    digests.save(path)
    assert Digests.load(path) == digests
    assert [p.name for p in path.parent.iterdir()] == ["x.digests"]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DigestError, match="wrong length"):
        Digests.load(path)


def sparse(size: int, blocks: dict[int, bytes], block_size: int = MiB) -> Digests:
    return Digests.from_map(block_size, size, ALGORITHM, blocks)


def test_changed_blocks_and_compare() -> None:
    assert changed_blocks([(0, 1), (MiB - 1, 2), (5 * MiB, MiB), (7 * MiB, 0)], MiB) == {0, 1, 5}
    a = sparse(2 * MiB, {0: b"a" * 32, 1: b"b" * 32})
    b = sparse(3 * MiB, {0: b"a" * 32, 1: b"c" * 32, 2: b"d" * 32})
    assert compare(a, b) == [1, 2]
    with pytest.raises(DigestError):
        compare(a, sparse(2 * MiB, {0: b"a" * 32}, 2 * MiB))
    with pytest.raises(DigestError, match="beyond"):
        derive(a, {2: b"x" * 32}, 2 * MiB)
    assert resized_blocks(SIZE, SIZE, MiB) == set()
    assert resized_blocks(4 * MiB, 9 * MiB, MiB) == set()
    assert resized_blocks(SIZE, 2 * MiB + 5, MiB) == {2}


def test_derive_zeroes_a_block_and_follows_the_data() -> None:
    """A changed block whose digest is the zero digest stops being held; the derived
    digests of a 1 TiB disk hold only its data blocks."""
    size = 1 << 40
    parent = Digests.from_map(1 << 16, size, "blake3", {5: b"p" * 32, 9_000_000: b"q" * 32})
    child = derive(parent, {5: zero_digest(1 << 16, "blake3"), 77: b"n" * 32}, size)
    assert list(child.indexes) == [77, 9_000_000]
    assert child.get(5) == zero_digest(1 << 16, "blake3") and child.get(77) == b"n" * 32
    assert compare(parent, child) == [5, 77]


def test_format1_file_loads_and_saves_the_same(base: Path, tmp_path: Path) -> None:
    """A format 1 file (every block's BLAKE2b, dense) loads as sparse digests and saves
    back byte for byte."""
    dense = b"".join(raw_digests(base, tmp_path))
    old = tmp_path / "old.digests"
    old.write_bytes(b"QMPBDIG1" + MiB.to_bytes(8, "little") + SIZE.to_bytes(8, "little") + dense)
    loaded = Digests.load(old)
    assert loaded == digest_all(base) and loaded.algorithm == "blake2b"
    again = tmp_path / "again.digests"
    loaded.save(again)
    assert again.read_bytes() == old.read_bytes()
