"""``--encrypt-key``: a repository of LUKS-encrypted qcow2 images that QEMU writes and
stock ``qemu-img`` opens with the key file; keyed digests; refusals; no key anywhere."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from pathlib import Path

import blake3

from qmpbackup.demo.throwaway import ThrowawayVM, images_equal, qemu_img
from qmpbackup.images.keyed import DIGEST_CONTEXT, using_key
from qmpbackup.repo.digests import block_digest, zero_digest
from qmpbackup.repo.repository import Repository

from .support import Cli

MiB = 1 << 20
KiB = 1 << 10
PASSPHRASE = b"correct horse battery staple 8c1f"


def _key(tmp_path: Path, value: bytes = PASSPHRASE) -> Path:
    path = tmp_path / ("key" if value == PASSPHRASE else "wrong-key")
    path.write_bytes(value)
    return path


def _slot_iters(image: Path) -> int:
    """The PBKDF2 iterations of the first LUKS key slot of an encrypted qcow2 image."""
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image)))
    slots = info["format-specific"]["data"]["encrypt"]["slots"]
    return int(next(s["iters"] for s in slots if s["active"]))


def _opts(image: Path, depth: int) -> str:
    layers = ",".join("backing." * i + "encrypt.key-secret=k" for i in range(depth))
    return f"driver=qcow2,file.filename={image},{layers}"


def _secret_forms() -> list[bytes]:
    return [PASSPHRASE, PASSPHRASE.hex().encode(), base64.b64encode(PASSPHRASE)]


class _Cmdlines:
    """Every process's ``/proc/PID/cmdline`` seen while it runs (every 5 ms)."""

    def __init__(self) -> None:
        self.seen: dict[int, bytes] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    self.seen[int(path.parent.name)] = path.read_bytes()
            time.sleep(0.005)

    def __enter__(self) -> _Cmdlines:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _first_data_cluster(image: Path) -> int:
    """The host offset of the first data cluster of a qcow2 image, from its L1/L2 tables
    (QEMU's map gives no offsets for encrypted images)."""
    data = image.read_bytes()
    l1_size = int.from_bytes(data[36:40], "big")
    l1_offset = int.from_bytes(data[40:48], "big")
    mask = 0x00FFFFFFFFFFFE00
    for i in range(l1_size):
        l2 = int.from_bytes(data[l1_offset + 8 * i : l1_offset + 8 * i + 8], "big") & mask
        for j in range(0, 65536, 8) if l2 else ():
            entry = int.from_bytes(data[l2 + j : l2 + j + 8], "big")
            if entry & mask and not entry & 1:
                return entry & mask
    raise AssertionError(f"{image}: no data cluster")


def _assert_key_nowhere(tmp_path: Path, key: Path, outputs: list[str]) -> None:
    """The key's value, hex or base64, is in no output and no file under ``tmp_path``
    (logs, records, digests' metadata, journal, state) but the key file itself."""
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != key and p.suffix in
             {".json", ".log", ".jsonl", ""}]  # fmt: skip
    blobs = [o.encode() for o in outputs] + [p.read_bytes() for p in files]
    blobs += [p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file()]
    for form in _secret_forms():
        assert not any(form in blob for blob in blobs), form


async def _verify_finds_a_flipped_byte(cli: Cli, root: str, key: Path, image: Path) -> None:
    """Flip a byte of ``image``'s first data cluster: verify fails and names the file."""
    host = _first_data_cluster(image)
    with open(image, "r+b") as handle:
        handle.seek(host + 100)
        byte = handle.read(1)
        handle.seek(host + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    bad = await cli("verify", "--repo", root, "--encrypt-key", str(key))
    assert bad.rc == 1 and str(image) in bad.out + bad.err


async def test_encrypted_push_chain_restores_verifies_and_hides_the_key(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key = _key(tmp_path)
    repo = Repository(tmp_path / "repo", "testvm")
    root = str(repo.root)
    refs: list[Path] = []
    outputs: list[str] = []
    watch = _Cmdlines().__enter__()
    for run in range(3):
        await vm.write("vda", 0x40 + run, (run * 2 + 1) * MiB, 128 * KiB)
        refs.append(await vm.reference("vda", tmp_path / f"ref{run}.raw"))
        level = ["--level", "full"] if run == 0 else []
        done = await cli.ok("backup", "--repo", root, "--encrypt-key", str(key), *level,
                            "--disk", "vda", verbose=True)  # fmt: skip
        outputs += [done.out, done.err]
        # The LUKS targets are made by qemu-img beforehand: QEMU's blockdev-create would
        # stop the VM's main loop for its ~2.4 s of PBKDF2 timing.
        executed = {c["execute"] for c in done.qmp_commands()}
        assert "blockdev-add" in executed and "blockdev-create" not in executed
    records = repo.backups()
    assert [r.level for r in records] == ["full", "inc", "inc"]
    assert all(r.encryption == "luks" and r.digest_key for r in records)
    obj = f"secret,id=k,file={key}"
    for depth, (record, ref) in enumerate(zip(records, refs, strict=True), start=1):
        image = repo.image_path(record, "vda")
        info = json.loads(qemu_img("info", "-U", "--output=json", str(image)))
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        # A key file of 32 bytes or more is taken for a random key: the shortest stretching.
        assert _slot_iters(image) < 100_000
        qemu_img("check", "--object", obj, "--image-opts", _opts(image, depth))
        qemu_img("compare", "--object", obj, "--image-opts", _opts(image, depth),
                 f"driver=raw,file.filename={ref}")  # fmt: skip
        out = tmp_path / f"restored{depth}.qcow2"
        args = ["--out", str(out), "--backup", record.id, "--encrypt-key", str(key)]
        done = await cli.ok("restore", "--repo", root, "--disk", "vda", *args, verbose=True)
        outputs += [done.out, done.err]
        assert images_equal(out, ref)
    good = await cli.ok("verify", "--repo", root, "--encrypt-key", str(key), verbose=True)
    outputs += [good.out, good.err]
    watch.__exit__()
    assert any(b"qemu-img" in c for c in watch.seen.values())
    assert any(b"qemu-nbd" in c for c in watch.seen.values())
    outputs += [c.decode(errors="replace") for c in watch.seen.values()]
    _assert_key_nowhere(tmp_path, key, outputs)

    # A byte flipped in an encrypted image is found, and the file named.
    await _verify_finds_a_flipped_byte(cli, root, key, repo.image_path(records[1], "vda"))


async def test_encrypted_repository_refusals_write_nothing(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key = tmp_path / "short-key"
    key.write_bytes(b"a person's passphrase")  # under 32 bytes: QEMU's own stretching
    root = str(tmp_path / "repo")
    await cli.ok("backup", "--repo", root, "--encrypt-key", str(key), "--disk", "vda")
    (record,) = Repository(tmp_path / "repo", "testvm").backups()
    assert _slot_iters(Repository(tmp_path / "repo", "testvm").image_path(record, "vda")) > 100_000
    before = sorted(p for p in (tmp_path / "repo").rglob("*"))
    wrong = _key(tmp_path, b"not the key")
    binary, empty = tmp_path / "binary-key", tmp_path / "empty-key"
    binary.write_bytes(bytes(range(256)))
    empty.write_bytes(b"\n")
    for args, words in [
        ((), "is encrypted: give its --encrypt-key"),
        (("--encrypt-key", str(wrong)), "does not open"),
        (("--encrypt-key", str(binary)), "not UTF-8 text"),
        (("--encrypt-key", str(empty)), "empty"),
    ]:
        refused = await cli("backup", "--repo", root, "--disk", "vda", *args)
        assert refused.rc in (1, 2), refused
        assert len(refused.err.strip().splitlines()) == 1 and words in refused.err, refused.err
        assert sorted(p for p in (tmp_path / "repo").rglob("*")) == before
    for command in (["verify"], ["restore", "--disk", "vda", "--out", str(tmp_path / "o")]):
        refused = await cli(*command, "--repo", root)
        assert refused.rc in (1, 2) and "is encrypted" in refused.err, refused.err
    plain = str(tmp_path / "plain")
    await cli.ok("backup", "--repo", plain, "--disk", "vda")
    refused = await cli("backup", "--repo", plain, "--disk", "vda", "--encrypt-key", str(key))
    assert refused.rc in (1, 2) and "is not encrypted" in refused.err, refused.err


async def test_prune_flattens_into_an_encrypted_image(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key = _key(tmp_path)
    repo = Repository(tmp_path / "repo", "testvm")
    root = str(repo.root)
    for run in range(2):
        await vm.write("vda", 0x50 + run, (run + 1) * MiB, 64 * KiB)
        await cli.ok("backup", "--repo", root, "--encrypt-key", str(key), "--disk", "vda")
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    refused = await cli("prune", "--repo", root, "--keep", "1")
    assert refused.rc in (1, 2) and "is encrypted" in refused.err, refused.err
    await cli.ok("prune", "--repo", root, "--keep", "1", "--encrypt-key", str(key))
    (kept,) = repo.backups()
    image = repo.image_path(kept, "vda")
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image)))
    assert info["encrypted"] and "backing-filename" not in info
    await cli.ok("verify", "--repo", root, "--encrypt-key", str(key))
    out = tmp_path / "restored.raw"
    await cli.ok("restore", "--repo", root, "--disk", "vda", "--out", str(out), "--format", "raw",
                 "--encrypt-key", str(key))  # fmt: skip
    assert images_equal(out, ref)


def test_digests_under_a_key_are_keyed_and_derived_from_the_file(tmp_path: Path) -> None:
    """Keyed BLAKE3 (derive_key from the file's bytes): nothing a plain digest of the data
    would match, the same under the same file, another under another; zeroes too."""
    block = bytes(range(256)) * 256
    plain = block_digest(block, "blake3")
    assert plain == blake3.blake3(block).digest()
    with using_key(_key(tmp_path)):
        keyed = block_digest(block, "blake3")
        keyed_zero = zero_digest(65536, "blake3")
    with using_key(_key(tmp_path)):
        assert block_digest(block, "blake3") == keyed
    with using_key(_key(tmp_path, b"another key")):
        assert block_digest(block, "blake3") != keyed
    assert keyed != plain and keyed_zero != zero_digest(65536, "blake3")
    derived = blake3.blake3(PASSPHRASE, derive_key_context=DIGEST_CONTEXT).digest()
    assert keyed == blake3.blake3(block, key=derived).digest()
