"""The built-in NBD client against real servers: qemu-nbd and qemu-storage-daemon."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.images.qemu_nbd import stop_process
from qmpbackup.nbd import Extent, NBDClient, NBDError, TLSConfig, parse_uri
from qmpbackup.nbd.copy import NBDSink, copy_ranges

MiB = 1 << 20
KiB = 1 << 10
SIZE = 64 * MiB

pytestmark = pytest.mark.qemu


def run(*argv: str | Path) -> str:
    """Run a QEMU tool, failing the test with its stderr if it fails."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr.strip()}"
    return proc.stdout


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, image)


def qcow2(path: Path, size: int = SIZE, backing: Path | None = None) -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    run(*args, path, str(size))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(argv: list[str], log: Path, address: str | tuple[str, int]) -> Iterator[None]:
    """Run a server until the block exits; ready once ``address`` accepts connections."""
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited: {log.read_text().strip()}")
            family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
            with socket.socket(family) as probe:
                try:
                    probe.connect(address)
                    break
                except OSError:
                    pass
            assert time.monotonic() < deadline, f"{argv[0]} did not start"
            time.sleep(0.02)
        yield
    finally:
        stop_process(proc)
        # qemu-storage-daemon leaves its socket file when it is stopped.
        if isinstance(address, str):
            Path(address).unlink(missing_ok=True)


@contextlib.contextmanager
def qemu_nbd(
    tmp: Path, image: Path, *args: str, fmt: str = "qcow2", name: str = "vda"
) -> Iterator[str]:
    """qemu-nbd serving ``image`` on a unix socket; yields the URI."""
    sock = str(tmp / f"{name}.nbd.sock")
    argv = ["qemu-nbd", "-t", "-e", "8", "-f", fmt, "-k", sock, "-x", name, *args, str(image)]
    with server(argv, tmp / f"{name}.qemu-nbd.log", sock):
        yield f"nbd+unix:///{name}?socket={sock}"


@contextlib.contextmanager
def storage_daemon(
    tmp: Path,
    image: Path,
    export: str = "",
    *,
    name: str = "vda",
    tcp: bool = False,
    tls_dir: Path | None = None,
    blockdev: str | None = None,
) -> Iterator[str]:
    """qemu-storage-daemon exporting ``image`` (qcow2) writable; yields the URI."""
    argv = ["qemu-storage-daemon"]
    if blockdev is None:
        argv += ["--blockdev", f"driver=file,node-name=file0,filename={image}"]
        blockdev = "driver=qcow2,node-name=fmt0,file=file0"
    argv += ["--blockdev", blockdev]
    nbd = []
    scheme = "nbds" if tls_dir else "nbd"
    if tls_dir is not None:
        argv += [
            "--object",
            f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on",
        ]
        nbd.append("tls-creds=tls0")
    address: str | tuple[str, int]
    if tcp:
        port = free_port()
        address = ("127.0.0.1", port)
        nbd.insert(0, f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}")
        uri = f"{scheme}://127.0.0.1:{port}/{name}"
    else:
        address = str(tmp / f"{name}.qsd.sock")
        nbd.insert(0, f"addr.type=unix,addr.path={address}")
        uri = f"{scheme}+unix:///{name}?socket={address}"
    argv += ["--nbd-server", ",".join(nbd)]
    argv += ["--export", f"type=nbd,id=e0,node-name=fmt0,name={name},writable=on{export}"]
    with server(argv, tmp / f"{name}.qsd.log", address):
        yield uri


def compare(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "qcow2") -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def image_map(image: Path) -> list[dict[str, Any]]:
    out = run("qemu-img", "map", "--output=json", "-f", "qcow2", image)
    entries: list[dict[str, Any]] = json.loads(out)
    return entries


# URIs.


def test_parse_uri() -> None:
    a = parse_uri("nbd://example.org/vda")
    assert (a.host, a.port, a.export, a.tls, a.socket_path) == (
        "example.org",
        10809,
        "vda",
        False,
        None,
    )
    a = parse_uri("nbds://[::1]:10900/")
    assert (a.host, a.port, a.export, a.tls) == ("::1", 10900, "", True)
    assert a.is_ip
    a = parse_uri("nbd+unix:///my%20disk?socket=/run/x.sock")
    assert (a.socket_path, a.export, a.tls) == ("/run/x.sock", "my disk", False)
    assert parse_uri("nbds+unix:///vda?socket=/s").tls
    for bad in ("http://h/x", "nbd+unix:///vda", "nbd:///vda", "nbd+unix://host/vda?socket=/s"):
        with pytest.raises(NBDError, match=r"^nbd: invalid URI"):
            parse_uri(bad)


# Handshake and reads.


def test_unix_handshake_size_and_reads(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 0x42 1M 64k", "write -P 0x17 8M 9M")
    with qemu_nbd(tmp_path, image, "-r") as uri, NBDClient.connect(uri, connections=3) as c:
        assert c.size == SIZE
        assert c.read_only and c.can_multi_conn
        assert c.connections == 3
        assert c.pread(64 * KiB, MiB) == b"\x42" * (64 * KiB)
        assert c.pread(128 * KiB, MiB - 64 * KiB) == bytes(64 * KiB) + b"\x42" * (64 * KiB)
        # Spans several requests over several connections, and unallocated space after it.
        buf = bytearray(12 * MiB)
        c.readinto(memoryview(buf), 7 * MiB)
        assert buf == bytes(MiB) + b"\x17" * (9 * MiB) + bytes(2 * MiB)
        with pytest.raises(NBDError, match=r"read-only"):
            c.pwrite(b"x", 0)
        with pytest.raises(NBDError, match=r"outside export"):
            c.pread(2, SIZE - 1)


def test_extended_headers_where_the_server_has_them(tmp_path: Path) -> None:
    """A server that offers extended headers (QEMU 8.2 and later) gets them, an older one
    structured replies; block status asks at most 4 GiB a request either way (larger ones
    measured slower), and reads, writes and extents are the same."""
    image = qcow2(tmp_path / "big.qcow2", size=64 << 30)
    qemu_io(image, "write -P 0x42 40G 64k")
    version = run("qemu-nbd", "--version").split()[1].split(".")
    offered = (int(version[0]), int(version[1])) >= (8, 2)
    with (
        qemu_nbd(tmp_path, image) as uri,
        NBDClient.connect(uri, meta_contexts=["base:allocation"]) as c,
    ):
        assert c.extended_headers is offered
        first = c.block_status(0, c.size, "base:allocation")
        assert first[0].offset == 0
        assert first[-1].end <= 1 << 32
        holes = list(c.extents("base:allocation"))
        assert [(e.offset, e.length, e.flags & 1) for e in holes] == [
            (0, 40 << 30, 1),
            (40 << 30, 64 * KiB, 0),
            ((40 << 30) + 64 * KiB, (24 << 30) - 64 * KiB, 1),
        ]
        assert c.pread(64 * KiB, 40 << 30) == b"\x42" * (64 * KiB)
        c.pwrite(b"\x17" * 4096, 63 << 30)
        c.flush()
        assert c.pread(4096, 63 << 30) == b"\x17" * 4096


def test_tcp_handshake(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 0x5a 0 4k")
    with storage_daemon(tmp_path, image, tcp=True) as uri:
        assert uri.startswith("nbd://127.0.0.1:")
        with NBDClient.connect(uri, connections=2) as c:
            assert c.size == SIZE and not c.read_only
            assert c.pread(8 * KiB, 0) == b"\x5a" * (4 * KiB) + bytes(4 * KiB)


def test_unknown_export(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    with qemu_nbd(tmp_path, image) as uri:
        bad = uri.replace("/vda?", "/nope?")
        with pytest.raises(NBDError) as err:
            NBDClient.connect(bad, meta_contexts=["base:allocation"])
        assert str(err.value) == "nbd: server refused export 'nope': unknown export"
        with pytest.raises(NBDError, match=r"^nbd: server refused export 'nope': unknown export$"):
            NBDClient.connect(bad)


def test_connect_refused(tmp_path: Path) -> None:
    with pytest.raises(NBDError, match=r"^nbd: cannot connect to unix:"):
        NBDClient.connect(f"nbd+unix:///vda?socket={tmp_path}/missing.sock")


def test_server_error_keeps_connection(tmp_path: Path) -> None:
    """An EIO from the server fails that request only; the connection stays in sync."""
    image = tmp_path / "a.raw"
    image.write_bytes(b"\x33" * (4 * MiB))
    blockdev = json.dumps(
        {
            "driver": "raw",
            "node-name": "fmt0",
            "file": {
                "driver": "blkdebug",
                "inject-error": [{"event": "read_aio", "errno": 5, "sector": 2048}],
                "image": {"driver": "file", "filename": str(image)},
            },
        }
    )
    with storage_daemon(tmp_path, image, blockdev=blockdev) as uri, NBDClient.connect(uri) as c:
        with pytest.raises(
            NBDError, match=r"^nbd: read of 65536 bytes at offset 1048576 failed: EIO"
        ):
            c.pread(64 * KiB, MiB)
        assert c.pread(64 * KiB, 0) == b"\x33" * (64 * KiB)


def test_block_size_constraints(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(b"\x21" * MiB)
    blockdev = json.dumps(
        {
            "driver": "blkdebug",
            "node-name": "fmt0",
            "align": 4096,
            "image": {"driver": "file", "filename": str(image)},
        }
    )
    with storage_daemon(tmp_path, image, blockdev=blockdev) as uri, NBDClient.connect(uri) as c:
        assert c.min_block == 4096
        assert c.pread(4096, 8192) == b"\x21" * 4096
        with pytest.raises(NBDError, match=r"not aligned to the 4096-byte blocks"):
            c.pread(100, 8192)
        with pytest.raises(NBDError, match=r"not aligned"):
            c.write_zeroes(1, 4096)


def test_server_gone(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    with qemu_nbd(tmp_path, image) as uri:
        c = NBDClient.connect(uri)
    with pytest.raises(NBDError, match=r"^nbd: connection to unix:.* lost"):
        c.pread(4096, 0)
    c.close()


# Block status.


def test_base_allocation(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 0x42 1M 64k", "write -z 4M 1M", "write -P 1 5M 1M")
    contexts = ["base:allocation", "nope:x"]
    with (
        qemu_nbd(tmp_path, image, "-r") as uri,
        NBDClient.connect(uri, meta_contexts=contexts) as c,
    ):
        assert c.contexts == ("base:allocation",)
        extents = list(c.extents("base:allocation"))
        assert extents[0].offset == 0 and extents[-1].end == SIZE
        assert all(a.end == b.offset and a.flags != b.flags for a, b in itertools.pairwise(extents))
        data = [(e.offset, e.length) for e in extents if e.flags == 0]
        assert data == [(MiB, 64 * KiB), (5 * MiB, MiB)]
        zero = [e for e in extents if e.offset <= 4 * MiB < e.end]
        assert zero[0].flags & 2 and zero[0].end == 5 * MiB
        # A window, merged and clipped to exactly what was asked.
        window = list(c.extents("base:allocation", MiB + 4096, 10 * MiB))
        assert window[0] == Extent(MiB + 4096, 64 * KiB - 4096, 0)
        assert Extent(5 * MiB, MiB, 0) in window
        assert window[-1] == Extent(6 * MiB, 5 * MiB + 4096, 3)
        assert sum(e.length for e in window) == 10 * MiB
        one = c.block_status(0, SIZE, "base:allocation", req_one=True)
        assert one == [Extent(0, MiB, 3)]
        with pytest.raises(NBDError, match=r"'qemu:allocation-depth' is not negotiated"):
            c.block_status(0, SIZE, "qemu:allocation-depth")


def test_dirty_bitmap(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 1 0 1M")
    run("qemu-img", "bitmap", "--add", image, "b")
    qemu_io(image, "write -P 2 2M 64k", "write -P 3 10M 128k", "write -P 4 20M 1")
    with storage_daemon(tmp_path, image, ",bitmaps.0=b") as uri:
        ctx = "qemu:dirty-bitmap:b"
        with NBDClient.connect(uri, meta_contexts=[ctx]) as c:
            assert c.contexts == (ctx,)
            dirty = [(e.offset, e.length) for e in c.extents(ctx) if e.flags & 1]
            assert dirty == [(2 * MiB, 64 * KiB), (10 * MiB, 128 * KiB), (20 * MiB, 64 * KiB)]


def test_allocation_depth(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    qemu_io(base, "write -P 0x11 0 64k", "write -P 0x11 1M 64k")
    top = qcow2(tmp_path / "top.qcow2", backing=base)
    qemu_io(top, "write -P 0x22 1M 64k", "write -P 0x22 2M 64k")
    with storage_daemon(tmp_path, top, ",allocation-depth=on") as uri:
        ctx = "qemu:allocation-depth"
        with NBDClient.connect(uri, meta_contexts=["base:allocation", ctx]) as c:
            assert set(c.contexts) == {"base:allocation", ctx}
            depth = [(e.offset, e.length, e.flags) for e in c.extents(ctx) if e.flags]
            assert depth == [(0, 64 * KiB, 2), (MiB, 64 * KiB, 1), (2 * MiB, 64 * KiB, 1)]
            assert c.pread(2, MiB) == b"\x22\x22"
            assert c.pread(2, 0) == b"\x11\x11"


# Writes.


def test_writes_zeroes_trim_flush(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 0x77 0 16M")
    expected = bytearray(b"\x77" * (16 * MiB) + bytes(SIZE - 16 * MiB))
    pattern = os.urandom(9 * MiB + 123)
    with (
        qemu_nbd(tmp_path, image, "--discard=unmap") as uri,
        NBDClient.connect(uri, connections=2) as c,
    ):
        assert c.can_multi_conn and c.connections == 2
        c.pwrite(pattern, 20 * MiB + 7)
        expected[20 * MiB + 7 : 20 * MiB + 7 + len(pattern)] = pattern
        c.pwrite(memoryview(b"abc"), 5)
        expected[5:8] = b"abc"
        c.write_zeroes(MiB, 2 * MiB)
        c.write_zeroes(4 * MiB + 1, 100, may_trim=False)
        expected[MiB : 3 * MiB] = bytes(2 * MiB)
        expected[4 * MiB + 1 : 4 * MiB + 101] = bytes(100)
        c.trim(8 * MiB, 4 * MiB)
        expected[8 * MiB : 12 * MiB] = bytes(4 * MiB)
        c.flush()
        assert c.pread(len(pattern), 20 * MiB + 7) == pattern
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    compare(raw, image)
    # The trimmed range is unallocated again, not zeroes written as data.
    trimmed = [e for e in image_map(image) if e["start"] == 8 * MiB]
    assert trimmed and trimmed[0]["data"] is False


def test_copy_to_multi_conn(tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    with source.open("wb") as f:
        f.truncate(SIZE)
        for offset, data in (
            (0, os.urandom(3 * MiB + 5)),
            (8 * MiB, bytes(6 * MiB)),  # zeroes stored as data: must arrive as WRITE_ZEROES
            (20 * MiB, os.urandom(10 * MiB)),
            (SIZE - 4096, os.urandom(4096)),
        ):
            f.seek(offset)
            f.write(data)
    target = qcow2(tmp_path / "dst.qcow2")
    qemu_io(target, "write -P 0x99 8M 6M")  # stale data the zeroes must overwrite
    progress: list[int] = []
    with (
        qemu_nbd(tmp_path, source, "-r", fmt="raw", name="src") as src_uri,
        storage_daemon(tmp_path, target, name="dst") as dst_uri,
        NBDClient.connect(src_uri, connections=4, meta_contexts=["base:allocation"]) as src,
        NBDClient.connect(dst_uri, connections=4) as dst,
    ):
        assert src.connections == 4 and dst.connections == 4 and dst.can_multi_conn
        ranges = [(e.offset, e.length) for e in src.extents("base:allocation") if not e.flags]
        total = sum(n for _, n in ranges)
        copied = copy_ranges(
            src,
            NBDSink(dst),
            ranges,
            request_size=2 * MiB,
            in_flight=3,
            on_progress=progress.append,
        )
        dst.flush()
        assert copied == total
        assert progress == sorted(progress) and progress[-1] == total
    compare(source, target)
    zeroed = [e for e in image_map(target) if e["start"] <= 8 * MiB < e["start"] + e["length"]]
    assert zeroed[0]["zero"] is True and zeroed[0]["data"] is False


def test_copy_to_read_only_dest(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    with (
        qemu_nbd(tmp_path, image, "-r") as uri,
        NBDClient.connect(uri) as c,
        pytest.raises(NBDError, match=r"read-only"),
    ):
        copy_ranges(c, NBDSink(c), [(0, MiB)], request_size=MiB, in_flight=4)


# TLS.


def _openssl(*args: str | Path) -> None:
    run("openssl", *args)


def make_certs(directory: Path, ca_name: str = "Test CA") -> None:
    """A throwaway CA, and server and client certificates it signed, in QEMU's file names."""
    directory.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    d = directory
    _openssl(
        "req", "-x509", *ec, "-keyout", d / "ca-key.pem", "-out", d / "ca-cert.pem",
        "-days", "2", "-subj", f"/CN={ca_name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for role, subject, extra in (
        (
            "server",
            "/O=Example/CN=localhost",
            "serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1",
        ),
        ("client", "/O=Example/CN=backup-client", "clientAuth"),
    ):
        ext = d / f"{role}.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={extra}\n"
        )
        _openssl(
            "req",
            *ec,
            "-keyout",
            d / f"{role}-key.pem",
            "-out",
            d / f"{role}.csr",
            "-subj",
            subject,
        )
        _openssl(
            "x509", "-req", "-in", d / f"{role}.csr", "-CA", d / "ca-cert.pem",
            "-CAkey", d / "ca-key.pem", "-CAcreateserial", "-days", "2",
            "-out", d / f"{role}-cert.pem", "-extfile", ext,
        )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tls")
    make_certs(base / "good")
    make_certs(base / "other", ca_name="Other CA")
    return base


def test_tls(tmp_path: Path, certs: Path) -> None:
    good = certs / "good"
    client = TLSConfig(
        ca_cert=str(good / "ca-cert.pem"),
        client_cert=str(good / "client-cert.pem"),
        client_key=str(good / "client-key.pem"),
    )
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 0x42 1M 64k")
    payload = os.urandom(5 * MiB)
    with storage_daemon(tmp_path, image, tcp=True, tls_dir=good) as uri:
        assert uri.startswith("nbds://127.0.0.1:")
        with NBDClient.connect(uri, connections=3, tls=client) as c:
            assert c.connections == 3
            assert c.pread(64 * KiB, MiB) == b"\x42" * (64 * KiB)
            # Large requests in both directions, interleaved over TLS on every connection.
            c.pwrite(payload, 4 * MiB)
            assert c.pread(len(payload), 4 * MiB) == payload
        # By name, the name in the certificate is checked.
        by_name = uri.replace("127.0.0.1", "localhost")
        with NBDClient.connect(by_name, tls=TLSConfig.from_dir(str(good))) as c:
            assert c.pread(2, MiB) == b"\x42\x42"
        with pytest.raises(
            NBDError, match=r"^nbd: TLS with 127.0.0.1:.* failed: .*Hostname mismatch"
        ):
            NBDClient.connect(uri, tls=TLSConfig(client.ca_cert, hostname="elsewhere.example"))
        # No client certificate: the server (verify-peer=on) refuses.
        with (
            pytest.raises(
                NBDError, match=r"^nbd: TLS with 127.0.0.1:\d+ failed: .*client certificate"
            ),
            NBDClient.connect(uri, tls=TLSConfig(ca_cert=client.ca_cert)) as c,
        ):
            c.pread(512, 0)
        # A server certificate from another CA.
        with pytest.raises(NBDError, match=r"failed: server certificate rejected: "):
            NBDClient.connect(uri, tls=TLSConfig(str(certs / "other" / "ca-cert.pem")))
        plain = uri.replace("nbds://", "nbd://")
        with pytest.raises(NBDError, match=r"^nbd: server 127.0.0.1:.* requires TLS"):
            NBDClient.connect(plain)
        with pytest.raises(NBDError, match=r"uses TLS: a TLS configuration .* is needed"):
            NBDClient.connect(uri)


def test_tls_threads(tmp_path: Path, certs: Path) -> None:
    """Many threads reading and writing at once over TLS connections (one reader each)."""
    image = qcow2(tmp_path / "a.qcow2")
    tls = TLSConfig.from_dir(str(certs / "good"))
    errors: list[BaseException] = []

    def worker(c: NBDClient, index: int) -> None:
        rnd = random.Random(index)
        base, model = index * 8 * MiB, bytearray(8 * MiB)
        try:
            for _ in range(20):
                offset, length = rnd.randrange(0, 6 * MiB), rnd.randrange(1, 2 * MiB)
                if rnd.random() < 0.5:
                    data = rnd.randbytes(length)
                    c.pwrite(data, base + offset)
                    model[offset : offset + length] = data
                else:
                    assert c.pread(length, base + offset) == model[offset : offset + length]
            assert c.pread(len(model), base) == model
        except BaseException as exc:
            errors.append(exc)

    with (
        storage_daemon(tmp_path, image, tls_dir=certs / "good") as uri,
        NBDClient.connect(uri, connections=2, tls=tls) as c,
    ):
        threads = [threading.Thread(target=worker, args=(c, i)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


def test_tls_unix(tmp_path: Path, certs: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "write -P 0x42 0 64k")
    with storage_daemon(tmp_path, image, tls_dir=certs / "good") as uri:
        assert uri.startswith("nbds+unix://")
        with NBDClient.connect(uri, tls=TLSConfig.from_dir(str(certs / "good"))) as c:
            assert c.pread(4, 0) == b"\x42" * 4
