"""What ``query-migrate`` replies tell of a migration begun during a backup; the
replies are QEMU's own (7.2 and 10.0, a migration failing while a backup job ran)."""

from __future__ import annotations

from qmpbackup.qmp.migration import Migration

NEVER: dict[str, str] = {}  # a QEMU that never began a migration
FAILED_72 = {"status": "failed"}
FAILED_100 = {"status": "failed", "error-desc": "Error in migration completion: Bad address"}


def test_a_migration_since_the_start_is_told_apart_from_an_old_one() -> None:
    before = Migration.parse(NEVER)
    assert Migration.parse(NEVER).since(before) is None
    failed = Migration.parse(FAILED_100).since(before)
    assert failed is not None and not failed.moved
    assert failed.describe() == (
        "a live migration was started during the backup and failed "
        "(Error in migration completion: Bad address): the VM stayed on this host"
    )
    # The same failure as when the backup began is an old one.
    assert Migration.parse(FAILED_72).since(Migration.parse(FAILED_72)) is None
    assert Migration.parse(FAILED_100).since(Migration.parse(FAILED_72)) is not None


def test_a_completed_migration_means_the_vm_left() -> None:
    moved = Migration.parse({"status": "completed"}).since(Migration.parse(FAILED_72))
    assert moved is not None and moved.moved
    assert moved.describe() == "the VM migrated away during the backup: this QEMU no longer runs it"
