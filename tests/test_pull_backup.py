"""Pull-mode backups against a real QEMU: point-in-time NBD exports read by real clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.demo.throwaway import ThrowawayVM, images_equal
from qmpbackup.images.pull_copy import pull_copy
from qmpbackup.nbd import NBDError, TLSConfig
from qmpbackup.request import BackupSpec, DiskBackupSpec, ServerSpec, backup_to_xml

from .conftest import block_state, qemu_version
from .support import CLUSTER, Cli, clusters_of
from .x509 import client_dir, make_ca, server_dir

MiB = 1024 * 1024


def pull_xml(
    path: Path,
    disks: Mapping[str, Mapping[str, Any]] | None = None,
    incremental: str | None = None,
    server: ServerSpec | None = None,
) -> Path:
    """A ``<domainbackup mode='pull'>``; ``disks`` maps names to their other fields."""
    entries = tuple(DiskBackupSpec(name=n, **fields) for n, fields in (disks or {}).items())
    spec = BackupSpec(mode="pull", incremental=incremental, server=server, disks=entries)
    path.write_text(backup_to_xml(spec))
    return path


def uris(out: str) -> dict[str, str]:
    """``{disk: uri}`` from backup-begin's output."""
    return dict(re.findall(r"^(vd\w) (nbds?(?:\+unix)?://\S+)$", out, re.M))


def nbd_map(uri: str, context: str = "base:allocation", *extra: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` as (offset, length, flags)."""
    proc = subprocess.run(
        ["nbdinfo", f"--map={context}", *extra, uri], capture_output=True, text=True, check=True
    )
    return [
        (int(m[0]), int(m[1]), int(m[2]))
        for m in re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)", proc.stdout, re.M)
    ]


def dirty_clusters(uri: str, disk: str, bitmap: str | None = None) -> set[int]:
    """Clusters marked dirty in the export's ``qemu:dirty-bitmap:backup-<disk>`` context
    (libvirt's name, which its clients ask for), or ``qemu:dirty-bitmap:<bitmap>``."""
    out: set[int] = set()
    for offset, length, flags in nbd_map(uri, f"qemu:dirty-bitmap:{bitmap or 'backup-' + disk}"):
        if flags & 1:
            out |= clusters_of(offset, length)
    return out


def convert(uri: str, out: Path) -> Path:
    """``qemu-img convert`` from an NBD URI, as a third-party reader would."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", uri, "-O", "qcow2", str(out)], check=True)
    return out


async def assert_clean(vm: ThrowawayVM, state_dir: Path) -> None:
    """No qmpbackup- node, job, export or scratch file is left."""
    state = await block_state(vm)
    assert "qmpbackup-" not in str(state)
    assert state["jobs"] == []
    assert await vm.session.execute("query-block-exports") == []
    scratch = state_dir / "scratch"
    assert not scratch.exists() or not list(scratch.iterdir())


async def test_pull_full_is_point_in_time(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    await vm.write("vda", 0x42, MiB, 64 * 1024)
    await vm.write("vdb", 0x58, 0, 4 * MiB)
    refs = {d: await vm.reference(d, tmp_path / f"ref-{d}.raw") for d in ("vda", "vdb")}
    begun = await cli.ok("backup-begin", str(pull_xml(tmp_path / "p.xml")), "check1")
    assert "Backup id 1 created" in begun.out
    found = uris(begun.out)
    socket = cli.state_dir / "nbd.sock"
    assert found == {d: f"nbd+unix:///{d}?socket={socket}" for d in ("vda", "vdb")}
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
    # The guest overwrites while the reader copies.
    await vm.write("vda", 0x99, 0, 8 * MiB)
    await vm.write("vdb", 0x99, 0, 8 * MiB)
    for disk, uri in found.items():
        assert images_equal(convert(uri, tmp_path / f"{disk}.qcow2"), refs[disk])
        builtin = await asyncio.to_thread(pull_copy, uri, tmp_path / f"{disk}.builtin.qcow2")
        assert images_equal(builtin.image, refs[disk])
    info = (await cli.ok("jobinfo")).out
    assert "Mode:             pull" in info and found["vda"] in info
    ended = await cli.ok("backup-end", "1")
    assert "Backup id 1 completed" in ended.out
    await assert_clean(vm, cli.state_dir)
    # The NBD server is stopped: nothing answers on its socket any more.
    gone = subprocess.run(["nbdinfo", "--size", found["vda"]], capture_output=True)
    assert gone.returncode != 0
    # The checkpoint stays: the backup completed.
    assert (await cli.ok("checkpoint-list", "--name")).out.split() == ["check1"]


async def test_pull_incremental_dirty_extents(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """backup_pull_2.xml: the export's dirty bitmap is exactly the writes since check1."""
    await cli.ok("backup-begin", str(pull_xml(tmp_path / "p1.xml")), "check1")
    await cli.ok("backup-end", "1")
    writes = [(2 * MiB, 4 * MiB), (20 * MiB + 4096, 512), (40 * MiB, 3 * CLUSTER)]
    for offset, length in writes:
        await vm.write("vda", 0x43, offset, length)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    scratch = tmp_path / "scratch.qcow2"
    spec = pull_xml(
        tmp_path / "p2.xml",
        {"vda": {"scratch": str(scratch)}, "vdb": {"backup": False}},
        incremental="check1",
    )
    begun = await cli.ok("backup-begin", str(spec), "check2")
    uri = uris(begun.out)["vda"]
    # Writes after the instant are neither in the data nor in the bitmap.
    await vm.write("vda", 0x99, 50 * MiB, MiB)
    expected: set[int] = set()
    for offset, length in writes:
        expected |= clusters_of(offset, length)
    assert dirty_clusters(uri, "vda") == expected
    assert images_equal(convert(uri, tmp_path / "view.qcow2"), ref)
    assert scratch.exists()
    await cli.ok("backup-end", "1")
    await assert_clean(vm, cli.state_dir)
    assert not scratch.exists()


async def test_pull_incremental_exportbitmap_names_the_context(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """exportbitmap='changes' overrides libvirt's default name: a client asks for
    qemu:dirty-bitmap:changes, and backup-vda is not offered."""
    await cli.ok("backup-begin", str(pull_xml(tmp_path / "p1.xml")), "check1")
    await cli.ok("backup-end", "1")
    await vm.write("vda", 0x43, 3 * MiB, 2 * CLUSTER)
    spec = pull_xml(tmp_path / "p2.xml", {"vda": {"exportbitmap": "changes"}}, "check1")
    uri = uris((await cli.ok("backup-begin", str(spec))).out)["vda"]
    assert dirty_clusters(uri, "vda", "changes") == clusters_of(3 * MiB, 2 * CLUSTER)
    with pytest.raises(subprocess.CalledProcessError):
        nbd_map(uri, "qemu:dirty-bitmap:backup-vda")
    await cli.ok("backup-end", "1")
    await assert_clean(vm, cli.state_dir)


async def test_pull_tcp_auto_port_twice_and_disjoint(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    tcp = ServerSpec(name="localhost")
    for round_ in range(2):
        vda_only = {"vda": {}, "vdb": {"backup": False}}
        spec = pull_xml(tmp_path / f"t{round_}.xml", vda_only, server=tcp)
        begun = await cli.ok("backup-begin", str(spec))
        uri = uris(begun.out)["vda"]
        assert re.fullmatch(r"nbd://localhost:\d+/vda", uri), uri
        assert nbd_map(uri)  # readable
        # A second backup of the other disk runs at the same time on the same server.
        other = pull_xml(tmp_path / f"o{round_}.xml", {"vda": {"backup": False}, "vdb": {}})
        second = await cli.ok("backup-begin", str(other))
        assert "Backup id 2 created" in second.out
        assert uris(second.out)["vdb"] == uri.replace("/vda", "/vdb")
        refused = await cli("backup-begin", str(spec))
        assert refused.rc == 1 and "already being backed up by backup id 1" in refused.err
        await cli.ok("backup-end", "1")
        assert nbd_map(uris(second.out)["vdb"])  # still served after backup 1 ended
        await cli.ok("backup-end", "2")
        await assert_clean(vm, cli.state_dir)
        # The last backup using it stopped the server: the port is free again.
        assert subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode != 0


async def test_pull_shallow_allocation_depth(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    """Top-layer clusters (depth 1) over Base1.img make vda at the instant."""
    await vm.write("vda", 0x42, MiB, 64 * 1024)
    await vm.write("vda", 0x44, 30 * MiB, 2 * MiB)
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    spec = pull_xml(
        tmp_path / "s.xml",
        {"vda": {"format": "qcow2", "shallow": True}, "vdb": {"backup": False}},
    )
    uri = uris((await cli.ok("backup-begin", str(spec))).out)["vda"]
    await vm.write("vda", 0x99, 0, 4 * MiB)
    depth = nbd_map(uri, "qemu:allocation-depth")
    local = {c for o, n, d in depth if d == 1 for c in clusters_of(o, n)}
    assert clusters_of(MiB, 64 * 1024) | clusters_of(30 * MiB, 2 * MiB) <= local
    # The slides' way: a qcow2 over the export, copy-on-read of the depth-1 extents,
    # then an unsafe rebase onto Base1.img.
    image = tmp_path / "shallow.qcow2"
    base = vm.disks[0].backing
    assert base is not None
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", uri, str(image)],
        check=True,
    )
    reads = [f"read {o} {n}" for o, n, d in depth if d == 1]
    args = [a for r in reads for a in ("-c", r)]
    subprocess.run(["qemu-io", "-C", "-f", "qcow2", *args, str(image)], check=True)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(base), str(image)],
        check=True,
    )
    assert images_equal(image, ref)
    await cli.ok("backup-end", "1")
    await assert_clean(vm, cli.state_dir)


def _tls_config(certs: Path) -> TLSConfig:
    return TLSConfig(
        ca_cert=str(certs / "ca-cert.pem"),
        client_cert=str(certs / "client-cert.pem"),
        client_key=str(certs / "client-key.pem"),
    )


async def test_pull_tls_allow_list(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server = server_dir(ca, tmp_path / "server")
    good = client_dir(ca, tmp_path / "good", "/O=Example/CN=backup-client")
    stranger = client_dir(ca, tmp_path / "stranger", "/O=Example/CN=someone-else")
    other_ca = make_ca(tmp_path / "other-ca", "Other CA")
    forged = client_dir(other_ca, tmp_path / "forged", "/O=Example/CN=backup-client")
    ref = await vm.reference("vda", tmp_path / "ref.raw")
    spec = pull_xml(
        tmp_path / "t.xml",
        {"vda": {}, "vdb": {"backup": False}},
        server=ServerSpec(name="localhost", tls=True),
    )
    begun = await cli.ok(
        "backup-begin", str(spec), "--tls-dir", str(server),
        "--tls-allow", "O=Example,CN=backup-client",
    )  # fmt: skip
    uri = uris(begun.out)["vda"]
    assert uri.startswith("nbds://localhost:")

    def info(certs: Path | None, tls_uri: str = uri) -> subprocess.CompletedProcess[str]:
        target = f"{tls_uri}?tls-certificates={certs}" if certs else tls_uri
        return subprocess.run(["nbdinfo", "--size", target], capture_output=True, text=True)

    assert info(good).stdout.strip() == str(64 * MiB)
    assert info(stranger).returncode != 0
    # The built-in client reads with the right certificate, and is refused without it.
    copied = await asyncio.to_thread(pull_copy, uri, tmp_path / "tls.qcow2", tls=_tls_config(good))
    assert images_equal(copied.image, ref)
    with pytest.raises(NBDError):
        await asyncio.to_thread(pull_copy, uri, tmp_path / "no.qcow2", tls=_tls_config(stranger))
    assert not (tmp_path / "no.qcow2").exists()
    assert info(forged).returncode != 0
    assert info(None, uri.replace("nbds://", "nbd://")).returncode != 0
    await cli.ok("backup-end", "1")
    await assert_clean(vm, cli.state_dir)
    objects = await vm.session.execute("qom-list", {"path": "/objects"})
    assert not [o for o in objects if o["name"].startswith("qmpbackup-")]


async def test_reads_across_saved_clusters_see_the_instant(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """QEMU 7.2's snapshot-access answers a read that starts in clusters already saved
    by copy-before-write and runs past them with the guest's new data; the exported
    view must split reads so that no reader, ours or anyone's, sees that."""
    await vm.write("vdb", 0x59, MiB, 6 * MiB)
    ref = await vm.reference("vdb", tmp_path / "ref.raw")
    spec = pull_xml(tmp_path / "p.xml", {"vda": {"backup": False}, "vdb": {}})
    uri = uris((await cli.ok("backup-begin", str(spec))).out)["vdb"]
    await vm.write("vdb", 0x7A, 3 * MiB + 64 * 1024, 2 * MiB)
    # One read from inside the overwritten clusters to well past them.
    for offset, length in ((3 * MiB + 64 * 1024, 3 * MiB), (MiB, 6 * MiB), (4 * MiB, 2 * MiB)):
        read = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", f"read -P 0x59 {offset} {length}", uri],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "Pattern verification failed" not in read.stdout, (offset, length, read.stdout)
    copy = await asyncio.to_thread(pull_copy, uri, tmp_path / "vdb.qcow2")
    assert images_equal(copy.image, ref)
    await cli.ok("backup-end", "1")


async def test_a_probe_decides_whether_the_view_splits_reads(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """The first pull backup-begin probes this QEMU's snapshot-access (a tiny fleecing,
    written through and read across, then undone) and remembers what it found: QEMU 7.2
    reads past saved clusters, so its view splits reads; 10.0 does not, so it exports
    snapshot-access itself (``test_reads_across_saved_clusters_see_the_instant`` proves
    either view reads the instant). The probe leaves nothing behind."""
    spec = pull_xml(tmp_path / "p.xml", {"vda": {"backup": False}, "vdb": {}})
    await cli.ok("backup-begin", str(spec))
    probes = json.loads((cli.state_dir / "probes.json").read_text())
    (build,) = probes
    found = probes[build]["snapshot_overread"]
    major = int(qemu_version().split()[3].split(".")[0])
    assert found is (major < 8), (build, found)
    named = await vm.session.execute("query-named-block-nodes", {"flat": True})
    nodes = [n["node-name"] for n in named]
    assert ("qmpbackup-1-vdb-view" in nodes) is found
    assert "qmpbackup-1-vdb-access" in nodes
    assert not [n for n in nodes if "probe" in n]
    assert not (cli.state_dir / "probe").exists() or not list((cli.state_dir / "probe").iterdir())
    info = (await cli.ok("info")).out
    assert f"  {'yes' if found else 'no '}  snapshot-access reads past saved clusters" in info
    await cli.ok("backup-end", "1")
    await assert_clean(vm, cli.state_dir)
