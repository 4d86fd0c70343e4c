"""``serve``: a backup's disk read-only over NBD by qemu-nbd, read by stock NBD clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.demo.throwaway import ThrowawayVM
from qmpbackup.nbd import NBDClient
from qmpbackup.repo.repository import Repository

from .support import Cli
from .x509 import client_dir, make_ca, server_dir

MiB = 1 << 20
KiB = 1 << 10
# Each backup's own write: (pattern, offset, length); the full's is also the disk's.
WRITES = [(0x41, 1 * MiB, 256 * KiB), (0x42, 8 * MiB, 256 * KiB), (0x43, 16 * MiB, 128 * KiB)]
KEY = b"correct horse battery staple 8c1f"


@dataclass
class Chain:
    """A repository holding a full and two incrementals of vda, and vda at each."""

    root: Path
    ids: list[str]
    refs: list[Path]


async def _chain(vm: ThrowawayVM, cli: Cli, tmp_path: Path, *extra: str) -> Chain:
    root = tmp_path / "repo"
    refs = []
    for run, (pattern, offset, length) in enumerate(WRITES):
        await vm.write("vda", pattern, offset, length)
        refs.append(await vm.reference("vda", tmp_path / f"ref{run}.raw"))
        level = ["--level", "full"] if run == 0 else []
        await cli.ok("backup", "--repo", str(root), "--disk", "vda", *level, *extra)
    ids = [r.id for r in Repository(root, "testvm").backups()]
    assert len(ids) == 3
    return Chain(root, ids, refs)


@dataclass
class Server:
    """A running ``qmpbackup serve``: its process, URI and what it printed first."""

    proc: subprocess.Popen[str]
    uri: str
    lines: list[str]
    started: float

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


def _qemu_nbd_pids(marker: str) -> list[int]:
    """qemu-nbd processes whose arguments hold ``marker`` (the wrapper execs the binary)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if argv[0].endswith(b"qemu-nbd") and any(marker.encode() in a for a in argv):
                found.append(int(cmdline.parent.name))
    return found


@contextlib.contextmanager
def _serve(root: Path, *args: str) -> Iterator[Server]:
    argv = [sys.executable, "-m", "qmpbackup", "serve", "--repo", str(root), "--disk", "vda"]
    began = time.monotonic()
    proc = subprocess.Popen(
        [*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("Stop with"):
            line = proc.stdout.readline()
            assert line, f"serve exited: {proc.wait()} {lines}"
            lines.append(line.rstrip("\n"))
        uri = lines[0].rsplit(" at ", 1)[1]
        yield Server(proc, uri, lines, time.monotonic() - began)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()


def _compare(ref: Path, uri: str, *opts: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img", "compare", "-f", "raw", *opts, str(ref), uri]
    return subprocess.run(argv, capture_output=True, text=True)


def _depths(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, depth) of each extent of ``qemu:allocation-depth``."""
    argv = ["nbdinfo", "--json", "--map=qemu:allocation-depth", uri]
    found = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in found]


def _depth_at(extents: list[tuple[int, int, int]], offset: int) -> int:
    return next(d for o, n, d in extents if o <= offset < o + n)


async def test_serve_unix_chain_depths_two_clients_and_cleanup(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    chain = await _chain(vm, cli, tmp_path)
    with _serve(chain.root) as server:
        assert server.uri.startswith("nbd+unix:///vda?socket=")
        sock = Path(server.uri.split("socket=", 1)[1])
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert f"backup {chain.ids[2]}" in server.lines[0]
        # The legend: depth 1 the served backup, down to the full.
        for depth, backup_id in enumerate(reversed(chain.ids), start=1):
            assert any(
                line.split()[:3] == [str(depth), "backup", backup_id] for line in server.lines
            )
        # A first client holds its connection while a second reads the whole disk.
        with NBDClient.connect(server.uri) as first:
            assert first.pread(4096, WRITES[2][1]) == bytes([WRITES[2][0]]) * 4096
            compared = _compare(chain.refs[2], server.uri)
            assert compared.returncode == 0, compared.stdout + compared.stderr
            assert first.pread(4096, WRITES[0][1]) == bytes([WRITES[0][0]]) * 4096
        extents = _depths(server.uri)
        for depth, (_, offset, _) in zip((3, 2, 1), WRITES, strict=True):
            assert _depth_at(extents, offset) == depth, extents
        assert _depth_at(extents, 40 * MiB) in (0, 3)  # never written: zeroes or the full's
        pids = _qemu_nbd_pids(str(sock))
        assert len(pids) == 1
        assert server.stop() == 0
    assert not sock.exists() and not sock.parent.exists()
    assert not _qemu_nbd_pids(str(sock))
    assert not Path(f"/proc/{pids[0]}").exists()
    # An older backup, on a socket named by the user.
    path = tmp_path / "full.sock"
    with _serve(chain.root, "--backup", chain.ids[0], "--socket", str(path)) as server:
        assert _compare(chain.refs[0], server.uri).returncode == 0
        assert {d for _, _, d in _depths(server.uri)} <= {0, 1}
        assert server.stop(signal.SIGINT) == 0
    assert not path.exists() and not _qemu_nbd_pids(str(path))
    # A server that dies ends serve with one line, and its socket is removed.
    with _serve(chain.root, "--socket", str(path)) as server:
        (pid,) = _qemu_nbd_pids(str(path))
        os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(30) == 1
        assert server.proc.stderr is not None
        err = server.proc.stderr.read()
        assert len(err.strip().splitlines()) == 1 and "qemu-nbd was killed by signal 9" in err, err
    assert not path.exists()
    _reader_gone(chain, tmp_path / "gone.sock")
    _refusals(chain, tmp_path)


def _reader_gone(chain: Chain, path: Path) -> None:
    """Whoever started serve reads the URI and closes the pipe (``| head -1``): serving
    goes on, and stops cleanly, with nothing on stderr."""
    argv = [sys.executable, "-m", "qmpbackup", "serve", "--repo", str(chain.root)]
    argv += ["--disk", "vda", "--socket", str(path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    uri = proc.stdout.readline().rstrip("\n").rsplit(" at ", 1)[1]
    proc.stdout.close()
    assert _compare(chain.refs[2], uri).returncode == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.stderr.read() == ""
    proc.stderr.close()
    assert not path.exists()


def _refusals(chain: Chain, tmp_path: Path) -> None:
    taken = tmp_path / "taken.sock"
    taken.touch()
    tls = tmp_path / "half-tls"
    tls.mkdir()
    (tls / "ca-cert.pem").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args, words in [
            (["--disk", "vdz"], "no complete backup of disk vdz"),
            (["--backup", "20000101T000000Z-9"], "no backup 20000101T000000Z-9"),
            (["--socket", str(taken)], "exists"),
            (["--port", port], "in use"),
            (["--port", "1", "--tls-dir", str(tls)], "lacks server-cert.pem, server-key.pem"),
        ]:
            argv = [sys.executable, "-m", "qmpbackup", "serve", "--repo", str(chain.root)]
            argv += ["--disk", "vda"] if "--disk" not in args else []
            done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)
            assert done.returncode in (1, 2), (args, done)
            assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
            assert not done.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_serve_tcp_tls_allow_list_compressed_chain(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    chain = await _chain(vm, cli, tmp_path, "--compress")
    assert all(r.compression for r in Repository(chain.root, "testvm").backups())
    ca = make_ca(tmp_path / "ca")
    server_certs = server_dir(ca, tmp_path / "server")
    good = client_dir(ca, tmp_path / "good", "/O=Example/CN=restore-client")
    stranger = client_dir(ca, tmp_path / "stranger", "/O=Example/CN=someone-else")
    port = _free_port()
    args = ["--port", str(port), "--tls-dir", str(server_certs)]
    with _serve(chain.root, *args, "--tls-allow", "O=Example,CN=restore-client") as server:
        assert server.uri == f"nbds://127.0.0.1:{port}/vda"

        def info(certs: Path) -> subprocess.CompletedProcess[str]:
            target = f"{server.uri}?tls-certificates={certs}"
            return subprocess.run(["nbdinfo", "--size", target], capture_output=True, text=True)

        assert info(good).stdout.strip() == str(64 * MiB)
        assert info(stranger).returncode != 0
        plain = server.uri.replace("nbds://", "nbd://")
        assert subprocess.run(["nbdinfo", "--size", plain], capture_output=True).returncode != 0
        # qemu-img reads it all with the allowed certificate.
        creds = f"tls-creds-x509,id=c,endpoint=client,dir={good}"
        opts = f"driver=nbd,host=127.0.0.1,port={port},export=vda,tls-creds=c"
        ref = f"driver=raw,file.filename={chain.refs[2]}"
        argv = ["qemu-img", "compare", "--object", creds, "--image-opts", ref, opts]
        compared = subprocess.run(argv, capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        pids = _qemu_nbd_pids(str(server_certs))
        assert len(pids) == 1
        assert server.stop(signal.SIGHUP) == 0  # a closed terminal stops it as SIGTERM does
    assert not _qemu_nbd_pids(str(server_certs))


class _Cmdlines:
    """Every process's ``/proc/PID/cmdline`` seen while it runs (every 5 ms)."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    self.seen.append(path.read_bytes())
            time.sleep(0.005)

    def __enter__(self) -> _Cmdlines:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


async def test_serve_encrypted_chain_and_killed_serve(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    chain = await _chain(vm, cli, tmp_path, "--encrypt-key", str(key))
    refused = subprocess.run(
        [sys.executable, "-m", "qmpbackup", "serve", "--repo", str(chain.root), "--disk", "vda"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode in (1, 2) and "is encrypted" in refused.stderr
    wrong = tmp_path / "wrong-key"
    wrong.write_bytes(b"not the key")
    refused = subprocess.run(
        [sys.executable, "-m", "qmpbackup", "serve", "--repo", str(chain.root), "--disk", "vda",
         "--encrypt-key", str(wrong)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 1 and not refused.stdout, refused
    assert len(refused.stderr.strip().splitlines()) == 1 and "qemu-nbd" in refused.stderr
    with _Cmdlines() as seen, _serve(chain.root, "--encrypt-key", str(key)) as server:
        compared = _compare(chain.refs[2], server.uri)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        assert _depth_at(_depths(server.uri), WRITES[1][1]) == 2
        sock = server.uri.split("socket=", 1)[1]
        (pid,) = _qemu_nbd_pids(sock)
        # SIGKILL leaves no cleanup to serve: the kernel kills qemu-nbd with it.
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    # The next serve removes the private folder the killed one left.
    assert Path(sock).parent.exists()
    with _serve(chain.root, "--encrypt-key", str(key)) as server:
        assert not Path(sock).parent.exists()
        assert server.stop() == 0
    assert seen.seen and not [c for c in seen.seen if KEY in c]


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    return True
