"""Part IV's chain of backups, the same in push and in pull mode.

Its rounds, how a round begins, and how its backups and the chains they make
are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..request import BackupSpec, CheckpointSpec, checkpoint_to_xml
from ..results import BackupBegun
from .show import (
    allocated_clusters,
    chain_text,
    check,
    image_info,
    picture,
    rebase,
    say,
    show_file,
    size_text,
)
from .stage import DISKS, NUMBER, Demo
from .throwaway import images_equal


@dataclass(frozen=True)
class Round:
    """One backup of Part IV's chain, in push or in pull mode."""

    number: int
    title: str
    incremental: str | None  # the checkpoint it copies the changes since
    checkpoint: str | None  # the checkpoint it creates at its instant
    parent: int | None  # the backup it is rebased onto
    during: dict[str, str]  # what the guest writes while it copies, per disk


ROUNDS = (
    Round(1, "full backup + checkpoint check1", None, "check1", None,
          {"vda": "---DDDD-", "vdb": "---WWWW-"}),
    Round(2, "incremental from check1 + checkpoint check2", "check1", "check2", 1,
          {"vda": "----EEEE", "vdb": "----VVVV"}),
    Round(3, "incremental from check2 + checkpoint check3", "check2", "check3", 2,
          {"vda": "F----FFF", "vdb": "U----UUU"}),
    Round(4, "differential from check1, no checkpoint", "check1", None, 1,
          {"vda": "------!!", "vdb": "------!!"}),
)  # fmt: skip


async def begin_round(
    demo: Demo, folder: Path, backup: Round, spec_path: Path, spec: BackupSpec
) -> tuple[dict[str, Path], dict[str, set[int]], BackupBegun]:
    """Show the round's checkpoint XML, take references, ``backup-begin``.

    Returns the references of the disks at the instant, the clusters dirtied
    since the round's incremental checkpoint, and what began.
    """
    checkpoint: CheckpointSpec | None = None
    command = f"$ qmpbackup backup-begin {spec_path.name}"
    if backup.checkpoint is not None:
        check_path = folder / f"{backup.checkpoint}.xml"
        checkpoint = CheckpointSpec(name=backup.checkpoint)
        show_file(check_path, checkpoint_to_xml(checkpoint))
        command += f" {check_path.name}"
    refs = await demo.references(f"{folder.name}-{backup.number}")
    expected = (
        {disk: set(demo.dirty[backup.incremental][disk]) for disk in DISKS}
        if backup.incremental
        else {}
    )
    say(command)
    begun = await demo.vm.backup_begin(spec, checkpoint, demo.show_step)
    if backup.checkpoint is not None:
        demo.track(backup.checkpoint)
    say(f"Backup id {begun.record.id} created")
    say(f"backup used description from '{spec_path.name}'")
    if backup.checkpoint is not None:
        say(f"checkpoint created from '{backup.checkpoint}.xml'")
    return refs, expected, begun


def verify(
    target: Path,
    reference: Path,
    disk: str,
    backup: Round,
    dirty: set[int] | None,
    pulled: bool = False,
) -> None:
    """Check one disk's backup of a round against the disk at the round's instant.

    A push incremental is rebased onto its parent as on the slides; a pulled one
    already has its parent as backing file (``pull_copy`` sets it, relative).
    """
    seen = picture(reference)
    if backup.parent is None or dirty is None:
        check(len(image_info(target)) == 1, f"{target.name} stands alone (no backing file)")
        check(
            images_equal(target, reference),
            f"{target.name} equals {disk} at the instant: {seen}",
        )
        return
    copied = allocated_clusters(target)
    since = f"the {size_text(dirty)} dirtied since {backup.incremental}"
    check(copied == dirty, f"{target.name} holds exactly {since}")
    parent = target.with_name(f"Backup{NUMBER[disk]}.{backup.parent}.qcow2")
    if pulled:
        backing = image_info(target)[0].get("backing-filename")
        check(backing == parent.name, f"{target.name}'s backing file is {backing}")
    else:
        rebase(target, parent)
    check(
        images_equal(target, reference),
        f"{chain_text(target)} equals {disk} at the instant: {seen}",
    )


def check_chains(demo: Demo, folder: Path) -> None:
    """Print the chains as the slides do; check them and the checkpoints."""
    say()
    for disk in DISKS:
        n = NUMBER[disk]
        say(chain_text(demo.machine.disks[n - 1].path))
        for last, expected in ((3, [1, 2, 3]), (4, [1, 4])):
            drawn = chain_text(folder / f"Backup{n}.{last}.qcow2")
            want = " ← ".join(f"Backup{n}.{i}.qcow2" for i in expected)
            check(drawn == want, drawn)
    listed = " → ".join(c.name for c in demo.vm.checkpoints())
    check(listed == "check1 → check2 → check3", f"checkpoints: {listed}")
