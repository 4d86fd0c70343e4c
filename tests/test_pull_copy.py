"""Pull backups written by the built-in NBD client: the slides' chain, zeroed extents."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qmpbackup.demo.throwaway import ThrowawayVM, images_equal
from qmpbackup.images.pull_copy import pull_copy

from .support import Cli, allocated_clusters, clusters_of, data_clusters, qemu_img_info
from .test_pull_backup import assert_clean, dirty_clusters, pull_xml, uris

MiB = 1024 * 1024


async def test_pull_chain_written_by_builtin_client(
    vm: ThrowawayVM, cli: Cli, tmp_path: Path
) -> None:
    """Backup1.1 <- Backup1.2 <- Backup1.3 and Backup1.1 <- Backup1.4, each equal to its instant."""
    images: dict[int, Path] = {}

    async def take(n: int, incremental: str | None, checkpoint: str | None,
                   backing: int | None, writes: list[tuple[int, int]]) -> None:  # fmt: skip
        ref = await vm.reference("vda", tmp_path / f"ref-{n}.raw")
        spec = pull_xml(tmp_path / f"b{n}.xml", {"vda": {}, "vdb": {"backup": False}}, incremental)
        begun = await cli.ok("backup-begin", str(spec), *([checkpoint] if checkpoint else []))
        uri = uris(begun.out)["vda"]
        # The guest keeps writing while the copy runs.
        await vm.write("vda", 0xF0 + n, 60 * MiB, MiB)
        if incremental:
            expected = {c for o, n_ in writes for c in clusters_of(o, n_)}
            assert dirty_clusters(uri, "vda") == expected
        out = tmp_path / f"Backup1.{n}.qcow2"
        result = await asyncio.to_thread(
            pull_copy,
            uri,
            out,
            backing=images[backing] if backing else None,
            bitmap="backup-vda" if incremental else None,
        )
        assert result.image == out
        images[n] = out
        await cli.ok("backup-end", "1")
        assert images_equal(out, ref)
        if incremental:
            assert allocated_clusters(out) == expected
            assert qemu_img_info(out)["backing-filename"] == images[backing or 0].name

    base_writes = [(0, 4 * MiB)]
    await vm.write("vda", 0x41, 0, 4 * MiB)
    await take(1, None, "check1", None, base_writes)
    since1 = [(60 * MiB, MiB), (MiB, 4 * MiB)]
    await vm.write("vda", 0x42, MiB, 4 * MiB)
    await take(2, "check1", "check2", 1, since1)
    # Zeroed and trimmed extents that held data in older backups.
    await vm.guest_io("vda", f"write -z {2 * MiB} {MiB}")
    await vm.guest_io("vda", f"discard {3 * MiB} {MiB}")
    await vm.write("vda", 0x43, 8 * MiB, 128 * 1024)
    since2 = [(60 * MiB, MiB), (2 * MiB, 2 * MiB), (8 * MiB, 128 * 1024)]
    await take(3, "check2", "check3", 2, since2)
    await vm.write("vda", 0x44, 12 * MiB, MiB)
    since1_all = [*since1, *since2, (60 * MiB, MiB), (12 * MiB, MiB)]
    await take(4, "check1", None, 1, since1_all)
    await assert_clean(vm, cli.state_dir)


async def test_pull_full_raw_and_qcow2_sparse(vm: ThrowawayVM, cli: Cli, tmp_path: Path) -> None:
    await vm.write("vdb", 0x58, 10 * MiB, 2 * MiB)
    ref = await vm.reference("vdb", tmp_path / "ref.raw")
    spec = pull_xml(tmp_path / "p.xml", {"vda": {"backup": False}, "vdb": {}})
    uri = uris((await cli.ok("backup-begin", str(spec))).out)["vdb"]
    await vm.write("vdb", 0x99, 0, 16 * MiB)
    raw = await asyncio.to_thread(pull_copy, uri, tmp_path / "vdb.raw", fmt="raw")
    qcow = await asyncio.to_thread(pull_copy, uri, tmp_path / "vdb.qcow2")
    await cli.ok("backup-end", "1")
    assert images_equal(raw.image, ref, "raw") and images_equal(qcow.image, ref)
    # Zero regions stay sparse: only the 2 MiB of data take room in either image.
    assert data_clusters(qcow.image) == clusters_of(10 * MiB, 2 * MiB)
    # qemu-img allocates the first block of every new raw file, for alignment probing.
    assert data_clusters(raw.image, "raw") - {0} == clusters_of(10 * MiB, 2 * MiB)
    assert qemu_img_info(qcow.image)["actual-size"] < 4 * MiB
